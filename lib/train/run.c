/*
 * train/run.c - one LoRA training run as sd-lora-train runs it (diffusers' train_text_to_image_lora.py):
 * the captions, the batches (a shuffle per epoch, flips, the posterior's eps, the noise and its offset,
 * the timesteps), the learning-rate schedule (linear warm-up, then constant or cosine as diffusers'
 * get_scheduler), the latent cache of a frozen VAE, the fixed evaluation batch and one optimizer step
 * with gradient accumulation.  Every draw comes from the run's generator in a fixed order, so a run
 * resumed from its state file (train/state.c) continues bit for bit.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "sd.h"

int sd_train_run_init(sd_train_run *r, const sd_train_recipe *rc, const char *data, int *replaced)
{
	memset(r, 0, sizeof *r);
	r->rc = rc, r->perm_epoch = -1;
	*replaced = 0;
	sd_dataset *ds = r->ds = sd_dataset_read(data, rc->res, rc->resize);
	if (!ds) return -1;
	if (rc->caption) {
		/* --caption wins over the data set's own captions, and is what the hash (and --resume) sees */
		for (int i = 0; i < ds->n; i++) {
			*replaced += ds->captions[i] != NULL;
			free(ds->captions[i]);
			if (!(ds->captions[i] = strdup(rc->caption))) return sd_seterr("out of memory");
		}
	}
	for (int i = 0; i < ds->n; i++)
		if (!ds->captions[i])
			return sd_seterr("%s: no caption (a same-name .txt file, a \"prompt\" in the frame, or --caption TEXT)",
			                 ds->names[i]);
	sd_dataset_hash(ds, r->hash);
	return 0;
}

int sd_train_run_setup(sd_train_run *r, sd_tokenizer *tok, const sd_vae *vae, const char *sched_json)
{
	const sd_train_recipe *rc = r->rc;
	const sd_vae_config *vc = sd_vae_get_config(vae);
	int f = sd_vae_factor(vae);
	r->tok = tok;
	r->lc = vc->latent_channels, r->lh = r->lw = rc->res / f, r->sf = vc->scaling_factor, r->nt = 1000;
	/* the number of training timesteps from the model's scheduler config, when it says */
	const char *p = sched_json ? strstr(sched_json, "\"num_train_timesteps\"") : NULL;
	int64_t ntt;
	if (p && (p = strchr(p, ':')) && (ntt = strtoll(p + 1, NULL, 10)) > 0 && ntt <= 100000) r->nt = (int)ntt;
	sd_rng_seed(&r->rng, rc->cfg.seed);
	int nb = (r->ds->n + rc->batch - 1) / rc->batch;
	r->total = rc->max_steps ? rc->max_steps : ((long long)rc->epochs * nb + rc->accum - 1) / rc->accum;
	if (!(r->perm = malloc(r->ds->n * sizeof *r->perm))) return sd_seterr("out of memory");
	return 0;
}

int sd_train_run_cache(sd_train_run *r, sd_vae *vae)
{
	if (r->rc->cfg.train & SD_TRAIN_VAE) return 0;
	int n = r->ds->n, nn = r->rc->flip ? 2 * n : n, res = r->rc->res;
	r->mean = calloc(nn, sizeof *r->mean);
	r->std = calloc(nn, sizeof *r->std);
	if (!r->mean || !r->std) return sd_seterr("out of memory");
	r->ncache = nn;
	for (int k = 0; k < nn; k++) {
		const sd_tensor *px = r->ds->pixels[k % n];
		sd_tensor *x = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)1, (int64_t)3, (int64_t)res, (int64_t)res);
		sd_tensor *mom = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)1, (int64_t)2 * r->lc, (int64_t)r->lh, (int64_t)r->lw);
		r->mean[k] = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)1, (int64_t)r->lc, (int64_t)r->lh, (int64_t)r->lw);
		r->std[k] = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)1, (int64_t)r->lc, (int64_t)r->lh, (int64_t)r->lw);
		if (!x || !mom || !r->mean[k] || !r->std[k]) {
			sd_tensor_free(x), sd_tensor_free(mom);
			return sd_preerr("latent cache");
		}
		const float *s = px->data;
		float *d = x->data;
		for (int64_t y = 0; y < 3 * (int64_t)res; y++)
			for (int xx = 0; xx < res; xx++) d[y * res + xx] = s[y * res + (k < n ? xx : res - 1 - xx)];
		sd_vae_tiling nt = {-1, 0};
		if (sd_vae_encode(vae, mom, x, &nt) || sd_vae_posterior(r->mean[k], NULL, r->std[k], mom)) {
			sd_tensor_free(x), sd_tensor_free(mom);
			sd_preerr("%s: encoding", r->ds->names[k % n]);
			return SD_TRAIN_ESTEP;
		}
		sd_tensor_free(x);
		sd_tensor_free(mom);
	}
	return 0;
}

void sd_train_run_free(sd_train_run *r)
{
	if (!r) return;
	for (int k = 0; k < r->ncache; k++) sd_tensor_free(r->mean[k]), sd_tensor_free(r->std[k]);
	free(r->mean), free(r->std), free(r->perm);
	sd_dataset_free(r->ds);
	r->mean = r->std = NULL, r->perm = NULL, r->ncache = 0, r->ds = NULL;
}

/* ==== the models a run trains ==== */

int sd_train_models_load(sd_train_models *t, sd_model *m, enum sd_device dev)
{
	memset(t, 0, sizeof *t);
	for (int k = 0; k < 3; k++)
		if (!(t->w[k] = sd_weights_load(m, (enum sd_component)k, dev))) return -1;
	t->te = sd_clip_new(t->w[SD_TEXT_ENCODER]);
	t->vae = sd_vae_new(t->w[SD_VAE]);
	t->unet = sd_unet_new(t->w[SD_UNET]);
	if (!t->te || !t->vae || !t->unet) return sd_preerr("%s", sd_model_path(m));
	if (!(t->tok = sd_tokenizer_load(sd_model_tokenizer_dir(m)))) return sd_preerr("tokenizer");
	return 0;
}

void sd_train_models_free(sd_train_models *t)
{
	sd_unet_free(t->unet);
	sd_vae_free(t->vae);
	sd_clip_free(t->te);
	for (int k = 0; k < 3; k++) sd_weights_free(t->w[k]);
	sd_tokenizer_free(t->tok);
	memset(t, 0, sizeof *t);
}

/* ==== batches ==== */

/* input_ids (N, L) for the captions of idx[0..N), padded to 77 or the longest. */
static sd_tensor *make_ids(const sd_train_run *r, const int *idx, int N)
{
	int32_t *all = malloc((size_t)N * 77 * sizeof *all);
	int L = 0;
	if (!all) return sd_seterr("out of memory"), NULL;
	for (int i = 0; i < N; i++) {
		const char *cap = r->rc->caption ? r->rc->caption : r->ds->captions[idx[i]];
		int un;
		if (sd_tokenize_padded(r->tok, cap, strlen(cap), all + i * 77, 77, SD_CLIP_EOS, &un)) {
			free(all);
			return sd_preerr("%s: caption", r->ds->names[idx[i]]), NULL;
		}
		if (un > 77) un = 77;
		if (un > L) L = un;
	}
	if (r->rc->pad77) L = 77;
	sd_tensor *t = sd_tensor_newv(SD_DTYPE_I32, 2, (int64_t)N, (int64_t)L);
	if (!t) {
		free(all);
		return sd_preerr("input_ids"), NULL;
	}
	for (int i = 0; i < N; i++) memcpy((int32_t *)t->data + i * L, all + i * 77, L * sizeof(int32_t));
	free(all);
	return t;
}

/* The tensors of one batch; freed by batch_free. */
struct batch {
	sd_train_batch b;
	sd_tensor *px, *eps, *noise, *lat, *ids;
	int64_t ts[256];
};

static void batch_free(struct batch *B)
{
	sd_tensor_free(B->px), sd_tensor_free(B->eps), sd_tensor_free(B->noise), sd_tensor_free(B->lat);
	sd_tensor_free(B->ids);
}

/* Build a batch of images idx[0..N) with draws from rng: flips (--flip), the posterior's eps, the
 * noise (+ offset), the timesteps (fixed_t: evenly spread, for the evaluation batch).  -1 with a
 * message (B then holds what was made, for batch_free). */
static int make_batch(const sd_train_run *r, struct batch *B, const int *idx, int N, sd_rng *rng, int fixed_t)
{
	const sd_train_recipe *rc = r->rc;
	memset(B, 0, sizeof *B);
	int res = r->ds->res;
	int flips[256] = {0};
	if (rc->flip && !fixed_t) {
		float u[256];
		sd_rng_rand(rng, u, N);
		for (int i = 0; i < N; i++) flips[i] = u[i] < 0.5f;
	}
	int64_t per = (int64_t)r->lc * r->lh * r->lw;
	B->eps = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)N, (int64_t)r->lc, (int64_t)r->lh, (int64_t)r->lw);
	B->noise = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)N, (int64_t)r->lc, (int64_t)r->lh, (int64_t)r->lw);
	if (!B->eps || !B->noise) return sd_preerr("batch");
	sd_rng_randn(rng, B->eps->data, N * per);
	sd_rng_randn(rng, B->noise->data, N * per);
	if (rc->noise_offset > 0 && !fixed_t) {
		float off[1024];
		sd_rng_randn(rng, off, (int64_t)N * r->lc);
		float *z = B->noise->data;
		for (int i = 0; i < N; i++)
			for (int c = 0; c < r->lc; c++)
				for (int64_t k = 0; k < (int64_t)r->lh * r->lw; k++)
					z[(i * r->lc + c) * r->lh * r->lw + k] += (float)rc->noise_offset * off[i * r->lc + c];
	}
	if (fixed_t) {
		for (int i = 0; i < N; i++) B->ts[i] = (int64_t)((2 * i + 1) * (int64_t)r->nt / (2 * N));
	} else if (sd_rng_randint(rng, 0, r->nt, B->ts, N)) {
		return sd_preerr("timesteps");
	}
	if (r->mean) {
		B->lat = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)N, (int64_t)r->lc, (int64_t)r->lh, (int64_t)r->lw);
		if (!B->lat) return sd_preerr("batch");
		float *l = B->lat->data, *e = B->eps->data;
		for (int i = 0; i < N; i++) {
			int k = idx[i] + (flips[i] ? r->ds->n : 0);
			const float *m = r->mean[k]->data, *s = r->std[k]->data;
			for (int64_t j = 0; j < per; j++) l[i * per + j] = r->sf * (m[j] + s[j] * e[i * per + j]);
		}
		B->b.latents = B->lat;
	} else {
		B->px = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)N, (int64_t)3, (int64_t)res, (int64_t)res);
		if (!B->px) return sd_preerr("batch");
		int64_t pp = 3 * (int64_t)res * res;
		for (int i = 0; i < N; i++) {
			const float *src = r->ds->pixels[idx[i]]->data;
			float *dst = (float *)B->px->data + i * pp;
			if (!flips[i]) {
				memcpy(dst, src, pp * sizeof(float));
			} else {
				for (int64_t y = 0; y < 3 * (int64_t)res; y++)
					for (int x = 0; x < res; x++) dst[y * res + x] = src[y * res + res - 1 - x];
			}
		}
		B->b.pixels = B->px;
		B->b.eps_posterior = B->eps;
	}
	if (!(B->ids = make_ids(r, idx, N))) return -1;
	B->b.input_ids = B->ids;
	B->b.timesteps = B->ts;
	B->b.noise = B->noise;
	return 0;
}

/* The order of the images in epoch e: a Fisher-Yates shuffle from its own generator (seed, e), so a
 * resumed run needs no saved permutation. */
static void epoch_order(const sd_train_run *r, long long e, int *perm)
{
	sd_rng g;
	sd_rng_seed(&g, r->rc->cfg.seed * 1000003ULL + (uint64_t)e + 1);
	int n = r->ds->n;
	for (int i = 0; i < n; i++) perm[i] = i;
	for (int i = n - 1; i > 0; i--) {
		int j = (int)(sd_rng_u64(&g) % (uint64_t)(i + 1));
		int t = perm[i];
		perm[i] = perm[j], perm[j] = t;
	}
}

/* ==== schedule, evaluation, steps ==== */

double sd_train_lr(const sd_train_recipe *rc, long long step, long long total)
{
	double lr = rc->cfg.optim.lr;
	if (rc->warmup && step < rc->warmup) lr *= (double)(step + 1) / rc->warmup;
	else if (rc->cosine) {
		double p = (double)(step - rc->warmup) / (total - rc->warmup > 0 ? total - rc->warmup : 1);
		lr *= 0.5 * (1 + cos(M_PI * p));
	}
	return lr;
}

int sd_train_run_eval(sd_train_run *r, double *loss)
{
	int N = r->ds->n < r->rc->batch ? r->ds->n : r->rc->batch, idx[256];
	for (int i = 0; i < N; i++) idx[i] = i;
	sd_rng g;
	sd_rng_seed(&g, 0x5eedULL);
	struct batch B;
	if (make_batch(r, &B, idx, N, &g, 1)) {
		batch_free(&B);
		return -1;
	}
	uint64_t micro = sd_trainer_micro(r->tr);
	sd_trainer_set_training(r->tr, 0);
	int rc = sd_trainer_accumulate(r->tr, &B.b, 0.0f, loss);
	batch_free(&B);
	if (rc) return sd_preerr("evaluation batch");
	sd_trainer_set_training(r->tr, 1);
	sd_trainer_set_micro(r->tr, micro);
	sd_trainer_zero_grad(r->tr);
	return 0;
}

int sd_train_run_step(sd_train_run *r, const char *state_path, sd_train_step_info *info)
{
	const sd_train_recipe *rc = r->rc;
	int nb = (r->ds->n + rc->batch - 1) / rc->batch, idx[256];
	double lr = sd_train_lr(rc, r->step, r->total);
	sd_optim_set_lr(sd_trainer_optim(r->tr), lr);
	sd_rng rng0 = r->rng;
	uint64_t micro0 = sd_trainer_micro(r->tr);
	double loss = 0, recon = 0;
	long long epoch = 0;
	memset(info, 0, sizeof *info);
	if (sd_trainer_zero_grad(r->tr)) return sd_preerr("step %lld", r->step + 1);
	for (int a = 0; a < rc->accum; a++) {
		long long mi = r->step * rc->accum + a;
		epoch = mi / nb;
		int bi = (int)(mi % nb);
		if (epoch != r->perm_epoch) epoch_order(r, epoch, r->perm), r->perm_epoch = epoch;
		int N = 0;
		for (int i = bi * rc->batch; i < r->ds->n && N < rc->batch; i++) idx[N++] = r->perm[i];
		struct batch B;
		double l;
		if (make_batch(r, &B, idx, N, &r->rng, 0)) {
			batch_free(&B);
			return -1;
		}
		int bad = sd_trainer_accumulate(r->tr, &B.b, 1.0f / rc->accum, &l);
		batch_free(&B);
		if (bad) {
			sd_preerr("step %lld", r->step + 1);
			return SD_TRAIN_ESTEP;
		}
		loss += l / rc->accum;
		recon += sd_trainer_recon_loss(r->tr) / rc->accum;
	}
	info->loss = loss, info->recon = recon, info->lr = lr, info->epoch = epoch;
	if (!isfinite(loss) || !isfinite(recon)) {
		/* back to the last good state (the parameters are untouched: no optimizer step ran), saved */
		r->rng = rng0;
		sd_trainer_set_micro(r->tr, micro0);
		if (!state_path) return sd_seterr("step %lld: the loss is %g; stopping", r->step + 1, loss), 1;
		if (sd_train_run_save(r, state_path))
			return sd_preerr("step %lld: the loss is %g; stopping, and the state could not be saved", r->step + 1, loss), 1;
		sd_seterr("step %lld: the loss is %g; stopping (the last good state, step %lld, is in %s)", r->step + 1, loss,
		          r->step, state_path);
		return 1;
	}
	if (sd_trainer_apply(r->tr)) {
		sd_preerr("step %lld", r->step + 1);
		return SD_TRAIN_ESTEP;
	}
	r->step++;
	info->grad_norm = sd_trainer_grad_norm(r->tr);
	return 0;
}

/* ==== the recipe's lists (--train, --targets) ==== */

/* "a,b,c" → a NULL-terminated array of its non-empty items, all in one malloc'd block; NULL on OOM. */
static char **split_list(const char *s)
{
	size_t n = 1, len = strlen(s) + 1;
	for (const char *p = s; *p; p++) n += *p == ',';
	char **v = calloc(1, (n + 1) * sizeof *v + len), *save;
	if (!v) return NULL;
	char *d = memcpy((char *)(v + n + 1), s, len);
	int k = 0;
	for (char *tok = strtok_r(d, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) v[k++] = tok;
	return v;
}

int sd_train_parse_components(const char *s)
{
	int f = 0;
	char **v = split_list(s);
	if (!v) return sd_seterr("out of memory");
	for (int i = 0; v[i]; i++) {
		if (!strcmp(v[i], "unet")) f |= SD_TRAIN_UNET;
		else if (!strcmp(v[i], "text") || !strcmp(v[i], "text_encoder")) f |= SD_TRAIN_TEXT;
		else if (!strcmp(v[i], "vae")) f |= SD_TRAIN_VAE;
		else {
			sd_seterr("'%s' is not unet, text or vae", v[i]);
			free(v);
			return -1;
		}
	}
	free(v);
	return f ? f : sd_seterr("no component given");
}

int sd_train_parse_targets(sd_train_config *c, const char *s)
{
	const char *eq = strchr(s, '=');
	if (!eq || !eq[1]) return sd_seterr("'%s' is not COMPONENT=MODULE,MODULE...", s);
	size_t n = eq - s;
	int k = !strncmp(s, "unet", n) && n == 4 ? SD_UNET
	        : (n == 4 && !strncmp(s, "text", 4)) || (n == 12 && !strncmp(s, "text_encoder", 12)) ? SD_TEXT_ENCODER
	        : n == 3 && !strncmp(s, "vae", 3) ? SD_VAE : -1;
	if (k < 0) return sd_seterr("'%.*s' is not unet, text or vae", (int)n, s);
	char **v = split_list(eq + 1);
	if (!v) return sd_seterr("out of memory");
	c->targets[k] = (const char *const *)v;
	return 0;
}

int sd_train_set_optimizer(sd_train_config *c, const char *name)
{
	enum sd_optim_kind k;
	double lr = c->optim.lr;
	if (sd_optim_parse(name, &k)) return sd_seterr("'%s' is not adam or adamw", name);
	sd_optim_defaults(&c->optim, k);
	c->optim.lr = lr;
	c->optim.weight_decay = 0;
	return 0;
}
