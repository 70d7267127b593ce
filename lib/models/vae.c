/*
 * vae.c - AutoencoderKL, the Stable Diffusion VAE, on the backend ops.  Mirrors diffusers 0.25
 * (models/autoencoders/autoencoder_kl.py, autoencoders/vae.py: Encoder, Decoder,
 * DiagonalGaussianDistribution; resnet.py: ResnetBlock2D, Downsample2D, Upsample2D; unet_2d_blocks.py:
 * DownEncoderBlock2D, UpDecoderBlock2D, UNetMidBlock2D; attention_processor.py: Attention with
 * group_norm and residual_connection).
 *
 * Layers are llm.c-style *_forward functions that write into activations the caller allocated.  Two
 * callers allocate them: inference takes buffers from a small pool (slabs freed and reused as the
 * network walks, so a 512² decode holds a handful of activations, not all of them) and aliases the
 * activations of a block so that GroupNorm+SiLU is fused and dead buffers are reused; the recorded
 * encoder forward (sd_vae_encode_record) gives each activation its own tensor from the caller's arena
 * for a backward.  Large images are cut into overlapping tiles blended with linear ramps.
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include "../backend.h"

/* ==== block forwards ==== */

int sd_vae_resnet_forward(sd_tensor *out, const sd_vae_resnet_act *a, const sd_tensor *x,
                          const sd_vae_resnet *p, int groups, float eps)
{
	// x (N,Cin,H,W) → out (N,Cout,H,W)
	if (a->n1 == a->h1) {
		if (sd_group_norm(a->h1, x, groups, p->norm1_w, p->norm1_b, eps, 1)) return -1;
	} else if (sd_group_norm(a->n1, x, groups, p->norm1_w, p->norm1_b, eps, 0) ||
	           sd_act(a->h1, a->n1, SD_ACT_SILU))
		return -1;
	if (sd_conv2d(a->a1, a->h1, p->conv1.w, p->conv1.b, 1, 1, 1, 1, 1)) return -1;
	if (a->n2 == a->h2) {
		if (sd_group_norm(a->h2, a->a1, groups, p->norm2_w, p->norm2_b, eps, 1)) return -1;
	} else if (sd_group_norm(a->n2, a->a1, groups, p->norm2_w, p->norm2_b, eps, 0) ||
	           sd_act(a->h2, a->n2, SD_ACT_SILU))
		return -1;
	/* dropout is the identity at inference and p = 0 in every SD VAE config */
	if (sd_conv2d(out, a->h2, p->conv2.w, p->conv2.b, 1, 1, 1, 1, 1)) return -1;
	if (p->shortcut.w) {
		if (sd_conv2d(a->sc, x, p->shortcut.w, p->shortcut.b, 1, 0, 0, 0, 0)) return -1;
		return sd_add(out, out, a->sc, 1.0f, 1.0f);
	}
	return sd_add(out, out, x, 1.0f, 1.0f); /* output_scale_factor 1 */
}

/* A projection with its LoRA adapter when set (ax: the adapter's scratch); in training (c.train set) with
 * the adapter's dropout (train/step.c). */
#define LINEAR(out, x, c, ax) ((c).train ? sd_lora_train_forward((out), (ax), (x), (c).w, (c).b, (c).lora, (c).train) \
                                         : sd_lora_linear_forward((out), (x), (c).w, (c).b, (c).lora, (ax)))

int sd_vae_attn_forward(sd_tensor *out, const sd_vae_attn_act *a, const sd_tensor *x, const sd_vae_attn *p,
                        int groups, float eps)
{
	// x (N,C,H,W); one head of C features over L = H·W positions
	/* the projections with their LoRA adapters when set (lora.c; a->lora is the adapters' scratch) */
	if (sd_group_norm(a->n, x, groups, p->norm_w, p->norm_b, eps, 0) || sd_nchw_to_nlc(a->nl, a->n) ||
	    LINEAR(a->q, a->nl, p->q, a->lora) || LINEAR(a->k, a->nl, p->k, a->lora) || LINEAR(a->v, a->nl, p->v, a->lora))
		return -1;
	if (sd_attention(a->o, a->q, a->k, a->v, 1, 1.0f / sqrtf((float)p->c), 0, a->probs)) return -1;
	if (LINEAR(a->p, a->o, p->out, a->lora) || sd_nlc_to_nchw(out, a->p)) return -1;
	return sd_add(out, out, x, 1.0f, 1.0f); /* residual_connection, rescale_output_factor 1 */
}

int sd_vae_down_forward(sd_tensor *out, const sd_tensor *x, const sd_vae_conv *conv)
{
	/* Downsample2D(padding=0): F.pad(x, (0, 1, 0, 1)) then a 3×3 stride-2 conv without padding */
	return sd_conv2d(out, x, conv->w, conv->b, 2, 0, 1, 0, 1);
}

int sd_vae_up_forward(sd_tensor *out, sd_tensor *up, const sd_tensor *x, const sd_vae_conv *conv)
{
	if (sd_upsample2x(up, x)) return -1;
	return sd_conv2d(out, up, conv->w, conv->b, 1, 1, 1, 1, 1);
}

/* ==== block backwards ==== */

/* A scratch tensor shaped like `like` from the arena. */
static sd_tensor *tmp_like(sd_arena *a, const sd_tensor *like)
{
	sd_tensor *t = sd_arena_alloc(a, sizeof *t);
	if (!t) return NULL;
	*t = *like;
	t->owns = 0;
	t->aux = NULL;
	t->aux_free = NULL;
	size_t bytes = sd_tensor_nbytes(t);
	return (t->data = sd_arena_alloc(a, bytes ? bytes : 1)) ? t : NULL;
}

int sd_vae_resnet_backward(sd_tensor *dx, const sd_tensor *dout, const sd_vae_resnet_act *a, const sd_tensor *x,
                           const sd_vae_resnet *p, int groups, float eps, sd_arena *s, int acc)
{
	// out = conv2(silu(norm2(conv1(silu(norm1(x)))))) + (shortcut(x) or x);  dout (N,Cout,H,W) → dx (N,Cin,H,W)
	sd_tensor *dh2 = tmp_like(s, a->h2), *da1 = tmp_like(s, a->a1), *dh1 = tmp_like(s, a->h1);
	if (!dh2 || !da1 || !dh1) return -1;
	if (sd_conv2d_backward(dh2, dout, p->conv2.w, 1, 1, 1, 1, 1, 0) ||
	    sd_group_norm_backward(da1, NULL, NULL, dh2, a->a1, groups, p->norm2_w, p->norm2_b, eps, 1, 0) ||
	    sd_conv2d_backward(dh1, da1, p->conv1.w, 1, 1, 1, 1, 1, 0))
		return -1;
	if (p->shortcut.w) {
		if (sd_conv2d_backward(dx, dout, p->shortcut.w, 1, 0, 0, 0, 0, acc)) return -1;
	} else if (acc ? sd_add(dx, dx, dout, 1.0f, 1.0f) : sd_tensor_copy(dx, dout))
		return -1;
	return sd_group_norm_backward(dx, NULL, NULL, dh1, x, groups, p->norm1_w, p->norm1_b, eps, 1, 1);
}

int sd_vae_attn_backward(sd_tensor *dx, const sd_tensor *dout, const sd_vae_attn_act *a, const sd_tensor *x,
                         const sd_vae_attn *p, int groups, float eps, sd_arena *s, int acc)
{
	// out = x + nchw(to_out(attention(to_q(nl), to_k(nl), to_v(nl)))), nl = nlc(norm(x))
	sd_tensor *dp = tmp_like(s, a->p), *d_o = tmp_like(s, a->o), *dq = tmp_like(s, a->q), *dk = tmp_like(s, a->k);
	sd_tensor *dv = tmp_like(s, a->v), *dnl = tmp_like(s, a->nl), *dn = tmp_like(s, a->n);
	if (!dp || !d_o || !dq || !dk || !dv || !dnl || !dn) return -1;
	if (sd_nlc_to_nchw_backward(dp, dout, 0) ||
	    sd_lora_train_backward(d_o, dp, a->o, p->out.w, p->out.lora, p->out.train, 0) ||
	    sd_attention_backward(dq, dk, dv, d_o, a->q, a->k, a->v, a->probs, 1, 1.0f / sqrtf((float)p->c), 0, 0) ||
	    sd_lora_train_backward(dnl, dq, a->nl, p->q.w, p->q.lora, p->q.train, 0) ||
	    sd_lora_train_backward(dnl, dk, a->nl, p->k.w, p->k.lora, p->k.train, 1) ||
	    sd_lora_train_backward(dnl, dv, a->nl, p->v.w, p->v.lora, p->v.train, 1))
		return -1;
	if (!dx) return 0;
	if (sd_nchw_to_nlc_backward(dn, dnl, 0) || (acc ? sd_add(dx, dx, dout, 1.0f, 1.0f) : sd_tensor_copy(dx, dout)))
		return -1;
	return sd_group_norm_backward(dx, NULL, NULL, dn, x, groups, p->norm_w, p->norm_b, eps, 0, 1);
}

/* ==== the model ==== */

#define MAX_SLABS 64
#define MAX_VIEWS 16

/* Inference scratch: device buffers handed out and given back while the network walks. */
struct slab {
	float *p;
	size_t cap; /* floats */
	int busy;
};

struct sd_vae {
	sd_vae_config cfg;
	enum sd_device dev;
	const struct sd_backend *be;
	const sd_weights *w;
	sd_vae_conv enc_in, enc_out, quant, post_quant, dec_in, dec_out;
	const sd_tensor *enc_norm_w, *enc_norm_b, *dec_norm_w, *dec_norm_b;
	sd_vae_resnet *enc_res; /* nblocks·L down-block resnets, then the mid block's two */
	sd_vae_resnet *dec_res; /* the mid block's two, then nblocks·(L+1) up-block resnets */
	int n_enc_res, n_dec_res;
	sd_vae_conv down[SD_VAE_MAX_BLOCKS], up[SD_VAE_MAX_BLOCKS];
	sd_vae_attn enc_attn, dec_attn;
	sd_tensor views[MAX_VIEWS]; /* 2-D views of attention weights stored as 1×1 convs */
	int nviews;
	sd_arena *arena; /* tensor headers of one call */
	sd_arena *bw[3]; /* sd_vae_encode_backward: the flowing gradient (two, in turn) and per-layer scratch */
	struct slab slab[MAX_SLABS];
	int nslab;
	size_t pool_bytes, pool_peak, peak;
	sd_vae_hook hook;
	void *hook_ctx;
	/* sd_vae_new_random: weights made on demand and owned here */
	int random;
	uint64_t seed;
	sd_tensor **owned;
	int nowned;
};

/* ---- weights ---- */

static char *shape_s(const sd_tensor *t, char *b, size_t n)
{
	return sd_shape_str(t->ndim, t->shape, b, n);
}

/* splitmix64 → uniform in [-1, 1) */
static float uniform(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	z ^= z >> 31;
	return (float)((z >> 40) * (1.0 / 8388608.0) - 1.0);
}

/* A random weight for sd_vae_new_random: convolutions and linears uniform with the variance of
 * torch's default init (±1/sqrt(fan_in)), norm scales 1 ± 0.1, biases ± 0.1. */
static const sd_tensor *random_weight(sd_vae *v, const char *suffix, int nd, const int64_t *shape)
{
	sd_tensor *t = sd_tensor_new(SD_DTYPE_F32, nd, shape), **o;
	if (!t) return NULL;
	float *p = t->data, a = 0.1f, c = 0.0f;
	int64_t n = sd_tensor_numel(t);
	if (nd > 1) a = 1.0f / sqrtf((float)(n / shape[0]));
	else if (!strcmp(suffix, "weight")) c = 1.0f;
	for (int64_t i = 0; i < n; i++) p[i] = c + a * uniform(&v->seed);
	if (v->dev != SD_DEVICE_CPU) {
		sd_tensor *d = sd_tensor_to_device(t, v->dev);
		sd_tensor_free(t);
		if (!(t = d)) return NULL;
	}
	if (!(o = realloc(v->owned, (v->nowned + 1) * sizeof *o))) {
		sd_tensor_free(t);
		sd_seterr("out of memory");
		return NULL;
	}
	v->owned = o;
	return o[v->nowned++] = t;
}

/* The weight "<prefix>.<suffix>" of exactly the given shape (dims ≤ 0 end it). */
static const sd_tensor *weight(sd_vae *v, const char *prefix, const char *suffix, int64_t d0, int64_t d1,
                             int64_t d2, int64_t d3)
{
	int64_t want[4] = {d0, d1, d2, d3};
	int nd = 0;
	while (nd < 4 && want[nd] > 0) nd++;
	if (v->random) return random_weight(v, suffix, nd, want);
	const sd_tensor *t = sd_weights_need(v->w, "%s.%s", prefix, suffix);
	if (!t) return NULL;
	/* matrices and kernels may be kept as stored (f16, bf16: sd_weights_load_stored), vectors are f32 */
	int ok = t->ndim == nd &&
	         (t->dtype == SD_DTYPE_F32 || (nd >= 2 && (t->dtype == SD_DTYPE_F16 || t->dtype == SD_DTYPE_BF16)));
	for (int i = 0; ok && i < nd; i++) ok = t->shape[i] == want[i];
	if (!ok) {
		char a[96], b[96];
		sd_seterr("vae: weight '%s.%s' is %s %s, expected f32 %s", prefix, suffix, sd_dtype_name(t->dtype),
		          shape_s(t, a, sizeof a), sd_shape_str(nd, want, b, sizeof b));
		return NULL;
	}
	return t;
}

static int get_conv(sd_vae *v, sd_vae_conv *c, const char *prefix, int64_t O, int64_t C, int k)
{
	return (c->w = weight(v, prefix, "weight", O, C, k, k)) && (c->b = weight(v, prefix, "bias", O, 0, 0, 0)) ? 0 : -1;
}

static int get_norm(sd_vae *v, const sd_tensor **g, const sd_tensor **b, const char *prefix, int64_t C)
{
	if (C % v->cfg.groups)
		return sd_seterr("vae: %s: %lld channels do not split into %d groups", prefix, (long long)C, v->cfg.groups);
	return (*g = weight(v, prefix, "weight", C, 0, 0, 0)) && (*b = weight(v, prefix, "bias", C, 0, 0, 0)) ? 0 : -1;
}

static int get_resnet(sd_vae *v, sd_vae_resnet *r, const char *prefix, int cin, int cout)
{
	char s[160];
	r->cin = cin;
	r->cout = cout;
	memset(&r->shortcut, 0, sizeof r->shortcut);
	snprintf(s, sizeof s, "%s.norm1", prefix);
	if (get_norm(v, &r->norm1_w, &r->norm1_b, s, cin)) return -1;
	snprintf(s, sizeof s, "%s.conv1", prefix);
	if (get_conv(v, &r->conv1, s, cout, cin, 3)) return -1;
	snprintf(s, sizeof s, "%s.norm2", prefix);
	if (get_norm(v, &r->norm2_w, &r->norm2_b, s, cout)) return -1;
	snprintf(s, sizeof s, "%s.conv2", prefix);
	if (get_conv(v, &r->conv2, s, cout, cout, 3)) return -1;
	if (cin != cout) {
		snprintf(s, sizeof s, "%s.conv_shortcut", prefix);
		if (get_conv(v, &r->shortcut, s, cout, cin, 1)) return -1;
	}
	return 0;
}

/* A linear C→C of the attention: "<prefix>.<name>" or its pre-0.14 name, (C,C) or (C,C,1,1). */
static int get_linear(sd_vae *v, sd_vae_conv *c, const char *prefix, const char *name, const char *old, int64_t C)
{
	char s[160];
	if (v->random) {
		snprintf(s, sizeof s, "%s.%s", prefix, name);
		return (c->w = weight(v, s, "weight", C, C, 0, 0)) && (c->b = weight(v, s, "bias", C, 0, 0, 0)) ? 0 : -1;
	}
	snprintf(s, sizeof s, "%s.%s.weight", prefix, name);
	const sd_tensor *w = sd_weights_get(v->w, s);
	const char *use = name;
	if (!w) {
		snprintf(s, sizeof s, "%s.%s.weight", prefix, old);
		if ((w = sd_weights_get(v->w, s))) use = old;
	}
	snprintf(s, sizeof s, "%s.%s", prefix, use);
	if (w && w->ndim == 4 && w->shape[2] == 1 && w->shape[3] == 1) {
		if (!weight(v, s, "weight", C, C, 1, 1)) return -1;
		if (v->nviews == MAX_VIEWS) return sd_seterr("vae: too many attention weights");
		sd_tensor *t = &v->views[v->nviews++];
		*t = *w;
		t->ndim = 2;
		t->owns = 0;
		c->w = t;
	} else if (!(c->w = weight(v, s, "weight", C, C, 0, 0)))
		return -1;
	return (c->b = weight(v, s, "bias", C, 0, 0, 0)) ? 0 : -1;
}

static int get_attn(sd_vae *v, sd_vae_attn *a, const char *prefix, int C)
{
	char s[160];
	a->c = C;
	snprintf(s, sizeof s, "%s.group_norm", prefix);
	if (get_norm(v, &a->norm_w, &a->norm_b, s, C)) return -1;
	return get_linear(v, &a->q, prefix, "to_q", "query", C) || get_linear(v, &a->k, prefix, "to_k", "key", C) ||
	               get_linear(v, &a->v, prefix, "to_v", "value", C) ||
	               get_linear(v, &a->out, prefix, "to_out.0", "proj_attn", C)
	           ? -1
	           : 0;
}

/* ---- config ---- */

/* An int from the config, else `def`; -1 with a message when present but not an integer. */
static int cfg_int(const sd_weights *w, const char *key, int def, int *out)
{
	int64_t x;
	int rc = sd_config_int(w, key, &x);
	if (rc < 0) return sd_preerr("vae: config");
	if (rc == 0 && (x < 1 || x > 1 << 20)) return sd_seterr("vae: config: %s = %lld is out of range", key, (long long)x);
	*out = rc == 0 ? (int)x : def;
	return 0;
}

static int cfg_bool(const sd_weights *w, const char *key, int def, int *out)
{
	int rc = sd_config_bool(w, key, out);
	if (rc < 0) return sd_preerr("vae: config");
	if (rc) *out = def;
	return 0;
}

static int read_config(sd_vae *v)
{
	sd_vae_config *c = &v->cfg;
	const sd_weights *w = v->w;
	char s[160];
	int64_t arr[SD_VAE_MAX_BLOCKS + 1];
	int n = 0, rc = sd_config_int_array(w, "block_out_channels", arr, SD_VAE_MAX_BLOCKS + 1, &n);
	if (rc < 0) return sd_preerr("vae: config");
	if (rc == 1) { /* no config: count the encoder's down blocks */
		for (n = 0; n <= SD_VAE_MAX_BLOCKS; n++) {
			snprintf(s, sizeof s, "encoder.down_blocks.%d.resnets.0.conv1.weight", n);
			const sd_tensor *t = sd_weights_get(w, s);
			if (!t) break;
			arr[n] = t->ndim == 4 ? t->shape[0] : 0;
		}
	}
	if (n < 1 || n > SD_VAE_MAX_BLOCKS)
		return sd_seterr("vae: %d blocks (block_out_channels), expected 1 to %d", n, SD_VAE_MAX_BLOCKS);
	c->nblocks = n;
	for (int i = 0; i < n; i++) {
		if (arr[i] < 1 || arr[i] > 1 << 16) return sd_seterr("vae: block_out_channels[%d] = %lld is out of range", i, (long long)arr[i]);
		c->block_out[i] = (int)arr[i];
	}
	int lpb = 0;
	while (lpb < 64) {
		snprintf(s, sizeof s, "encoder.down_blocks.0.resnets.%d.conv1.weight", lpb);
		if (!sd_weights_get(w, s)) break;
		lpb++;
	}
	if (cfg_int(w, "layers_per_block", lpb ? lpb : 2, &c->layers_per_block) ||
	    cfg_int(w, "norm_num_groups", 32, &c->groups))
		return -1;
	if (n * c->layers_per_block + 2 > SD_VAE_MAX_RESNETS)
		return sd_seterr("vae: %d blocks of %d layers: more than %d resnets", n, c->layers_per_block,
		                 SD_VAE_MAX_RESNETS - 2);
	const sd_tensor *t = sd_weights_need(w, "encoder.conv_in.weight");
	if (!t) return -1;
	int in = t->ndim == 4 ? (int)t->shape[1] : 3;
	if (!(t = sd_weights_need(w, "decoder.conv_out.weight"))) return -1;
	int out = t->ndim == 4 ? (int)t->shape[0] : 3;
	if (!(t = sd_weights_need(w, "decoder.conv_in.weight"))) return -1;
	int lat = t->ndim == 4 ? (int)t->shape[1] : 4;
	if (cfg_int(w, "in_channels", in, &c->in_channels) || cfg_int(w, "out_channels", out, &c->out_channels) ||
	    cfg_int(w, "latent_channels", lat, &c->latent_channels))
		return -1;
	double sf = 0.18215;
	if ((rc = sd_config_float(w, "scaling_factor", &sf)) < 0) return sd_preerr("vae: config");
	if (!(sf > 0 && isfinite(sf))) return sd_seterr("vae: config: scaling_factor %g is not positive", sf);
	c->scaling_factor = (float)sf;
	c->eps = 1e-6f; /* Encoder/Decoder fix resnet_eps and conv_norm_out's eps at 1e-6 */
	if (cfg_bool(w, "use_quant_conv", sd_weights_get(w, "quant_conv.weight") != NULL, &c->quant_conv) ||
	    cfg_bool(w, "use_post_quant_conv", sd_weights_get(w, "post_quant_conv.weight") != NULL, &c->post_quant_conv) ||
	    cfg_bool(w, "mid_block_add_attention", 1, &c->mid_attention))
		return -1;
	return 0;
}

static int build(sd_vae *v)
{
	const sd_vae_config *c = &v->cfg;
	int nb = c->nblocks, L = c->layers_per_block, top = c->block_out[nb - 1], lat = c->latent_channels;
	char s[160];
	v->n_enc_res = nb * L + 2;
	v->n_dec_res = 2 + nb * (L + 1);
	v->enc_res = calloc(v->n_enc_res, sizeof *v->enc_res);
	v->dec_res = calloc(v->n_dec_res, sizeof *v->dec_res);
	if (!v->enc_res || !v->dec_res) return sd_seterr("out of memory");

	/* encoder */
	if (get_conv(v, &v->enc_in, "encoder.conv_in", c->block_out[0], c->in_channels, 3)) return -1;
	int k = 0, ch = c->block_out[0];
	for (int b = 0; b < nb; b++) {
		for (int l = 0; l < L; l++, k++) {
			snprintf(s, sizeof s, "encoder.down_blocks.%d.resnets.%d", b, l);
			if (get_resnet(v, &v->enc_res[k], s, ch, c->block_out[b])) return -1;
			ch = c->block_out[b];
		}
		if (b < nb - 1) {
			snprintf(s, sizeof s, "encoder.down_blocks.%d.downsamplers.0.conv", b);
			if (get_conv(v, &v->down[b], s, ch, ch, 3)) return -1;
		}
	}
	for (int i = 0; i < 2; i++, k++) {
		snprintf(s, sizeof s, "encoder.mid_block.resnets.%d", i);
		if (get_resnet(v, &v->enc_res[k], s, top, top)) return -1;
	}
	if (c->mid_attention && get_attn(v, &v->enc_attn, "encoder.mid_block.attentions.0", top)) return -1;
	if (get_norm(v, &v->enc_norm_w, &v->enc_norm_b, "encoder.conv_norm_out", top) ||
	    get_conv(v, &v->enc_out, "encoder.conv_out", 2 * lat, top, 3))
		return -1;
	if (c->quant_conv && get_conv(v, &v->quant, "quant_conv", 2 * lat, 2 * lat, 1)) return -1;

	/* decoder: blocks in reverse channel order, L+1 resnets each, an upsampler on all but the last */
	if (c->post_quant_conv && get_conv(v, &v->post_quant, "post_quant_conv", lat, lat, 1)) return -1;
	if (get_conv(v, &v->dec_in, "decoder.conv_in", top, lat, 3)) return -1;
	for (k = 0; k < 2; k++) {
		snprintf(s, sizeof s, "decoder.mid_block.resnets.%d", k);
		if (get_resnet(v, &v->dec_res[k], s, top, top)) return -1;
	}
	if (c->mid_attention && get_attn(v, &v->dec_attn, "decoder.mid_block.attentions.0", top)) return -1;
	ch = top;
	for (int b = 0; b < nb; b++) {
		int oc = c->block_out[nb - 1 - b];
		for (int l = 0; l < L + 1; l++, k++) {
			snprintf(s, sizeof s, "decoder.up_blocks.%d.resnets.%d", b, l);
			if (get_resnet(v, &v->dec_res[k], s, ch, oc)) return -1;
			ch = oc;
		}
		if (b < nb - 1) {
			snprintf(s, sizeof s, "decoder.up_blocks.%d.upsamplers.0.conv", b);
			if (get_conv(v, &v->up[b], s, ch, ch, 3)) return -1;
		}
	}
	if (get_norm(v, &v->dec_norm_w, &v->dec_norm_b, "decoder.conv_norm_out", ch) ||
	    get_conv(v, &v->dec_out, "decoder.conv_out", c->out_channels, ch, 3))
		return -1;
	return 0;
}

sd_vae *sd_vae_new(const sd_weights *w)
{
	if (!w) {
		sd_seterr("vae: no weights");
		return NULL;
	}
	if (sd_weights_component(w) != SD_VAE) {
		sd_seterr("vae: the weights are those of the %s", sd_component_name(sd_weights_component(w)));
		return NULL;
	}
	sd_vae *v = calloc(1, sizeof *v);
	if (!v) {
		sd_seterr("out of memory");
		return NULL;
	}
	v->w = w;
	const sd_tensor *any = sd_weights_count(w) > 0 ? sd_weights_at(w, 0) : NULL;
	v->dev = any ? any->device : SD_DEVICE_CPU;
	if (!(v->be = sd_backend_get(v->dev)) || read_config(v) || build(v) ||
	    !(v->arena = sd_arena_new(SD_DEVICE_CPU, 1 << 16))) { /* headers only: host memory */
		sd_vae_free(v);
		return NULL;
	}
	return v;
}

sd_vae *sd_vae_new_random(const sd_vae_config *c, enum sd_device dev, uint64_t seed)
{
	if (c->nblocks < 1 || c->nblocks > SD_VAE_MAX_BLOCKS || c->layers_per_block < 1 ||
	    c->nblocks * c->layers_per_block + 2 > SD_VAE_MAX_RESNETS || c->groups < 1 || c->in_channels < 1 ||
	    c->out_channels < 1 || c->latent_channels < 1) {
		sd_seterr("vae: a random VAE of impossible sizes");
		return NULL;
	}
	sd_vae *v = calloc(1, sizeof *v);
	if (!v) {
		sd_seterr("out of memory");
		return NULL;
	}
	v->cfg = *c;
	v->dev = dev;
	v->random = 1;
	v->seed = seed;
	if (!(v->be = sd_backend_get(dev)) || build(v) || !(v->arena = sd_arena_new(SD_DEVICE_CPU, 1 << 16))) {
		sd_vae_free(v);
		return NULL;
	}
	return v;
}

static void pool_trim(sd_vae *v, size_t below);

void sd_vae_free(sd_vae *v)
{
	if (!v) return;
	for (int i = 0; i < 3; i++) sd_arena_free(v->bw[i]);
	pool_trim(v, (size_t)-1);
	for (int i = 0; i < v->nowned; i++) sd_tensor_free(v->owned[i]);
	free(v->owned);
	sd_arena_free(v->arena);
	free(v->enc_res);
	free(v->dec_res);
	free(v);
}

const sd_vae_config *sd_vae_get_config(const sd_vae *v)
{
	return &v->cfg;
}

int sd_vae_factor(const sd_vae *v)
{
	return 1 << (v->cfg.nblocks - 1);
}

const sd_vae_resnet *sd_vae_encoder_resnet(const sd_vae *v, int i)
{
	return i >= 0 && i < v->n_enc_res ? &v->enc_res[i] : NULL;
}

const sd_vae_attn *sd_vae_encoder_attn(const sd_vae *v)
{
	return v->cfg.mid_attention ? &v->enc_attn : NULL;
}

sd_vae_conv *sd_vae_find_linear(sd_vae *v, const char *module)
{
	static const char *const names[4][2] = {{"to_q", "query"}, {"to_k", "key"}, {"to_v", "value"},
	                                        {"to_out.0", "proj_attn"}};
	if (!v->cfg.mid_attention) return NULL;
	sd_vae_attn *a;
	const char *s;
	if (!strncmp(module, "encoder.mid_block.attentions.0.", 31)) a = &v->enc_attn, s = module + 31;
	else if (!strncmp(module, "decoder.mid_block.attentions.0.", 31)) a = &v->dec_attn, s = module + 31;
	else return NULL;
	sd_vae_conv *l[4] = {&a->q, &a->k, &a->v, &a->out};
	for (int k = 0; k < 4; k++)
		if (!strcmp(s, names[k][0]) || !strcmp(s, names[k][1])) return l[k];
	return NULL;
}

static int attn_lora_rank(const sd_vae_attn *a)
{
	int r = sd_lora_rank(a->q.lora);
	if (sd_lora_rank(a->k.lora) > r) r = sd_lora_rank(a->k.lora);
	if (sd_lora_rank(a->v.lora) > r) r = sd_lora_rank(a->v.lora);
	if (sd_lora_rank(a->out.lora) > r) r = sd_lora_rank(a->out.lora);
	return r;
}

size_t sd_vae_peak_bytes(const sd_vae *v)
{
	return v->peak;
}

void sd_vae_set_hook(sd_vae *v, sd_vae_hook fn, void *ctx)
{
	v->hook = fn;
	v->hook_ctx = ctx;
}

/* ==== scratch ==== */

/* Free the idle slabs smaller than `below` floats (all idle ones with (size_t)-1). */
static void pool_trim(sd_vae *v, size_t below)
{
	int j = 0;
	for (int i = 0; i < v->nslab; i++) {
		if (!v->slab[i].busy && v->slab[i].cap < below) {
			v->be->free(v->slab[i].p);
			v->pool_bytes -= v->slab[i].cap * sizeof(float);
		} else
			v->slab[j++] = v->slab[i];
	}
	v->nslab = j;
}

/*
 * A buffer of n floats on the VAE's device: the smallest idle slab that holds n without wasting more
 * than 3/4 of itself, else a new slab (after freeing the idle ones too small for n: activations grow
 * through the decoder, so those would only pile up).  Slabs stay cached between calls.
 */
static float *pool_get(sd_vae *v, size_t n)
{
	int best = -1;
	for (int i = 0; i < v->nslab; i++) {
		const struct slab *s = &v->slab[i];
		if (!s->busy && s->cap >= n && s->cap / 4 <= n && (best < 0 || s->cap < v->slab[best].cap)) best = i;
	}
	if (best < 0) {
		pool_trim(v, n);
		if (v->nslab == MAX_SLABS) {
			sd_seterr("vae: too many scratch buffers");
			return NULL;
		}
		float *p = v->be->alloc((n ? n : 1) * sizeof(float));
		if (!p) return NULL;
		best = v->nslab++;
		v->slab[best] = (struct slab){p, n, 0};
		v->pool_bytes += n * sizeof(float);
		if (v->pool_bytes > v->pool_peak) v->pool_peak = v->pool_bytes;
	}
	v->slab[best].busy = 1;
	return v->slab[best].p;
}

static void pool_put(sd_vae *v, const void *p)
{
	for (int i = 0; i < v->nslab; i++)
		if (v->slab[i].p == p) v->slab[i].busy = 0;
}

/* One forward: where its tensors come from. */
typedef struct run {
	sd_vae *v;
	sd_arena *a;   /* host: headers of pool buffers */
	sd_arena *rec; /* when recording: every activation is its own tensor from this arena, kept */
	int hook;      /* call v->hook with module outputs */
} run;

/* A header in the arena over data (NULL data: the header only). */
static sd_tensor *hdr(run *r, float *data, int64_t N, int64_t C, int64_t H, int64_t W)
{
	sd_tensor *t = sd_arena_alloc(r->a, sizeof *t);
	if (!t) return NULL;
	memset(t, 0, sizeof *t);
	t->dtype = SD_DTYPE_F32;
	t->device = r->v->dev;
	t->data = data;
	int64_t sh[4] = {N, C, H, W};
	t->ndim = W > 0 ? 4 : 3;
	memcpy(t->shape, sh, sizeof sh);
	return t;
}

/* A new activation (N,C,H,W) (or (N,C,H) when W is 0). */
static sd_tensor *act_new(run *r, int64_t N, int64_t C, int64_t H, int64_t W)
{
	size_t n = (size_t)(N * C * H * (W > 0 ? W : 1));
	if (r->rec) {
		int64_t sh[4] = {N, C, H, W};
		return sd_arena_tensor(r->rec, SD_DTYPE_F32, W > 0 ? 4 : 3, sh);
	}
	float *p = pool_get(r->v, n);
	return p ? hdr(r, p, N, C, H, W) : NULL;
}

static void drop(run *r, const sd_tensor *t)
{
	if (!r->rec && t) pool_put(r->v, t->data);
}

static void hook(run *r, const char *name, const sd_tensor *t)
{
	if (r->hook) r->v->hook(r->v->hook_ctx, name, t);
}

#define N_(t) ((t)->shape[0])
#define C_(t) ((t)->shape[1])
#define H_(t) ((t)->shape[2])
#define W_(t) ((t)->shape[3])

/* ==== composed forwards ==== */

/* x → resnet(x); x stays alive (the caller drops it).  rec: where to keep the activations. */
static sd_tensor *resnet(run *r, const sd_vae_resnet *p, const sd_tensor *x, sd_vae_resnet_act *rec)
{
	const sd_vae_config *c = &r->v->cfg;
	int64_t N = N_(x), H = H_(x), W = W_(x), ci = p->cin, co = p->cout;
	sd_vae_resnet_act a = {0};
	sd_tensor *out;
	if (r->rec) {
		if (!(a.n1 = act_new(r, N, ci, H, W)) || !(a.h1 = act_new(r, N, ci, H, W)) ||
		    !(a.a1 = act_new(r, N, co, H, W)) || !(a.n2 = act_new(r, N, co, H, W)) ||
		    !(a.h2 = act_new(r, N, co, H, W)) || (p->shortcut.w && !(a.sc = act_new(r, N, co, H, W))) ||
		    !(out = act_new(r, N, co, H, W)))
			return NULL;
		*rec = a;
	} else {
		/* two buffers: b1 = n1 = h1, later out; b2 = a1 = n2 = h2, later sc */
		sd_tensor *b1 = act_new(r, N, ci > co ? ci : co, H, W), *b2 = b1 ? act_new(r, N, co, H, W) : NULL;
		if (!b2) {
			drop(r, b1);
			return NULL;
		}
		if (!(a.n1 = a.h1 = hdr(r, b1->data, N, ci, H, W)) || !(out = hdr(r, b1->data, N, co, H, W))) return NULL;
		a.a1 = a.n2 = a.h2 = b2;
		a.sc = p->shortcut.w ? b2 : NULL;
	}
	int rc = sd_vae_resnet_forward(out, &a, x, p, c->groups, c->eps);
	drop(r, a.a1);
	if (rc) {
		drop(r, out);
		return NULL;
	}
	return out;
}

static sd_tensor *attention(run *r, const sd_vae_attn *p, const sd_tensor *x, sd_vae_attn_act *rec)
{
	const sd_vae_config *c = &r->v->cfg;
	int64_t N = N_(x), C = C_(x), L = H_(x) * W_(x);
	sd_vae_attn_act a = {0};
	sd_tensor *out;
	if (r->rec) {
		if (!(a.n = act_new(r, N, C, H_(x), W_(x))) || !(a.nl = act_new(r, N, L, C, 0)) ||
		    !(a.q = act_new(r, N, L, C, 0)) || !(a.k = act_new(r, N, L, C, 0)) || !(a.v = act_new(r, N, L, C, 0)) ||
		    !(a.o = act_new(r, N, L, C, 0)) || !(a.p = act_new(r, N, L, C, 0)) ||
		    !(a.probs = act_new(r, N, 1, L, L)) || !(out = act_new(r, N, C, H_(x), W_(x))))
			return NULL;
		*rec = a;
	} else {
		/* four buffers: n → q → p, nl → o, k → out, v */
		sd_tensor *b1 = act_new(r, N, C, H_(x), W_(x)), *b2 = b1 ? act_new(r, N, L, C, 0) : NULL;
		sd_tensor *b3 = b2 ? act_new(r, N, C, H_(x), W_(x)) : NULL, *b4 = b3 ? act_new(r, N, L, C, 0) : NULL;
		if (!b4 || !(a.q = hdr(r, b1->data, N, L, C, 0)) || !(a.p = hdr(r, b1->data, N, L, C, 0)) ||
		    !(a.k = hdr(r, b3->data, N, L, C, 0))) {
			drop(r, b1), drop(r, b2), drop(r, b3), drop(r, b4);
			return NULL;
		}
		a.n = b1;
		a.nl = a.o = b2;
		a.v = b4;
		out = b3;
	}
	const int rank = attn_lora_rank(p);
	if (rank && !(a.lora = act_new(r, N, L, rank, 0))) {
		if (!r->rec) drop(r, a.n), drop(r, a.nl), drop(r, a.v), drop(r, out);
		return NULL;
	}
	if (rec) rec->lora = a.lora;
	int rc = sd_vae_attn_forward(out, &a, x, p, c->groups, c->eps);
	drop(r, a.n), drop(r, a.nl), drop(r, a.v), drop(r, a.lora);
	if (rc) {
		drop(r, out);
		return NULL;
	}
	return out;
}

/* y = f(x) then x given back; the idiom of a chain of layers. */
#define STEP(y, expr) do { sd_tensor *y_ = (expr); drop(r, x); x = y_; if (!x) return NULL; } while (0)

/* conv_norm_out → SiLU → conv_out (fused unless recorded or hooked: hooks see the norm's output). */
static sd_tensor *head(run *r, sd_tensor *x, const sd_tensor *g, const sd_tensor *b, const sd_vae_conv *conv,
                       const char *norm_name, const char *out_name, sd_tensor **rn, sd_tensor **ra)
{
	const sd_vae_config *c = &r->v->cfg;
	int64_t N = N_(x), C = C_(x), H = H_(x), W = W_(x);
	sd_tensor *n = act_new(r, N, C, H, W), *s = n, *y;
	if (!n) return NULL;
	if (r->rec || r->hook) {
		if (sd_group_norm(n, x, c->groups, g, b, c->eps, 0)) return NULL;
		hook(r, norm_name, n);
		if (r->rec && !(s = act_new(r, N, C, H, W))) return NULL;
		if (sd_act(s, n, SD_ACT_SILU)) return NULL;
	} else if (sd_group_norm(n, x, c->groups, g, b, c->eps, 1))
		return NULL;
	if (rn) *rn = n, *ra = s;
	if (!(y = act_new(r, N, conv->w->shape[0], H, W))) return NULL;
	if (sd_conv2d(y, s, conv->w, conv->b, 1, 1, 1, 1, 1)) return NULL;
	drop(r, n);
	hook(r, out_name, y);
	return y;
}

static sd_tensor *conv1x1(run *r, const sd_tensor *x, const sd_vae_conv *conv, const char *name)
{
	sd_tensor *y = act_new(r, N_(x), conv->w->shape[0], H_(x), W_(x));
	if (!y || sd_conv2d(y, x, conv->w, conv->b, 1, 0, 0, 0, 0)) return NULL;
	hook(r, name, y);
	return y;
}

/* moments = quant_conv(encoder(x)); x (N,in,H,W) on the device, not dropped. */
static sd_tensor *encoder(run *r, const sd_tensor *in, sd_vae_enc_act *rec)
{
	sd_vae *v = r->v;
	const sd_vae_config *c = &v->cfg;
	char name[64];
	sd_tensor *x = act_new(r, N_(in), c->block_out[0], H_(in), W_(in));
	if (!x || sd_conv2d(x, in, v->enc_in.w, v->enc_in.b, 1, 1, 1, 1, 1)) return NULL;
	hook(r, "encoder.conv_in", x);
	if (rec) rec->conv_in = x;
	int k = 0;
	for (int b = 0; b < c->nblocks; b++) {
		for (int l = 0; l < c->layers_per_block; l++, k++) {
			if (rec) rec->res_in[k] = x;
			STEP(y, resnet(r, &v->enc_res[k], x, rec ? &rec->res[k] : NULL));
			if (rec) rec->res_out[k] = x;
		}
		if (b < c->nblocks - 1) {
			sd_tensor *y = act_new(r, N_(x), C_(x), (H_(x) + 1) / 2, (W_(x) + 1) / 2);
			if (!y || sd_vae_down_forward(y, x, &v->down[b])) return NULL;
			drop(r, x);
			x = y;
			if (rec) rec->down[b] = x;
		}
		snprintf(name, sizeof name, "encoder.down_blocks.%d", b);
		hook(r, name, x);
	}
	if (rec) rec->res_in[k] = x;
	STEP(y, resnet(r, &v->enc_res[k], x, rec ? &rec->res[k] : NULL));
	if (rec) rec->res_out[k] = x;
	k++;
	if (c->mid_attention) {
		STEP(y, attention(r, &v->enc_attn, x, rec ? &rec->attn : NULL));
		if (rec) rec->attn_out = x;
	}
	if (rec) rec->res_in[k] = x;
	STEP(y, resnet(r, &v->enc_res[k], x, rec ? &rec->res[k] : NULL));
	if (rec) rec->res_out[k] = x;
	hook(r, "encoder.mid_block", x);
	STEP(y, head(r, x, v->enc_norm_w, v->enc_norm_b, &v->enc_out, "encoder.conv_norm_out", "encoder.conv_out",
	             rec ? &rec->norm_out : NULL, rec ? &rec->act_out : NULL));
	if (rec) rec->conv_out = rec->moments = x;
	if (c->quant_conv) {
		STEP(y, conv1x1(r, x, &v->quant, "quant_conv"));
		if (rec) rec->moments = x;
	}
	return x;
}

/* decoder(post_quant_conv(z)); z (N,L,h,w) on the device, not dropped.  rec: where to keep the
 * activations (sd_vae_decode_record). */
static sd_tensor *decoder(run *r, const sd_tensor *z, sd_vae_dec_act *rec)
{
	sd_vae *v = r->v;
	const sd_vae_config *c = &v->cfg;
	char name[64];
	const sd_tensor *in = z;
	sd_tensor *pq = NULL, *x;
	if (c->post_quant_conv) {
		if (!(pq = conv1x1(r, z, &v->post_quant, "post_quant_conv"))) return NULL;
		in = pq;
	}
	if (rec) rec->pq = pq;
	x = act_new(r, N_(in), v->dec_in.w->shape[0], H_(in), W_(in));
	if (!x || sd_conv2d(x, in, v->dec_in.w, v->dec_in.b, 1, 1, 1, 1, 1)) return NULL;
	drop(r, pq);
	hook(r, "decoder.conv_in", x);
	if (rec) rec->conv_in = x;
#define DRES(k) do {                                                     \
		if (rec) rec->res_in[k] = x;                                     \
		STEP(y, resnet(r, &v->dec_res[k], x, rec ? &rec->res[k] : NULL)); \
		if (rec) rec->res_out[k] = x;                                    \
	} while (0)
	DRES(0);
	if (c->mid_attention) {
		STEP(y, attention(r, &v->dec_attn, x, rec ? &rec->attn : NULL));
		if (rec) rec->attn_out = x;
	}
	DRES(1);
	hook(r, "decoder.mid_block", x);
	int k = 2;
	for (int b = 0; b < c->nblocks; b++) {
		for (int l = 0; l < c->layers_per_block + 1; l++, k++) DRES(k);
		if (b < c->nblocks - 1) {
			int64_t N = N_(x), C = C_(x), H2 = 2 * H_(x), W2 = 2 * W_(x);
			sd_tensor *up = act_new(r, N, C, H2, W2), *y = up ? act_new(r, N, C, H2, W2) : NULL;
			if (!y || sd_vae_up_forward(y, up, x, &v->up[b])) return NULL;
			if (rec) rec->up[b] = up, rec->up_out[b] = y;
			drop(r, up);
			drop(r, x);
			x = y;
		}
		snprintf(name, sizeof name, "decoder.up_blocks.%d", b);
		hook(r, name, x);
	}
#undef DRES
	if (rec) rec->head_in = x;
	STEP(y, head(r, x, v->dec_norm_w, v->dec_norm_b, &v->dec_out, "decoder.conv_norm_out", "decoder.conv_out",
	             rec ? &rec->norm_out : NULL, rec ? &rec->act_out : NULL));
	if (rec) rec->out = x;
	return x;
}

/* ==== calls: per sample, whole or in tiles ==== */

/* Copy a (C, h, w) window at (y0, x0) of src (C, H, W) into dst (C, h, w); either side on the host or
 * on the VAE's device, as their tensors say. */
static int copy_window(sd_vae *v, float *dst, int dst_dev, const float *src, int src_dev, int64_t C, int64_t H,
                       int64_t W, int64_t y0, int64_t x0, int64_t h, int64_t w)
{
	if (y0 == 0 && x0 == 0 && h == H && w == W)
		return v->be->copy(dst, dst_dev, src, src_dev, (size_t)(C * H * W) * sizeof(float));
	for (int64_t c = 0; c < C; c++)
		for (int64_t y = 0; y < h; y++)
			if (v->be->copy(dst + (c * h + y) * w, dst_dev, src + (c * H + y0 + y) * W + x0, src_dev,
			                (size_t)w * sizeof(float)))
				return -1;
	return 0;
}

enum { ENCODE, DECODE };

/* Run one tile or a whole sample: in (C, h, w) at `src` (host or device) → out on the device (a pool
 * buffer the caller drops, in the run's arena). */
static sd_tensor *run_one(run *r, int what, const float *src, int src_dev, int64_t C, int64_t H, int64_t W,
                          int64_t y0, int64_t x0, int64_t h, int64_t w)
{
	sd_tensor *in = act_new(r, 1, C, h, w);
	if (!in || copy_window(r->v, in->data, r->v->dev != SD_DEVICE_CPU, src, src_dev, C, H, W, y0, x0, h, w))
		return NULL;
	sd_tensor *out = what == ENCODE ? encoder(r, in, NULL) : decoder(r, in, NULL);
	drop(r, in);
	return out;
}

/* Tile origins along an axis of length n for tiles of t overlapping by at least o: the last tile ends
 * at n.  Returns the count. */
static int tile_starts(int64_t n, int64_t t, int64_t o, int64_t *s, int max)
{
	if (n <= t) {
		s[0] = 0;
		return 1;
	}
	int k = 0;
	for (int64_t p = 0; p + t < n && k < max - 1; p += t - o) s[k++] = p; /* p < n - t: no duplicate */
	s[k++] = n - t;
	return k;
}

/* Blending weight at i of a tile of length t (output units) with ramps of length o at inner edges. */
static float ramp(int64_t i, int64_t t, int64_t o, int lo_edge, int hi_edge)
{
	float w = 1.0f;
	if (!lo_edge && (i + 0.5f) / o < w) w = (i + 0.5f) / o;
	if (!hi_edge && (t - i - 0.5f) / o < w) w = (t - i - 0.5f) / o;
	return w;
}

#define MAX_TILES 4096

/*
 * The common driver of encode and decode: per sample, untiled or tiled.  `in` (N, Ci, H, W), `out`
 * (N, Co, H·mul/div, W·mul/div); f is the image/latent factor; tiles are chosen in image pixels.
 */
static int drive(sd_vae *v, int what, sd_tensor *out, const sd_tensor *in, const sd_vae_tiling *tl)
{
	int f = sd_vae_factor(v), mul = what == DECODE ? f : 1, div = what == DECODE ? 1 : f;
	int64_t N = N_(in), C = C_(in), H = H_(in), W = W_(in), Co = C_(out), Ho = H_(out), Wo = W_(out);
	int64_t img_h = H * mul, img_w = W * mul; /* image pixels (the input for encode, the output for decode) */
	int64_t tile = tl ? tl->tile : 0, ov = 0;
	if (tile == 0) tile = img_h * img_w > SD_VAE_AUTO_TILE_AREA ? SD_VAE_AUTO_TILE / f * f : -1;
	int tiled = tile > 0 && (img_h > tile || img_w > tile);
	if (tiled) {
		if (tile % f || tile < 2 * f) return sd_seterr("vae: tile size %lld is not a multiple of %d of at least %d", (long long)tile, f, 2 * f);
		ov = tl && tl->overlap > 0 ? tl->overlap : tile / 4 / f * f;
		if (ov < f) ov = f;
		if (ov % f || ov >= tile) return sd_seterr("vae: tile overlap %lld is not a multiple of %d below the tile size %lld", (long long)ov, f, (long long)tile);
	}
	int in_dev = in->device != SD_DEVICE_CPU, out_dev = out->device != SD_DEVICE_CPU;
	size_t in_stride = (size_t)(C * H * W), out_stride = (size_t)(Co * Ho * Wo);
	run r = {v, v->arena, NULL, v->hook != NULL && !tiled};
	v->pool_peak = v->pool_bytes;
	size_t apeak = 0;
	float *acc = NULL, *wsum = NULL, *tilebuf = NULL;
	int rc = -1;
	if (tiled) {
		/* in input units: tiles of ti overlapping by oi; outputs scale by mul/div */
		int64_t ti = what == DECODE ? tile / f : tile, oi = what == DECODE ? ov / f : ov;
		int64_t ys[MAX_TILES], xs[MAX_TILES];
		if ((H - ti) / (ti - oi) + 2 > MAX_TILES || (W - ti) / (ti - oi) + 2 > MAX_TILES)
			return sd_seterr("vae: more than %d tiles across: choose a larger tile", MAX_TILES);
		int ny = tile_starts(H, ti, oi, ys, MAX_TILES), nx = tile_starts(W, ti, oi, xs, MAX_TILES);
		int64_t th = H < ti ? H : ti, tw = W < ti ? W : ti, tho = th * mul / div, two = tw * mul / div;
		int64_t oo = oi * mul / div; /* ramp length in output units */
		acc = malloc(out_stride * sizeof(float));
		wsum = malloc((size_t)(Ho * Wo) * sizeof(float));
		tilebuf = malloc((size_t)(Co * tho * two) * sizeof(float));
		if (!acc || !wsum || !tilebuf) {
			sd_seterr("out of memory");
			goto done;
		}
		for (int64_t n = 0; n < N; n++) {
			memset(acc, 0, out_stride * sizeof(float));
			memset(wsum, 0, (size_t)(Ho * Wo) * sizeof(float));
			for (int iy = 0; iy < ny; iy++)
				for (int ix = 0; ix < nx; ix++) {
					sd_arena_reset(r.a);
					sd_tensor *t = run_one(&r, what, (const float *)in->data + n * in_stride, in_dev, C, H, W,
					                       ys[iy], xs[ix], th, tw);
					if (!t || v->be->copy(tilebuf, 0, t->data, v->dev != SD_DEVICE_CPU,
					                      (size_t)(Co * tho * two) * sizeof(float)))
						goto done;
					drop(&r, t);
					if (sd_arena_peak(r.a) > apeak) apeak = sd_arena_peak(r.a);
					int64_t oy = ys[iy] * mul / div, ox = xs[ix] * mul / div;
					int lo_y = iy == 0, hi_y = iy == ny - 1, lo_x = ix == 0, hi_x = ix == nx - 1;
					for (int64_t y = 0; y < tho; y++) {
						float wy = ramp(y, tho, oo, lo_y, hi_y);
						for (int64_t x = 0; x < two; x++) {
							float wgt = wy * ramp(x, two, oo, lo_x, hi_x);
							wsum[(oy + y) * Wo + ox + x] += wgt;
							for (int64_t c = 0; c < Co; c++)
								acc[(c * Ho + oy + y) * Wo + ox + x] += wgt * tilebuf[(c * tho + y) * two + x];
						}
					}
				}
			for (int64_t c = 0; c < Co; c++)
				for (int64_t i = 0; i < Ho * Wo; i++) acc[c * Ho * Wo + i] /= wsum[i];
			if (v->be->copy((float *)out->data + n * out_stride, out_dev, acc, 0, out_stride * sizeof(float)))
				goto done;
		}
	} else {
		for (int64_t n = 0; n < N; n++) {
			sd_arena_reset(r.a);
			sd_tensor *t = run_one(&r, what, (const float *)in->data + n * in_stride, in_dev, C, H, W, 0, 0, H, W);
			if (!t || v->be->copy((float *)out->data + n * out_stride, out_dev, t->data, v->dev != SD_DEVICE_CPU,
			                      out_stride * sizeof(float)))
				goto done;
			drop(&r, t);
			if (sd_arena_peak(r.a) > apeak) apeak = sd_arena_peak(r.a);
		}
	}
	rc = 0;
done:
	for (int i = 0; i < v->nslab; i++) v->slab[i].busy = 0; /* after an error, nothing is in use */
	v->peak = v->pool_peak + apeak;
	free(acc);
	free(wsum);
	free(tilebuf);
	return rc;
}

static int check_4d(const char *what, const sd_tensor *t)
{
	char s[96];
	if (t->dtype != SD_DTYPE_F32) return sd_seterr("vae: %s is %s, expected f32", what, sd_dtype_name(t->dtype));
	if (t->ndim != 4) return sd_seterr("vae: %s has shape %s, expected [N,C,H,W]", what, shape_s(t, s, sizeof s));
	return 0;
}

static int check_out(const char *what, const sd_tensor *t, int64_t N, int64_t C, int64_t H, int64_t W)
{
	char s[96], e[96];
	int64_t want[4] = {N, C, H, W};
	if (check_4d(what, t)) return -1;
	for (int i = 0; i < 4; i++)
		if (t->shape[i] != want[i])
			return sd_seterr("vae: %s has shape %s, expected %s", what, shape_s(t, s, sizeof s),
			                 sd_shape_str(4, want, e, sizeof e));
	return 0;
}

static int devices_ok(const sd_vae *v, const sd_tensor *a, const sd_tensor *b)
{
	const sd_tensor *t[2] = {a, b};
	for (int i = 0; i < 2; i++)
		if (t[i]->device != SD_DEVICE_CPU && t[i]->device != v->dev)
			return sd_seterr("vae: a tensor is on %s, the VAE on %s", sd_device_name(t[i]->device), sd_device_name(v->dev));
	return 0;
}

/* An encoder input: f32 (N, in_channels, H, W), H and W non-zero multiples of the factor. */
static int check_image(const sd_vae *v, const sd_tensor *x)
{
	int f = sd_vae_factor(v);
	if (check_4d("image", x)) return -1;
	if (C_(x) != v->cfg.in_channels)
		return sd_seterr("vae: image has %lld channel%s, the model expects %d", (long long)C_(x), C_(x) == 1 ? "" : "s",
		                 v->cfg.in_channels);
	if (H_(x) % f || W_(x) % f || H_(x) == 0 || W_(x) == 0)
		return sd_seterr("vae: image size %lldx%lld (width x height) is not a multiple of %d", (long long)W_(x),
		                 (long long)H_(x), f);
	return 0;
}

int sd_vae_encode(sd_vae *v, sd_tensor *moments, const sd_tensor *x, const sd_vae_tiling *t)
{
	const sd_vae_config *c = &v->cfg;
	int f = sd_vae_factor(v);
	if (check_image(v, x)) return -1;
	if (check_out("moments", moments, N_(x), 2 * c->latent_channels, H_(x) / f, W_(x) / f) ||
	    devices_ok(v, x, moments))
		return -1;
	return drive(v, ENCODE, moments, x, t);
}

int sd_vae_decode(sd_vae *v, sd_tensor *x, const sd_tensor *z, const sd_vae_tiling *t)
{
	const sd_vae_config *c = &v->cfg;
	int f = sd_vae_factor(v);
	if (check_4d("latent", z)) return -1;
	if (C_(z) != c->latent_channels)
		return sd_seterr("vae: latent has %lld channel%s, the model expects %d", (long long)C_(z), C_(z) == 1 ? "" : "s",
		                 c->latent_channels);
	if (H_(z) == 0 || W_(z) == 0) return sd_seterr("vae: latent is empty");
	if (check_out("image", x, N_(z), c->out_channels, H_(z) * f, W_(z) * f) || devices_ok(v, z, x)) return -1;
	return drive(v, DECODE, x, z, t);
}

int sd_vae_posterior(sd_tensor *mean, sd_tensor *logvar, sd_tensor *std, const sd_tensor *m)
{
	if (check_4d("moments", m)) return -1;
	if (m->device != SD_DEVICE_CPU) return sd_seterr("vae: posterior: moments must be on the cpu");
	if (C_(m) % 2) return sd_seterr("vae: moments have an odd channel count %lld", (long long)C_(m));
	int64_t N = N_(m), L = C_(m) / 2, S = H_(m) * W_(m);
	sd_tensor *outs[3] = {mean, logvar, std};
	for (int i = 0; i < 3; i++)
		if (outs[i] && (check_out("posterior", outs[i], N, L, H_(m), W_(m)) || outs[i]->device != SD_DEVICE_CPU))
			return outs[i]->device != SD_DEVICE_CPU ? sd_seterr("vae: posterior: outputs must be on the cpu") : -1;
	const float *p = m->data;
	for (int64_t n = 0; n < N; n++)
		for (int64_t i = 0; i < L * S; i++) {
			float mu = p[n * 2 * L * S + i], lv = p[n * 2 * L * S + L * S + i];
			lv = lv < -30.0f ? -30.0f : lv > 20.0f ? 20.0f : lv;
			if (mean) ((float *)mean->data)[n * L * S + i] = mu;
			if (logvar) ((float *)logvar->data)[n * L * S + i] = lv;
			if (std) ((float *)std->data)[n * L * S + i] = expf(0.5f * lv);
		}
	return 0;
}

int sd_vae_encode_image(sd_vae *v, sd_tensor *latent, const sd_tensor *image, const sd_tensor *eps,
                        const sd_vae_tiling *t)
{
	const sd_vae_config *c = &v->cfg;
	int f = sd_vae_factor(v);
	if (check_image(v, image)) return -1;
	if (image->device != SD_DEVICE_CPU || latent->device != SD_DEVICE_CPU || (eps && eps->device != SD_DEVICE_CPU))
		return sd_seterr("vae: encode_image takes cpu tensors");
	int64_t N = N_(image), L = c->latent_channels, h = H_(image) / f, w = W_(image) / f;
	if (check_out("latent", latent, N, L, h, w) || (eps && check_out("eps", eps, N, L, h, w))) return -1;
	int64_t mshape[4] = {N, 2 * L, h, w};
	sd_tensor *x = sd_tensor_new(SD_DTYPE_F32, 4, image->shape), *m = NULL;
	int rc = -1;
	if (!x) return -1;
	const float *ip = image->data;
	float *xp = x->data;
	int64_t n = sd_tensor_numel(image);
	for (int64_t i = 0; i < n; i++) xp[i] = 2.0f * ip[i] - 1.0f; /* VaeImageProcessor.normalize */
	if (!(m = sd_tensor_new(SD_DTYPE_F32, 4, mshape)) || sd_vae_encode(v, m, x, t)) goto done;
	const float *mp = m->data, *ep = eps ? eps->data : NULL;
	float *lp = latent->data, s = c->scaling_factor;
	int64_t S = L * h * w;
	for (int64_t b = 0; b < N; b++)
		for (int64_t i = 0; i < S; i++) {
			float mu = mp[b * 2 * S + i], z = mu;
			if (ep) {
				float lv = mp[b * 2 * S + S + i];
				lv = lv < -30.0f ? -30.0f : lv > 20.0f ? 20.0f : lv;
				z = mu + expf(0.5f * lv) * ep[b * S + i];
			}
			lp[b * S + i] = s * z;
		}
	rc = 0;
done:
	sd_tensor_free(x);
	sd_tensor_free(m);
	return rc;
}

int sd_vae_decode_image(sd_vae *v, sd_tensor *image, const sd_tensor *latent, const sd_vae_tiling *t)
{
	if (check_4d("latent", latent)) return -1;
	if (image->device != SD_DEVICE_CPU || latent->device != SD_DEVICE_CPU)
		return sd_seterr("vae: decode_image takes cpu tensors");
	sd_tensor *z = sd_tensor_new(SD_DTYPE_F32, 4, latent->shape);
	if (!z) return -1;
	int64_t n = sd_tensor_numel(latent);
	const float *lp = latent->data;
	float *zp = z->data, inv = 1.0f / v->cfg.scaling_factor;
	for (int64_t i = 0; i < n; i++) zp[i] = lp[i] * inv;
	int rc = sd_vae_decode(v, image, z, t);
	sd_tensor_free(z);
	if (rc) return -1;
	float *p = image->data;
	n = sd_tensor_numel(image);
	for (int64_t i = 0; i < n; i++) { /* VaeImageProcessor.denormalize: (x / 2 + 0.5).clamp(0, 1) */
		float y = p[i] / 2.0f + 0.5f;
		p[i] = y < 0.0f ? 0.0f : y > 1.0f ? 1.0f : y;
	}
	return 0;
}

int sd_vae_encode_record(sd_vae *v, sd_vae_enc_act *act, sd_arena *a, const sd_tensor *x)
{
	if (check_image(v, x)) return -1;
	if (x->device != v->dev)
		return sd_seterr("vae: the input is on %s, the VAE on %s", sd_device_name(x->device), sd_device_name(v->dev));
	memset(act, 0, sizeof *act);
	act->x = x;
	act->nres = v->n_enc_res;
	run r = {v, v->arena, a, v->hook != NULL};
	return encoder(&r, x, act) ? 0 : -1;
}

/* The flowing gradient: a tensor shaped like `like` in the gradient arena not holding `cur`. */
static sd_tensor *grad_next(sd_vae *v, int *fi, const sd_tensor *like)
{
	*fi ^= 1;
	sd_arena_reset(v->bw[*fi]);
	return tmp_like(v->bw[*fi], like);
}

int sd_vae_encode_backward(sd_vae *v, const sd_vae_enc_act *act, const sd_tensor *dmoments, sd_tensor *dx)
{
	const sd_vae_config *c = &v->cfg;
	if (!act->moments || !act->x) return sd_seterr("vae: backward: no recorded forward");
	if (!sd_tensor_same_shape(dmoments, act->moments) || dmoments->device != v->dev)
		return sd_seterr("vae: backward: dmoments must be shaped as the moments, on the VAE's device");
	if (dx && (!sd_tensor_same_shape(dx, act->x) || dx->device != v->dev))
		return sd_seterr("vae: backward: dx must be shaped as the input, on the VAE's device");
	const sd_vae_attn *at = &v->enc_attn;
	int trained = c->mid_attention && (at->q.train || at->k.train || at->v.train || at->out.train);
	if (!dx && !trained) return 0;
	for (int i = 0; i < 3; i++)
		if (!v->bw[i] && !(v->bw[i] = sd_arena_new(v->dev, 0))) return -1;
	sd_arena *s = v->bw[2];
	int fi = 0, k = act->nres - 1;
	sd_arena_reset(v->bw[0]);
	sd_arena_reset(v->bw[1]);
	sd_arena_reset(s);
	/* head: moments = quant_conv(conv_out(silu(conv_norm_out(mid)))) */
	const sd_tensor *g = dmoments;
	if (c->quant_conv) {
		sd_tensor *d = grad_next(v, &fi, act->conv_out);
		if (!d || sd_conv2d_backward(d, g, v->quant.w, 1, 0, 0, 0, 0, 0)) return sd_preerr("vae: quant_conv backward");
		g = d;
	}
	sd_tensor *dact = tmp_like(s, act->act_out), *d = grad_next(v, &fi, act->res_out[k]);
	if (!dact || !d || sd_conv2d_backward(dact, g, v->enc_out.w, 1, 1, 1, 1, 1, 0) ||
	    sd_group_norm_backward(d, NULL, NULL, dact, act->res_out[k], c->groups, v->enc_norm_w, v->enc_norm_b, c->eps, 1, 0))
		return sd_preerr("vae: conv_out backward");
	g = d;
	/* mid block: resnet, attention, resnet */
#define RES_BACK(k) do {                                                                                  \
		sd_arena_reset(s);                                                                                \
		sd_tensor *d_ = grad_next(v, &fi, act->res_in[k]);                                                \
		if (!d_ || sd_vae_resnet_backward(d_, g, &act->res[k], act->res_in[k], &v->enc_res[k], c->groups, \
		                                  c->eps, s, 0))                                                  \
			return sd_preerr("vae: encoder resnet %d backward", k);                                       \
		g = d_;                                                                                           \
	} while (0)
	RES_BACK(k);
	k--;
	if (c->mid_attention) {
		sd_arena_reset(s);
		sd_tensor *d_ = dx ? grad_next(v, &fi, act->res_out[k]) : NULL;
		if ((dx && !d_) || sd_vae_attn_backward(d_, g, &act->attn, act->res_out[k], at, c->groups, c->eps, s, 0))
			return sd_preerr("vae: encoder attention backward");
		if (!dx) return 0; /* nothing before it has parameters */
		g = d_;
	}
	RES_BACK(k);
	k--;
	for (int b = c->nblocks - 1; b >= 0; b--) {
		if (b < c->nblocks - 1) {
			/* the downsampler's input is the block's last resnet output */
			sd_tensor *d_ = grad_next(v, &fi, act->res_out[k]);
			if (!d_ || sd_conv2d_backward(d_, g, v->down[b].w, 2, 0, 1, 0, 1, 0))
				return sd_preerr("vae: downsampler %d backward", b);
			g = d_;
		}
		for (int l = 0; l < c->layers_per_block; l++, k--) RES_BACK(k);
	}
#undef RES_BACK
	sd_arena_reset(s);
	return sd_conv2d_backward(dx, g, v->enc_in.w, 1, 1, 1, 1, 1, 0);
}

int sd_vae_decode_record(sd_vae *v, sd_vae_dec_act *act, sd_arena *a, const sd_tensor *z)
{
	const sd_vae_config *c = &v->cfg;
	if (check_4d("z", z)) return -1;
	if (C_(z) != c->latent_channels)
		return sd_seterr("vae: decode_record: z has %lld channels, the VAE %d", (long long)C_(z), c->latent_channels);
	if (z->device != v->dev)
		return sd_seterr("vae: z is on %s, the VAE on %s", sd_device_name(z->device), sd_device_name(v->dev));
	memset(act, 0, sizeof *act);
	act->z = z;
	act->nres = v->n_dec_res;
	run r = {v, v->arena, a, v->hook != NULL};
	return decoder(&r, z, act) ? 0 : -1;
}

int sd_vae_decode_backward(sd_vae *v, const sd_vae_dec_act *act, const sd_tensor *dout)
{
	const sd_vae_config *c = &v->cfg;
	if (!act->out || !act->z) return sd_seterr("vae: decode backward: no recorded forward");
	if (!sd_tensor_same_shape(dout, act->out) || dout->device != v->dev)
		return sd_seterr("vae: decode backward: dout must be shaped as the output, on the VAE's device");
	const sd_vae_attn *at = &v->dec_attn;
	if (!c->mid_attention || !(at->q.train || at->k.train || at->v.train || at->out.train)) return 0;
	for (int i = 0; i < 3; i++)
		if (!v->bw[i] && !(v->bw[i] = sd_arena_new(v->dev, 0))) return -1;
	sd_arena *s = v->bw[2];
	int fi = 0, k = act->nres - 1;
	sd_arena_reset(v->bw[0]);
	sd_arena_reset(v->bw[1]);
	sd_arena_reset(s);
	/* head: out = conv_out(silu(conv_norm_out(head_in))) */
	sd_tensor *dact = tmp_like(s, act->act_out), *d = grad_next(v, &fi, act->head_in);
	if (!dact || !d || sd_conv2d_backward(dact, dout, v->dec_out.w, 1, 1, 1, 1, 1, 0) ||
	    sd_group_norm_backward(d, NULL, NULL, dact, act->head_in, c->groups, v->dec_norm_w, v->dec_norm_b, c->eps, 1, 0))
		return sd_preerr("vae: decoder conv_out backward");
	const sd_tensor *g = d;
#define RES_BACK(k) do {                                                                                  \
		sd_arena_reset(s);                                                                                \
		sd_tensor *d_ = grad_next(v, &fi, act->res_in[k]);                                                \
		if (!d_ || sd_vae_resnet_backward(d_, g, &act->res[k], act->res_in[k], &v->dec_res[k], c->groups, \
		                                  c->eps, s, 0))                                                  \
			return sd_preerr("vae: decoder resnet %d backward", k);                                       \
		g = d_;                                                                                           \
	} while (0)
	for (int b = c->nblocks - 1; b >= 0; b--) {
		if (b < c->nblocks - 1) {
			/* up = upsample2x(res_out[k]); out = conv(up) */
			sd_arena_reset(s);
			sd_tensor *dup = tmp_like(s, act->up[b]), *d_ = grad_next(v, &fi, act->res_out[k]);
			if (!dup || !d_ || sd_conv2d_backward(dup, g, v->up[b].w, 1, 1, 1, 1, 1, 0) ||
			    sd_upsample2x_backward(d_, dup, 0))
				return sd_preerr("vae: upsampler %d backward", b);
			g = d_;
		}
		for (int l = 0; l < c->layers_per_block + 1; l++, k--) RES_BACK(k);
	}
	RES_BACK(1); /* the mid block's second resnet; its input is the attention's output */
#undef RES_BACK
	sd_arena_reset(s);
	/* the attention's adapters; nothing below it is trained, so no input gradient */
	if (sd_vae_attn_backward(NULL, g, &act->attn, act->res_out[0], at, c->groups, c->eps, s, 0))
		return sd_preerr("vae: decoder attention backward");
	return 0;
}
