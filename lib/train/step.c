/*
 * train/step.c - the LoRA training step, as diffusers' examples/text_to_image/train_text_to_image_lora.py
 * computes it with PEFT adapters (peft/tuners/lora/layer.py: lora_B(lora_A(dropout(x))) · alpha/r,
 * A Kaiming-uniform(a=√5), B zero): latents from the VAE posterior sample, DDPM noising, the text
 * encoder, the UNet, MSE on epsilon (or v), backward through all three into the adapters' gradients,
 * optional clip_grad_norm_, and torch's Adam/AdamW (train/optim.c).
 *
 * The model backwards live next to their forwards (clip.c, unet.c, vae.c) and the LoRA linear in
 * training in nn/linear.c; this file holds the trainer object that creates one adapter per targeted
 * linear and attaches it, and the step.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "sd.h"

#define TRY(x) do { if ((x) < 0) return -1; } while (0)

/* ==== the trainer ==== */

struct adapter {
	enum sd_component comp;
	char *module;
	sd_tensor *a, *b, *da, *db; /* da/db NULL: no gradient (decoder-side VAE) */
	sd_lora_layer layer;
	sd_lora_train tr;
	void *lin;                  /* sd_clip_linear / sd_vae_conv / sd_unet_linear */
};

struct sd_trainer {
	sd_train_config cfg;
	sd_unet *u;
	sd_clip *te;
	sd_vae *vae;
	enum sd_device dev;
	struct adapter *ad;
	int nad;
	char **names;               /* [2·nad]: A then B of each adapter */
	sd_tensor **params, **grads;
	sd_optim *opt;
	uint64_t micro;             /* accumulate calls: the dropout masks' step */
	sd_sched *sched;
	const float *ac;            /* alphas_cumprod */
	int nt;
	sd_arena *arena;            /* the recorded forwards of one accumulate */
	float grad_norm;
	sd_tensor *last[4];         /* latents, noisy_latents, encoder_hidden_states, model_pred */
	size_t peak;
	int training;
	double recon;               /* the last accumulate's reconstruction loss */
};

static const char *const last_names[4] = {"latents", "noisy_latents", "encoder_hidden_states", "model_pred"};
static const char *const def_text[] = {"q_proj", "v_proj", NULL};
static const char *const def_vae[] = {"to_q", "to_k", "to_v", NULL};
static const char *const def_unet[] = {"to_q", "to_v", "query", "value", NULL};
static const char *const comp_prefix[3] = {"text_encoder", "vae", "unet"};

void sd_train_defaults(sd_train_config *c)
{
	memset(c, 0, sizeof *c);
	c->train = SD_TRAIN_UNET | SD_TRAIN_TEXT | SD_TRAIN_VAE;
	c->rank = 8;
	c->alpha = 16;
	c->dropout = 0.05f;
	sd_optim_defaults(&c->optim, SD_OPTIM_ADAM);
	c->optim.lr = 1e-4;
	c->optim.weight_decay = 0;
}

/* PEFT's target_modules rule: the module is a target, or ends with "." + a target. */
static int targeted(const char *module, const char *const *targets)
{
	size_t n = strlen(module);
	for (; *targets; targets++) {
		size_t k = strlen(*targets);
		if (!strcmp(module, *targets) || (n > k && module[n - k - 1] == '.' && !strcmp(module + n - k, *targets)))
			return 1;
	}
	return 0;
}

static int ends_with(const char *s, const char *suffix)
{
	size_t n = strlen(s), k = strlen(suffix);
	return n >= k && !strcmp(s + n - k, suffix);
}

/* Point the model's linear at the adapter (train: its training state, else inference only). */
static void attach(struct adapter *d, int train)
{
	const sd_lora_train *tr = train ? &d->tr : NULL;
	if (d->comp == SD_TEXT_ENCODER) {
		sd_clip_linear *l = d->lin;
		l->lora = &d->layer;
		l->train = tr;
	} else if (d->comp == SD_VAE) {
		sd_vae_conv *l = d->lin;
		l->lora = &d->layer;
		l->train = d->da ? tr : NULL; /* decoder-side: outside the training graph */
	} else {
		sd_unet_linear *l = d->lin;
		l->lora_a = d->a;
		l->lora_b = d->b;
		l->lora_scale = d->layer.scale;
		l->train = tr;
	}
}

static void detach(struct adapter *d)
{
	if (!d->lin) return;
	if (d->comp == SD_TEXT_ENCODER) {
		sd_clip_linear *l = d->lin;
		l->lora = NULL;
		l->train = NULL;
	} else if (d->comp == SD_VAE) {
		sd_vae_conv *l = d->lin;
		l->lora = NULL;
		l->train = NULL;
	} else {
		sd_unet_linear *l = d->lin;
		l->lora_a = l->lora_b = NULL;
		l->lora_scale = 0;
		l->train = NULL;
	}
}

/* A new adapter on linear `lin` (weight w (O, I)) of component comp, A Kaiming-uniform, B zero. */
static int add_adapter(sd_trainer *t, enum sd_component comp, const char *module, void *lin, const sd_tensor *w,
                       int has_lora, int grad, sd_rng *rng)
{
	const sd_train_config *c = &t->cfg;
	if (has_lora) return sd_seterr("trainer: %s.%s already has a LoRA adapter", comp_prefix[comp], module);
	if (!w || w->ndim != 2) return sd_seterr("trainer: %s.%s is not a linear layer", comp_prefix[comp], module);
	struct adapter *p = realloc(t->ad, (t->nad + 1) * sizeof *p);
	if (!p) return sd_seterr("out of memory");
	t->ad = p;
	struct adapter *d = &t->ad[t->nad++];
	memset(d, 0, sizeof *d);
	d->comp = comp;
	d->lin = NULL; /* attached once everything is made */
	int64_t O = w->shape[0], I = w->shape[1], r = c->rank;
	int64_t sa[2] = {r, I}, sb[2] = {O, r};
	if (!(d->module = strdup(module))) return sd_seterr("out of memory");
	sd_tensor *ha = sd_tensor_new(SD_DTYPE_F32, 2, sa);
	if (!ha) return -1;
	/* nn.init.kaiming_uniform_(A, a=√5): bound = √(6/((1+5)·fan_in)) = 1/√fan_in */
	float bound = (float)(1.0 / sqrt((double)I)), *pa = ha->data;
	sd_rng_rand(rng, pa, r * I);
	for (int64_t i = 0; i < r * I; i++) pa[i] = bound * (2.0f * pa[i] - 1.0f);
	d->a = t->dev == SD_DEVICE_CPU ? ha : sd_tensor_to_device(ha, t->dev);
	if (d->a != ha) sd_tensor_free(ha);
	if (!d->a || !(d->b = sd_tensor_new_on(t->dev, SD_DTYPE_F32, 2, sb))) return -1;
	if (t->dev != SD_DEVICE_CPU) {
		sd_tensor *z = sd_tensor_new(SD_DTYPE_F32, 2, sb);
		int rc = z ? sd_tensor_copy(d->b, z) : -1;
		sd_tensor_free(z);
		if (rc) return -1;
	}
	if (grad && (!(d->da = sd_tensor_new_on(t->dev, SD_DTYPE_F32, 2, sa)) ||
	             !(d->db = sd_tensor_new_on(t->dev, SD_DTYPE_F32, 2, sb))))
		return -1;
	d->layer = (sd_lora_layer){d->a, d->b, (float)(c->alpha / c->rank), c->dropout};
	d->tr = (sd_lora_train){d->da, d->db, c->dropout, c->seed, &t->micro, (uint32_t)(t->nad - 1)};
	d->lin = lin;
	return 0;
}

static int make_adapters(sd_trainer *t)
{
	const sd_train_config *c = &t->cfg;
	sd_rng rng;
	sd_rng_seed(&rng, c->seed);
	char name[256];
	/* UNet: attention projections only act unmerged (to_q, to_k, to_v, to_out.0) */
	if (c->train & SD_TRAIN_UNET) {
		if (!t->u) return sd_seterr("trainer: the UNet is trained but none was given");
		const char *const *tg = c->targets[SD_UNET] ? c->targets[SD_UNET] : def_unet;
		int n = sd_unet_linear_count(t->u);
		for (int i = 0; i < n; i++) {
			const char *m = sd_unet_linear_name(t->u, i);
			if (!targeted(m, tg)) continue;
			if (!ends_with(m, ".to_q") && !ends_with(m, ".to_k") && !ends_with(m, ".to_v") && !ends_with(m, ".to_out.0"))
				return sd_seterr("trainer: unet.%s: LoRA training is supported on attention projections only "
				                 "(to_q, to_k, to_v, to_out.0)", m);
			sd_unet_linear *l = sd_unet_find_linear(t->u, m);
			TRY(add_adapter(t, SD_UNET, m, l, l->w, l->lora_a != NULL, 1, &rng));
		}
	}
	if (c->train & SD_TRAIN_TEXT) {
		if (!t->te) return sd_seterr("trainer: the text encoder is trained but none was given");
		const char *const *tg = c->targets[SD_TEXT_ENCODER] ? c->targets[SD_TEXT_ENCODER] : def_text;
		static const char *const sub[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
		                                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2"};
		for (int l = 0; l < sd_clip_get_config(t->te)->layers; l++)
			for (int k = 0; k < 6; k++) {
				snprintf(name, sizeof name, "text_model.encoder.layers.%d.%s", l, sub[k]);
				if (!targeted(name, tg)) continue;
				sd_clip_linear *lin = sd_clip_find_linear(t->te, name);
				TRY(add_adapter(t, SD_TEXT_ENCODER, name, lin, lin->w, lin->lora != NULL, 1, &rng));
			}
	}
	if (c->train & SD_TRAIN_VAE) {
		if (!t->vae) return sd_seterr("trainer: the VAE is trained but none was given");
		const char *const *tg = c->targets[SD_VAE] ? c->targets[SD_VAE] : def_vae;
		static const char *const side[] = {"encoder", "decoder"}, *const sub[] = {"to_q", "to_k", "to_v", "to_out.0"};
		for (int s = 0; s < 2; s++)
			for (int k = 0; k < 4; k++) {
				snprintf(name, sizeof name, "%s.mid_block.attentions.0.%s", side[s], sub[k]);
				sd_vae_conv *lin = sd_vae_find_linear(t->vae, name);
				if (!lin || !targeted(name, tg)) continue;
				/* the decoder is outside the diffusion loss's graph: no gradient unless the
				 * reconstruction loss trains it */
				TRY(add_adapter(t, SD_VAE, name, lin, lin->w, lin->lora != NULL, s == 0 || c->vae_recon_weight > 0,
				                &rng));
			}
	}
	if (t->nad == 0) return sd_seterr("trainer: no linear layer matches the LoRA targets");
	return 0;
}

void sd_trainer_free(sd_trainer *t)
{
	if (!t) return;
	for (int i = 0; i < t->nad; i++) {
		struct adapter *d = &t->ad[i];
		detach(d);
		free(d->module);
		sd_tensor_free(d->a);
		sd_tensor_free(d->b);
		sd_tensor_free(d->da);
		sd_tensor_free(d->db);
	}
	if (t->names)
		for (int i = 0; i < 2 * t->nad; i++) free(t->names[i]);
	free(t->names);
	free(t->params);
	free(t->grads);
	free(t->ad);
	sd_optim_free(t->opt);
	sd_sched_free(t->sched);
	sd_arena_free(t->arena);
	for (int i = 0; i < 4; i++) sd_tensor_free(t->last[i]);
	free(t);
}

sd_trainer *sd_trainer_new(const sd_train_config *c, sd_unet *u, sd_clip *te, sd_vae *vae)
{
	sd_trainer *t = calloc(1, sizeof *t);
	if (!t) {
		sd_seterr("out of memory");
		return NULL;
	}
	t->cfg = *c;
	t->u = u, t->te = te, t->vae = vae;
	t->dev = SD_DEVICE_CPU; /* the models' device: every recorded activation and gradient lives there */
	const sd_unet_linear *tl = u ? sd_unet_find_linear(u, "time_embedding.linear_1") : NULL;
	if (tl && tl->w) t->dev = tl->w->device;
	if (c->rank < 1 || !(c->alpha > 0) || !(c->dropout >= 0 && c->dropout < 1) || !(c->max_grad_norm >= 0) ||
	    !(c->min_snr_gamma >= 0) || !(c->vae_recon_weight >= 0 && isfinite(c->vae_recon_weight))) {
		sd_seterr("trainer: bad config (rank %d, alpha %g, dropout %g, max_grad_norm %g, min_snr_gamma %g)", c->rank,
		          c->alpha, c->dropout, c->max_grad_norm, c->min_snr_gamma);
		goto fail;
	}
	if (!u || !te) {
		sd_seterr("trainer: a UNet and a text encoder are needed");
		goto fail;
	}
	if (make_adapters(t)) goto fail;
	t->training = 1;
	for (int i = 0; i < t->nad; i++) attach(&t->ad[i], 1);
	int np = 2 * t->nad;
	if (!(t->names = calloc(np, sizeof *t->names)) || !(t->params = calloc(np, sizeof *t->params)) ||
	    !(t->grads = calloc(np, sizeof *t->grads))) {
		sd_seterr("out of memory");
		goto fail;
	}
	for (int i = 0; i < t->nad; i++) {
		struct adapter *d = &t->ad[i];
		char n[512];
		for (int k = 0; k < 2; k++) {
			snprintf(n, sizeof n, "%s.%s.lora_%c.weight", comp_prefix[d->comp], d->module, k ? 'B' : 'A');
			if (!(t->names[2 * i + k] = strdup(n))) {
				sd_seterr("out of memory");
				goto fail;
			}
		}
		t->params[2 * i] = d->a, t->params[2 * i + 1] = d->b;
		t->grads[2 * i] = d->da, t->grads[2 * i + 1] = d->db;
	}
	if (!(t->opt = sd_optim_new(&c->optim, np, t->params, (const char *const *)t->names))) goto fail;
	if (!(t->sched = sd_sched_new(c->sched_json, SD_SAMPLER_DDPM, 1, 0, 0.0)) ||
	    !(t->ac = sd_sched_alphas_cumprod(t->sched, &t->nt)) || !(t->arena = sd_arena_new(t->dev, 0)))
		goto fail;
	return t;
fail:
	sd_preerr("trainer");
	sd_trainer_free(t);
	return NULL;
}

int sd_trainer_param_count(const sd_trainer *t)
{
	return 2 * t->nad;
}

const char *sd_trainer_param_name(const sd_trainer *t, int i)
{
	return i >= 0 && i < 2 * t->nad ? t->names[i] : NULL;
}

sd_tensor *sd_trainer_param(sd_trainer *t, int i)
{
	return i >= 0 && i < 2 * t->nad ? t->params[i] : NULL;
}

const sd_tensor *sd_trainer_grad(const sd_trainer *t, int i)
{
	return i >= 0 && i < 2 * t->nad ? t->grads[i] : NULL;
}

int sd_trainer_find(const sd_trainer *t, const char *name)
{
	for (int i = 0; i < 2 * t->nad; i++)
		if (!strcmp(t->names[i], name)) return i;
	return -1;
}

sd_optim *sd_trainer_optim(sd_trainer *t)
{
	return t->opt;
}

double sd_trainer_recon_loss(const sd_trainer *t)
{
	return t->recon;
}

int sd_trainer_set_training(sd_trainer *t, int on)
{
	t->training = on != 0;
	for (int i = 0; i < t->nad; i++) attach(&t->ad[i], t->training);
	return 0;
}

float sd_trainer_grad_norm(const sd_trainer *t)
{
	return t->grad_norm;
}

const sd_tensor *sd_trainer_last(const sd_trainer *t, const char *what)
{
	for (int i = 0; i < 4; i++)
		if (!strcmp(what, last_names[i])) return t->last[i];
	return NULL;
}

size_t sd_trainer_peak_bytes(const sd_trainer *t)
{
	return t->peak;
}

int sd_trainer_zero_grad(sd_trainer *t)
{
	return sd_grad_zero(t->grads, 2 * t->nad);
}

int sd_trainer_apply(sd_trainer *t)
{
	float maxn = t->cfg.max_grad_norm > 0 ? t->cfg.max_grad_norm : INFINITY;
	if (sd_clip_grad_norm(&t->grad_norm, t->grads, 2 * t->nad, maxn)) return sd_preerr("trainer");
	return sd_optim_step(t->opt, (const sd_tensor *const *)t->grads) ? sd_preerr("trainer") : 0;
}

int sd_train_step(sd_trainer *t, const sd_train_batch *b, double *loss)
{
	if (sd_trainer_zero_grad(t) || sd_trainer_accumulate(t, b, 1.0f, loss)) return -1;
	return sd_trainer_apply(t);
}

/* ---- one forward and backward ---- */

/* A tensor in the trainer's arena (header too), on its device. */
static sd_tensor *atensor(sd_trainer *t, enum sd_dtype dt, int nd, const int64_t *shape)
{
	return sd_arena_tensor(t->arena, dt, nd, shape);
}

/* A copy of the CPU tensor x in the arena (x itself when the trainer is on the CPU and keep is 0). */
static sd_tensor *place(sd_trainer *t, const sd_tensor *x)
{
	sd_tensor *y = atensor(t, x->dtype, x->ndim, x->shape);
	return y && !sd_tensor_copy(y, x) ? y : NULL;
}

/* Keep a CPU copy of x as last[i]. */
static int keep_last(sd_trainer *t, int i, const sd_tensor *x)
{
	if (!t->last[i] || !sd_tensor_same_shape(t->last[i], x)) {
		sd_tensor_free(t->last[i]);
		if (!(t->last[i] = sd_tensor_new(SD_DTYPE_F32, x->ndim, x->shape))) return -1;
	}
	return sd_tensor_copy(t->last[i], x);
}

/* A (1, …) view of sample n of x (N, …). */
static sd_tensor sample_view(const sd_tensor *x, int64_t n)
{
	sd_tensor v = *x;
	v.shape[0] = 1;
	v.owns = 0;
	v.aux = NULL;
	v.aux_free = NULL;
	v.data = (char *)x->data + n * sd_tensor_nbytes(&v);
	return v;
}

static int check_batch(const sd_trainer *t, const sd_train_batch *b)
{
	char s1[96], s2[96];
	const sd_tensor *z = b->noise;
	if (!z || !b->input_ids || !b->timesteps) return sd_seterr("trainer: the batch needs noise, input_ids and timesteps");
	if (z->dtype != SD_DTYPE_F32 || z->ndim != 4 || z->device != SD_DEVICE_CPU)
		return sd_seterr("trainer: noise is %s %s, expected f32 (N,C,h,w) on the cpu", sd_dtype_name(z->dtype),
		                 sd_shape_str(z->ndim, z->shape, s1, sizeof s1));
	int64_t N = z->shape[0];
	if (b->latents) {
		if (!sd_tensor_same_shape(b->latents, z) || b->latents->dtype != SD_DTYPE_F32)
			return sd_seterr("trainer: latents %s and noise %s differ",
			                 sd_shape_str(b->latents->ndim, b->latents->shape, s1, sizeof s1),
			                 sd_shape_str(z->ndim, z->shape, s2, sizeof s2));
	} else {
		if (!b->pixels || !b->eps_posterior) return sd_seterr("trainer: the batch needs latents or pixels with eps_posterior");
		if (!t->vae) return sd_seterr("trainer: pixels given but no VAE");
		if (!sd_tensor_same_shape(b->eps_posterior, z))
			return sd_seterr("trainer: eps_posterior %s and noise %s differ",
			                 sd_shape_str(b->eps_posterior->ndim, b->eps_posterior->shape, s1, sizeof s1),
			                 sd_shape_str(z->ndim, z->shape, s2, sizeof s2));
		const sd_tensor *x = b->pixels;
		int f = sd_vae_factor(t->vae);
		if (x->ndim != 4 || x->shape[0] != N || x->shape[2] != z->shape[2] * f || x->shape[3] != z->shape[3] * f)
			return sd_seterr("trainer: pixels %s do not match latents %s (factor %d)",
			                 sd_shape_str(x->ndim, x->shape, s1, sizeof s1), sd_shape_str(z->ndim, z->shape, s2, sizeof s2), f);
	}
	const sd_tensor *ids = b->input_ids;
	if (ids->ndim != 2 || ids->shape[0] != N || (ids->dtype != SD_DTYPE_I32 && ids->dtype != SD_DTYPE_I64))
		return sd_seterr("trainer: input_ids are %s %s, expected i32/i64 (%lld, L)", sd_dtype_name(ids->dtype),
		                 sd_shape_str(ids->ndim, ids->shape, s1, sizeof s1), (long long)N);
	for (int64_t n = 0; n < N; n++)
		if (b->timesteps[n] < 0 || b->timesteps[n] >= t->nt)
			return sd_seterr("trainer: timestep %lld is outside [0, %d)", (long long)b->timesteps[n], t->nt);
	return 0;
}

int sd_trainer_accumulate(sd_trainer *t, const sd_train_batch *b, float gscale, double *loss)
{
	const sd_train_config *c = &t->cfg;
	TRY(check_batch(t, b));
	const sd_tensor *z = b->noise;
	const int64_t N = z->shape[0];
	sd_arena_reset(t->arena);
	int vae_rec = 0, recon = 0;
	sd_vae_enc_act vact;
	sd_tensor *moments = NULL, *mom_host = NULL, *eps = NULL, *xdev = NULL, *zdev = NULL;
	t->recon = 0;
	int rc = -1;

	/* latents = sf · (mean + std·eps), recorded through the encoder when its adapters train */
	sd_tensor *lat = atensor(t, SD_DTYPE_F32, 4, z->shape);
	if (!lat) return -1;
	if (b->latents) {
		TRY(sd_tensor_copy(lat, b->latents));
	} else {
		const sd_vae_config *vc = sd_vae_get_config(t->vae);
		for (int i = 0; i < t->nad; i++)
			if (t->ad[i].comp == SD_VAE && t->ad[i].da && t->training) {
				if (!strncmp(t->ad[i].module, "decoder.", 8))
					recon = c->vae_recon_weight > 0;
				else
					vae_rec = 1;
			}
		sd_tensor *x = place(t, b->pixels);
		if (!x) return -1;
		xdev = x;
		if (vae_rec) {
			if (sd_vae_encode_record(t->vae, &vact, t->arena, x)) return sd_preerr("trainer");
			moments = vact.moments;
		} else {
			int64_t ms[4] = {N, 2 * z->shape[1], z->shape[2], z->shape[3]};
			const sd_vae_tiling none = {-1, 0};
			if (!(moments = atensor(t, SD_DTYPE_F32, 4, ms)) || sd_vae_encode(t->vae, moments, x, &none))
				return sd_preerr("trainer");
		}
		if (moments->shape[1] != 2 * z->shape[1]) return sd_seterr("trainer: the VAE's latents do not match the noise");
		/* the posterior sample on the host (small) */
		sd_tensor *mean = sd_tensor_new(SD_DTYPE_F32, 4, z->shape), *std = sd_tensor_new(SD_DTYPE_F32, 4, z->shape);
		mom_host = sd_tensor_new(SD_DTYPE_F32, 4, moments->shape);
		if (!mean || !std || !mom_host || sd_tensor_copy(mom_host, moments) || sd_vae_posterior(mean, NULL, std, mom_host)) {
			sd_tensor_free(mean), sd_tensor_free(std);
			goto out;
		}
		const float *m = mean->data, *s = std->data, *e = b->eps_posterior->data;
		float *l = mean->data, sf = vc->scaling_factor;
		for (int64_t i = 0, n = sd_tensor_numel(mean); i < n; i++) {
			float zz = m[i] + s[i] * e[i];
			l[i] = zz * sf;
			if (recon) ((float *)std->data)[i] = zz; /* the unscaled sample, for the reconstruction */
		}
		rc = sd_tensor_copy(lat, mean);
		if (!rc && recon && (!(zdev = atensor(t, SD_DTYPE_F32, 4, z->shape)) || sd_tensor_copy(zdev, std))) rc = -1;
		sd_tensor_free(mean), sd_tensor_free(std);
		if (rc) goto out;
		rc = -1;
	}
	if (keep_last(t, 0, lat)) goto out;

	/* noisy = √ᾱ·latents + √(1−ᾱ)·noise */
	sd_tensor *noise = place(t, z), *noisy = atensor(t, SD_DTYPE_F32, 4, z->shape);
	if (!noise || !noisy || sd_train_add_noise(noisy, lat, noise, t->ac, t->nt, b->timesteps) || keep_last(t, 1, noisy))
		goto out;

	/* ehs = CLIP(ids), recorded when its adapters train */
	int text_rec = 0;
	for (int i = 0; i < t->nad; i++)
		if (t->ad[i].comp == SD_TEXT_ENCODER && t->training) text_rec = 1;
	const sd_clip_config *cc = sd_clip_get_config(t->te);
	int64_t L = b->input_ids->shape[1], es[3] = {N, L, cc->hidden};
	sd_tensor *ids = atensor(t, SD_DTYPE_I32, 2, b->input_ids->shape);
	if (!ids) goto out;
	{
		sd_tensor *h = sd_tensor_convert(b->input_ids, SD_DTYPE_I32);
		if (!h) goto out;
		const int32_t *p = h->data;
		for (int64_t i = 0; i < N * L; i++)
			if (p[i] < 0 || p[i] >= cc->vocab) {
				sd_seterr("trainer: token id %d is out of range [0, %d)", p[i], cc->vocab);
				sd_tensor_free(h);
				goto out;
			}
		int e = sd_tensor_copy(ids, h);
		sd_tensor_free(h);
		if (e) goto out;
	}
	sd_clip_act cact;
	sd_tensor *ehs;
	if (text_rec) {
		if (sd_clip_encode_record(t->te, &cact, t->arena, ids, c->clip_skip)) goto out;
		ehs = cact.out;
	} else if (!(ehs = atensor(t, SD_DTYPE_F32, 3, es)) || sd_clip_encode(t->te, ehs, ids, c->clip_skip, NULL))
		goto out;
	if (keep_last(t, 2, ehs)) goto out;

	/* pred = UNet(noisy, t, ehs), recorded (or checkpointed) */
	float *tf = malloc(N * sizeof *tf);
	if (!tf) {
		sd_seterr("out of memory");
		goto out;
	}
	for (int64_t n = 0; n < N; n++) tf[n] = (float)b->timesteps[n];
	sd_unet_act uact;
	int e = c->checkpointing ? sd_unet_forward_checkpointed(t->u, &uact, t->arena, noisy, tf, (int)N, ehs)
	                         : sd_unet_forward_record(t->u, &uact, t->arena, noisy, tf, (int)N, ehs);
	free(tf);
	if (e || keep_last(t, 3, uact.out)) goto out;

	/* loss and its gradient */
	const sd_tensor *target = noise;
	if (c->v_prediction) {
		sd_tensor *v = atensor(t, SD_DTYPE_F32, 4, z->shape);
		if (!v || sd_v_target(v, lat, noise, t->ac, t->nt, b->timesteps)) goto out;
		target = v;
	}
	float *w = NULL;
	if (c->min_snr_gamma > 0) {
		if (!(w = malloc(N * sizeof *w)) ||
		    sd_min_snr_weights(w, t->ac, t->nt, b->timesteps, (int)N, c->min_snr_gamma, c->v_prediction)) {
			if (!w) sd_seterr("out of memory");
			free(w);
			goto out;
		}
	}
	sd_tensor *dpred = atensor(t, SD_DTYPE_F32, 4, uact.out->shape);
	e = !dpred || sd_mse_loss(loss, dpred, uact.out, target, w, gscale);
	free(w);
	if (e) goto out;

	/* backward: UNet → (ehs → CLIP), (noisy → latents → VAE encoder) */
	sd_tensor *dehs = text_rec ? atensor(t, SD_DTYPE_F32, 3, es) : NULL;
	sd_tensor *dlat = vae_rec ? atensor(t, SD_DTYPE_F32, 4, z->shape) : NULL;
	if ((text_rec && !dehs) || (vae_rec && !dlat) || sd_unet_backward(t->u, &uact, dpred, dlat, dehs)) goto out;
	if (text_rec && sd_clip_backward(t->te, &cact, dehs)) goto out;
	if (vae_rec) {
		/* d latents = √ᾱ_t · d noisy; d z = sf · d latents; then the posterior sample */
		const sd_vae_config *vc = sd_vae_get_config(t->vae);
		for (int64_t n = 0; n < N; n++) {
			sd_tensor v = sample_view(dlat, n);
			float a = sqrtf(t->ac[b->timesteps[n]]);
			if (sd_scale(&v, &v, a) || sd_scale(&v, &v, vc->scaling_factor)) goto out;
		}
		sd_tensor *dmom = atensor(t, SD_DTYPE_F32, 4, moments->shape);
		if (!dmom || !(eps = place(t, b->eps_posterior)) || sd_gaussian_sample_backward(dmom, dlat, moments, eps, 0) ||
		    sd_vae_encode_backward(t->vae, &vact, dmom, NULL))
			goto out;
	}
	if (recon) {
		/* W·mean((decode(z) − x)²) with z detached: gradients into the decoder-side adapters only */
		float W = c->vae_recon_weight;
		sd_vae_dec_act dact;
		double r = 0;
		if (sd_vae_decode_record(t->vae, &dact, t->arena, zdev)) goto out;
		sd_tensor *dout = atensor(t, SD_DTYPE_F32, 4, dact.out->shape);
		if (!dout || sd_mse_loss(&r, dout, dact.out, xdev, NULL, gscale * W) ||
		    sd_vae_decode_backward(t->vae, &dact, dout))
			goto out;
		t->recon = W * r;
	}
	size_t used = sd_arena_peak(t->arena);
	if (used > t->peak) t->peak = used;
	t->micro++;
	rc = 0;
out:
	sd_tensor_free(mom_host);
	if (rc) sd_preerr("trainer");
	return rc;
}

/* ---- for --resume (sd-lora-train) ---- */

uint64_t sd_trainer_micro(const sd_trainer *t)
{
	return t->micro;
}

void sd_trainer_set_micro(sd_trainer *t, uint64_t micro)
{
	t->micro = micro;
}
