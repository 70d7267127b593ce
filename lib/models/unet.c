/*
 * unet.c - UNet2DConditionModel, the Stable Diffusion denoiser, on the backend ops.  Mirrors diffusers
 * 0.25 (models/unets/unet_2d_condition.py; unet_2d_blocks.py: DownBlock2D, CrossAttnDownBlock2D,
 * UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D; resnet.py: ResnetBlock2D, Downsample2D,
 * Upsample2D; transformer_2d.py: Transformer2DModel; attention.py: BasicTransformerBlock, FeedForward,
 * GEGLU; attention_processor.py: Attention; embeddings.py: get_timestep_embedding, TimestepEmbedding).
 *
 * Layers are llm.c-style *_forward functions that write into activations the caller allocated.  The
 * network walk allocates them from arenas:
 *   keep     the caller's arena (or the UNet's own): the skip connections, the time embedding, the
 *            down path's outputs (every one of them is a skip);
 *   tmp      the UNet's per-layer scratch, reset after each resnet / transformer / resampler, so its
 *            peak is the largest single layer (a 512² transformer's GEGLU), not the sum;
 *   flow[2]  the mid and up path's outputs, in two arenas used in turn: a layer's output goes to the
 *            one its input is not in, which is reset first (what it held is two layers old and dead).
 * Headers live in a host arena, so the data arenas can be on a device.  A recorded forward
 * (sd_unet_forward_record) instead gives every activation its own tensor in the caller's arena and
 * resets nothing, for a backward.
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include "../backend.h"

#define MAXB SD_UNET_MAX_BLOCKS
#define TRANSFORMER_NORM_EPS 1e-6f /* Transformer2DModel's GroupNorm */
#define BLOCK_NORM_EPS 1e-5f       /* BasicTransformerBlock's LayerNorms (norm_eps default) */

/* ==== block forwards ==== */

/* out = x·wᵀ + b, plus the LoRA term when an adapter is set (lora: scratch of ≥ rows·r floats). */
static int linear(sd_tensor *out, const sd_tensor *x, const sd_unet_linear *p, const sd_tensor *lora)
{
	if (p->train && p->lora_a) { /* training: the adapter's dropout (train/step.c) */
		const sd_lora_layer l = {p->lora_a, p->lora_b, p->lora_scale, 0};
		if (!lora) return sd_seterr("unet: LoRA adapter without scratch");
		return sd_lora_train_forward(out, (sd_tensor *)lora, x, p->w, p->b, &l, p->train);
	}
	if (sd_linear(out, x, p->w, p->b)) return -1;
	if (!p->lora_a) return 0;
	if (!lora || !p->lora_b || p->lora_a->ndim != 2 || p->lora_b->ndim != 2 ||
	    p->lora_b->shape[1] != p->lora_a->shape[0])
		return sd_seterr("unet: bad LoRA adapter (A and B must be (r, in) and (out, r), with scratch)");
	sd_tensor t = *x; /* the adapter's hidden (…, r) over the scratch */
	t.shape[t.ndim - 1] = p->lora_a->shape[0];
	t.data = lora->data;
	t.owns = 0;
	if (sd_tensor_numel(&t) > sd_tensor_numel(lora)) return sd_seterr("unet: LoRA scratch too small");
	if (sd_linear(&t, x, p->lora_a, NULL)) return -1;
	/* out (…, O) += scale · t (…, r) · Bᵀ */
	return sd_matmul(out, &t, p->lora_b, 0, 1, p->lora_scale, 1.0f);
}

int sd_unet_resnet_forward(sd_tensor *out, const sd_unet_resnet_act *a, const sd_tensor *x,
                           const sd_tensor *temb_act, const sd_unet_resnet *p, int groups, float eps)
{
	// x (N,Cin,H,W), temb_act (N,T) → out (N,Cout,H,W)
	if (a->n1 == a->h1) {
		if (sd_group_norm(a->h1, x, groups, p->norm1_w, p->norm1_b, eps, 1)) return -1;
	} else if (sd_group_norm(a->n1, x, groups, p->norm1_w, p->norm1_b, eps, 0) ||
	           sd_act(a->h1, a->n1, SD_ACT_SILU))
		return -1;
	if (sd_conv2d(a->a1, a->h1, p->conv1.w, p->conv1.b, 1, 1, 1, 1, 1)) return -1;
	/* hidden + time_emb_proj(silu(temb))[:, :, None, None] */
	if (sd_linear(a->tp, temb_act, p->temb.w, p->temb.b) || sd_add(a->a1, a->a1, a->tp, 1.0f, 1.0f)) return -1;
	if (a->n2 == a->h2) {
		if (sd_group_norm(a->h2, a->a1, groups, p->norm2_w, p->norm2_b, eps, 1)) return -1;
	} else if (sd_group_norm(a->n2, a->a1, groups, p->norm2_w, p->norm2_b, eps, 0) ||
	           sd_act(a->h2, a->n2, SD_ACT_SILU))
		return -1;
	/* dropout is the identity at inference */
	if (sd_conv2d(out, a->h2, p->conv2.w, p->conv2.b, 1, 1, 1, 1, 1)) return -1;
	const sd_tensor *sc = x;
	if (p->shortcut.w) {
		if (sd_conv2d(a->sc, x, p->shortcut.w, p->shortcut.b, 1, 0, 0, 0, 0)) return -1;
		sc = a->sc;
	}
	/* (input + hidden) / output_scale_factor */
	if (sd_add(out, out, sc, 1.0f, 1.0f)) return -1;
	return p->out_scale != 1.0f ? sd_scale(out, out, 1.0f / p->out_scale) : 0;
}

/* out (N,Lq,Dq) = to_out(attention(to_q(xq), to_k(xkv), to_v(xkv))). */
static int attn_forward(sd_tensor *out, const sd_unet_attn_act *a, const sd_tensor *xq, const sd_tensor *xkv,
                        const sd_unet_attn *p)
{
	if (linear(a->q, xq, &p->q, a->lora) || linear(a->k, xkv, &p->k, a->lora) || linear(a->v, xkv, &p->v, a->lora))
		return -1;
	float scale = (float)(1.0 / sqrt((double)p->dim_head));
	if (sd_attention(a->o, a->q, a->k, a->v, p->heads, scale, 0, a->probs)) return -1;
	return linear(out, a->o, &p->out, a->lora);
}

int sd_unet_tblock_forward(sd_tensor *out, const sd_unet_tblock_act *a, const sd_tensor *x, const sd_tensor *ctx,
                           const sd_unet_tblock *p)
{
	// x (N,L,D), ctx (N,Lc,Dc)
	if (sd_layer_norm(a->ln1, x, p->ln1_w, p->ln1_b, BLOCK_NORM_EPS) ||
	    attn_forward(a->tmp, &a->a1, a->ln1, a->ln1, &p->attn1) || sd_add(a->r1, x, a->tmp, 1.0f, 1.0f))
		return -1;
	if (sd_layer_norm(a->ln2, a->r1, p->ln2_w, p->ln2_b, BLOCK_NORM_EPS) ||
	    attn_forward(a->tmp, &a->a2, a->ln2, ctx, &p->attn2) || sd_add(a->r2, a->r1, a->tmp, 1.0f, 1.0f))
		return -1;
	/* FeedForward: GEGLU(D, F) → dropout → Linear(F, D) */
	if (sd_layer_norm(a->ln3, a->r2, p->ln3_w, p->ln3_b, BLOCK_NORM_EPS) || linear(a->ffh, a->ln3, &p->ff1, NULL) ||
	    sd_geglu(a->ffg, a->ffh) || linear(a->tmp, a->ffg, &p->ff2, NULL))
		return -1;
	return sd_add(out, a->r2, a->tmp, 1.0f, 1.0f);
}

int sd_unet_transformer_forward(sd_tensor *out, const sd_unet_transformer_act *a, const sd_tensor *x,
                                const sd_tensor *ctx, const sd_unet_transformer *p, int groups)
{
	// x (N,C,H,W) → nl (N,L,C) → h (N,L,I) → p (N,L,C) → out (N,C,H,W)
	if (sd_group_norm(a->n, x, groups, p->norm_w, p->norm_b, TRANSFORMER_NORM_EPS, 0) ||
	    sd_nchw_to_nlc(a->nl, a->n) || linear(a->h[0], a->nl, &p->proj_in, NULL))
		return -1;
	for (int k = 0; k < p->nlayers; k++)
		if (sd_unet_tblock_forward(a->h[k + 1], &a->blk[k], a->h[k], ctx, &p->blk[k])) return -1;
	if (linear(a->p, a->h[p->nlayers], &p->proj_out, NULL) || sd_nlc_to_nchw(out, a->p)) return -1;
	return sd_add(out, out, x, 1.0f, 1.0f);
}

/* ==== block backwards ==== */

/* A scratch tensor shaped like `like` (last dimension d when d > 0) from the arena. */
static sd_tensor *tmp_like(sd_arena *a, const sd_tensor *like, int64_t d)
{
	sd_tensor *t = sd_arena_alloc(a, sizeof *t);
	if (!t) return NULL;
	*t = *like;
	t->owns = 0;
	t->aux = NULL;
	t->aux_free = NULL;
	if (d > 0) t->shape[t->ndim - 1] = d;
	size_t bytes = sd_tensor_nbytes(t);
	return (t->data = sd_arena_alloc(a, bytes ? bytes : 1)) ? t : NULL;
}

/* dx (acc) from dy through a linear: frozen w, the adapter's gradients when it is trained. */
static int linear_back(sd_tensor *dx, const sd_tensor *dy, const sd_tensor *x, const sd_unet_linear *p, int acc)
{
	const sd_lora_layer l = {p->lora_a, p->lora_b, p->lora_scale, 0};
	return sd_lora_train_backward(dx, dy, x, p->w, p->lora_a ? &l : NULL, p->train, acc);
}

/* dxq (acc) and dxkv (+=, NULL: not wanted; == dxq for self-attention) from dout (N,Lq,Dq). */
static int attn_backward(sd_tensor *dxq, sd_tensor *dxkv, const sd_tensor *dout, const sd_unet_attn_act *a,
                         const sd_tensor *xq, const sd_tensor *xkv, const sd_unet_attn *p, sd_arena *s, int acc)
{
	int self = dxkv == dxq, kv = self || dxkv || p->k.train || p->v.train;
	sd_tensor *d_o = tmp_like(s, a->o, 0), *dq = tmp_like(s, a->q, 0);
	sd_tensor *dk = kv ? tmp_like(s, a->k, 0) : NULL, *dv = kv ? tmp_like(s, a->v, 0) : NULL;
	if (!d_o || !dq || (kv && (!dk || !dv))) return -1;
	float scale = (float)(1.0 / sqrt((double)p->dim_head));
	if (linear_back(d_o, dout, a->o, &p->out, 0) ||
	    sd_attention_backward(dq, dk, dv, d_o, a->q, a->k, a->v, a->probs, p->heads, scale, 0, 0) ||
	    linear_back(dxq, dq, xq, &p->q, acc))
		return -1;
	if (!kv) return 0;
	return linear_back(dxkv, dk, xkv, &p->k, 1) || linear_back(dxkv, dv, xkv, &p->v, 1) ? -1 : 0;
}

int sd_unet_resnet_backward(sd_tensor *dx, const sd_tensor *dout, const sd_unet_resnet_act *a, const sd_tensor *x,
                            const sd_unet_resnet *p, int groups, float eps, sd_arena *s, int acc)
{
	// out = (shortcut(x) + conv2(h2)) / out_scale, h2 = silu(norm2(conv1(silu(norm1(x))) + tp))
	const sd_tensor *g = dout;
	if (p->out_scale != 1.0f) {
		sd_tensor *gs = tmp_like(s, dout, 0);
		if (!gs || sd_scale(gs, dout, 1.0f / p->out_scale)) return -1;
		g = gs;
	}
	sd_tensor *dh2 = tmp_like(s, dout, 0), *da1 = tmp_like(s, dout, 0), *dh1 = tmp_like(s, x, 0);
	if (!dh2 || !da1 || !dh1) return -1;
	if (sd_conv2d_backward(dh2, g, p->conv2.w, 1, 1, 1, 1, 1, 0) ||
	    sd_group_norm_backward(da1, NULL, NULL, dh2, a->a1, groups, p->norm2_w, p->norm2_b, eps, 1, 0) ||
	    sd_conv2d_backward(dh1, da1, p->conv1.w, 1, 1, 1, 1, 1, 0))
		return -1;
	if (!dx) return 0;
	if (p->shortcut.w) {
		if (sd_conv2d_backward(dx, g, p->shortcut.w, 1, 0, 0, 0, 0, acc)) return -1;
	} else if (acc ? sd_add(dx, dx, g, 1.0f, 1.0f) : sd_tensor_copy(dx, g))
		return -1;
	return sd_group_norm_backward(dx, NULL, NULL, dh1, x, groups, p->norm1_w, p->norm1_b, eps, 1, 1);
}

int sd_unet_tblock_backward(sd_tensor *dx, sd_tensor *dctx, const sd_tensor *dout, const sd_unet_tblock_act *a,
                            const sd_tensor *x, const sd_tensor *ctx, const sd_unet_tblock *p, sd_arena *s, int acc)
{
	// out = r2 + ff(ln3(r2)), r2 = r1 + attn2(ln2(r1), ctx), r1 = x + attn1(ln1(x))
	sd_tensor *dr = tmp_like(s, dout, 0), *dffg = tmp_like(s, a->ffg, 0), *dffh = tmp_like(s, a->ffh, 0);
	sd_tensor *dln = tmp_like(s, dout, 0);
	if (!dr || !dffg || !dffh || !dln) return -1;
	/* feed-forward: dr = dout + norm3ᵀ(ff1ᵀ(gegluᵀ(ff2ᵀ dout))) */
	if (sd_tensor_copy(dr, dout) || linear_back(dffg, dout, a->ffg, &p->ff2, 0) ||
	    sd_geglu_backward(dffh, dffg, a->ffh, 0) || linear_back(dln, dffh, a->ln3, &p->ff1, 0) ||
	    sd_layer_norm_backward(dr, NULL, NULL, dln, a->r2, p->ln3_w, BLOCK_NORM_EPS, 1))
		return -1;
	/* cross-attention: dr (now dr1) += norm2ᵀ(attn2ᵀ dr); the context's gradient into dctx */
	if (attn_backward(dln, dctx, dr, &a->a2, a->ln2, ctx, &p->attn2, s, 0) ||
	    sd_layer_norm_backward(dr, NULL, NULL, dln, a->r1, p->ln2_w, BLOCK_NORM_EPS, 1))
		return -1;
	/* self-attention: dx = dr + norm1ᵀ(attn1ᵀ dr) */
	if (attn_backward(dln, dln, dr, &a->a1, a->ln1, a->ln1, &p->attn1, s, 0)) return -1;
	if (!dx) return 0;
	if (acc ? sd_add(dx, dx, dr, 1.0f, 1.0f) : sd_tensor_copy(dx, dr)) return -1;
	return sd_layer_norm_backward(dx, NULL, NULL, dln, x, p->ln1_w, BLOCK_NORM_EPS, 1);
}

int sd_unet_transformer_backward(sd_tensor *dx, sd_tensor *dctx, const sd_tensor *dout,
                                 const sd_unet_transformer_act *a, const sd_tensor *x, const sd_tensor *ctx,
                                 const sd_unet_transformer *p, int groups, sd_arena *s, int acc)
{
	// out = x + nchw(proj_out(blocks(proj_in(nlc(norm(x))))))
	sd_tensor *dp = tmp_like(s, a->p, 0), *dh = tmp_like(s, a->h[p->nlayers], 0);
	if (!dp || !dh || sd_nlc_to_nchw_backward(dp, dout, 0) || linear_back(dh, dp, a->h[p->nlayers], &p->proj_out, 0))
		return -1;
	for (int k = p->nlayers - 1; k >= 0; k--) {
		sd_tensor *d = tmp_like(s, a->h[k], 0);
		if (!d || sd_unet_tblock_backward(d, dctx, dh, &a->blk[k], a->h[k], ctx, &p->blk[k], s, 0)) return -1;
		dh = d;
	}
	if (!dx) return 0;
	sd_tensor *dnl = tmp_like(s, a->nl, 0), *dn = tmp_like(s, a->n, 0);
	if (!dnl || !dn || linear_back(dnl, dh, a->nl, &p->proj_in, 0) || sd_nchw_to_nlc_backward(dn, dnl, 0) ||
	    (acc ? sd_add(dx, dx, dout, 1.0f, 1.0f) : sd_tensor_copy(dx, dout)))
		return -1;
	return sd_group_norm_backward(dx, NULL, NULL, dn, x, groups, p->norm_w, p->norm_b, TRANSFORMER_NORM_EPS, 0, 1);
}

/* ==== the model ==== */

struct sd_unet {
	sd_unet_config cfg;
	enum sd_device dev;
	const struct sd_backend *be;
	const sd_weights *w;
	sd_unet_conv conv_in, conv_out;
	sd_unet_linear time1, time2; /* time_embedding.linear_1, linear_2 */
	const sd_tensor *norm_out_w, *norm_out_b;
	int nres, ntr;
	sd_unet_resnet *res;     /* network order: down blocks, mid, up blocks */
	sd_unet_transformer *tr; /* likewise */
	sd_unet_conv down[MAXB], up[MAXB]; /* downsamplers.0.conv / upsamplers.0.conv (w NULL: none) */
	int down_res[MAXB], down_tr[MAXB], up_res[MAXB], up_tr[MAXB], mid_res, mid_tr; /* first index */
	int up_layers[MAXB];     /* resnets per up block */
	struct named { char *name; sd_unet_linear *l; } *lin; /* every linear layer by module name */
	int nlin, caplin;
	sd_tensor *views;        /* 2-D views of proj_in/proj_out stored as 1×1 convs */
	int nviews;
	sd_arena *hdr;           /* host: tensor headers of one call */
	sd_arena *own;           /* the keep arena when the caller gives none */
	sd_arena *tmp, *flow[2];
	int fi;                  /* the flow arena last written */
	size_t peak;
	sd_unet_hook hook;
	void *hook_ctx;
	/* sd_unet_new_random: weights made on demand and owned here */
	int random;
	uint64_t seed;
	sd_tensor **owned;
	int nowned;
	/* the recorded forward's arrays (nres / ntr entries) */
	sd_unet_resnet_act *rec_res;
	sd_unet_transformer_act *rec_tr;
	sd_tensor **rec_ptrs;
	/* sd_unet_backward: skip gradients, the flowing gradient (two, in turn), per-layer scratch, and the
	 * checkpointed recompute of one block */
	sd_arena *bkeep, *bflow[2], *bscr, *brc;
};

/* ---- weights ---- */

/* splitmix64 → uniform in [-1, 1) */
static float uniform(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	z ^= z >> 31;
	return (float)((z >> 40) * (1.0 / 8388608.0) - 1.0);
}

/* A random weight for sd_unet_new_random: convolutions and linears uniform with the scale of torch's
 * default init (±1/sqrt(fan_in)), norm scales 1 ± 0.1, biases ± 0.1. */
static const sd_tensor *random_weight(sd_unet *u, const char *suffix, int nd, const int64_t *shape)
{
	sd_tensor *t = sd_tensor_new(SD_DTYPE_F32, nd, shape), **o;
	if (!t) return NULL;
	float *p = t->data, a = 0.1f, c = 0.0f;
	int64_t n = sd_tensor_numel(t);
	if (nd > 1) a = 1.0f / sqrtf((float)(n / shape[0]));
	else if (!strcmp(suffix, "weight")) c = 1.0f;
	for (int64_t i = 0; i < n; i++) p[i] = c + a * uniform(&u->seed);
	if (u->dev != SD_DEVICE_CPU) {
		sd_tensor *d = sd_tensor_to_device(t, u->dev);
		sd_tensor_free(t);
		if (!(t = d)) return NULL;
	}
	if (!(o = realloc(u->owned, (u->nowned + 1) * sizeof *o))) {
		sd_tensor_free(t);
		sd_seterr("out of memory");
		return NULL;
	}
	u->owned = o;
	return o[u->nowned++] = t;
}

/* The weight "<prefix>.<suffix>" of exactly the given shape (dims ≤ 0 end it). */
static const sd_tensor *weight(sd_unet *u, const char *prefix, const char *suffix, int64_t d0, int64_t d1,
                               int64_t d2, int64_t d3)
{
	int64_t want[4] = {d0, d1, d2, d3};
	int nd = 0;
	while (nd < 4 && want[nd] > 0) nd++;
	if (u->random) return random_weight(u, suffix, nd, want);
	const sd_tensor *t = sd_weights_need(u->w, "%s.%s", prefix, suffix);
	if (!t) return NULL;
	/* matrices and kernels may be kept as stored (f16, bf16: sd_weights_load_stored), vectors are f32 */
	int ok = t->ndim == nd && t->device == u->dev &&
	         (t->dtype == SD_DTYPE_F32 || (nd >= 2 && (t->dtype == SD_DTYPE_F16 || t->dtype == SD_DTYPE_BF16)));
	for (int i = 0; ok && i < nd; i++) ok = t->shape[i] == want[i];
	if (!ok) {
		char a[96], b[96];
		sd_seterr("unet: weight '%s.%s' is %s %s, expected f32 %s", prefix, suffix, sd_dtype_name(t->dtype),
		          sd_shape_str(t->ndim, t->shape, a, sizeof a), sd_shape_str(nd, want, b, sizeof b));
		return NULL;
	}
	return t;
}

/* A weight by name when it exists (never with random weights). */
static const sd_tensor *maybe(const sd_unet *u, const char *name)
{
	return u->random ? NULL : sd_weights_get(u->w, name);
}

static int get_conv(sd_unet *u, sd_unet_conv *c, const char *prefix, int64_t O, int64_t C, int k)
{
	return (c->w = weight(u, prefix, "weight", O, C, k, k)) && (c->b = weight(u, prefix, "bias", O, 0, 0, 0)) ? 0 : -1;
}

static int get_norm(sd_unet *u, const sd_tensor **g, const sd_tensor **b, const char *prefix, int64_t C,
                    int groups)
{
	if (groups && C % groups)
		return sd_seterr("unet: %s: %lld channels do not split into %d groups", prefix, (long long)C, groups);
	return (*g = weight(u, prefix, "weight", C, 0, 0, 0)) && (*b = weight(u, prefix, "bias", C, 0, 0, 0)) ? 0 : -1;
}

/* A linear "<prefix>" (O, I), with a bias when `bias`; a 1×1 conv (O, I, 1, 1) when `conv_ok`. */
static int get_linear(sd_unet *u, sd_unet_linear *l, const char *prefix, int64_t O, int64_t I, int bias, int conv_ok)
{
	char s[200];
	memset(l, 0, sizeof *l);
	snprintf(s, sizeof s, "%s.weight", prefix);
	const sd_tensor *w = maybe(u, s);
	if (conv_ok && w && w->ndim == 4) {
		if (!weight(u, prefix, "weight", O, I, 1, 1)) return -1;
		sd_tensor *t = &u->views[u->nviews++];
		*t = *w;
		t->ndim = 2;
		t->owns = 0;
		l->w = t;
	} else if (!(l->w = weight(u, prefix, "weight", O, I, 0, 0)))
		return -1;
	if (bias && !(l->b = weight(u, prefix, "bias", O, 0, 0, 0))) return -1;
	if (u->nlin == u->caplin) {
		int cap = u->caplin ? 2 * u->caplin : 256;
		struct named *p = realloc(u->lin, cap * sizeof *p);
		if (!p) return sd_seterr("out of memory");
		u->lin = p;
		u->caplin = cap;
	}
	if (!(u->lin[u->nlin].name = strdup(prefix))) return sd_seterr("out of memory");
	u->lin[u->nlin++].l = l;
	return 0;
}

static int get_resnet(sd_unet *u, sd_unet_resnet *r, const char *prefix, int cin, int cout, float scale)
{
	const sd_unet_config *c = &u->cfg;
	char s[200];
	r->cin = cin;
	r->cout = cout;
	r->out_scale = scale;
	memset(&r->shortcut, 0, sizeof r->shortcut);
#define SUB(name) (snprintf(s, sizeof s, "%s." name, prefix), s)
	if (get_norm(u, &r->norm1_w, &r->norm1_b, SUB("norm1"), cin, c->groups) ||
	    get_conv(u, &r->conv1, SUB("conv1"), cout, cin, 3) ||
	    get_linear(u, &r->temb, SUB("time_emb_proj"), cout, c->temb_dim, 1, 0) ||
	    get_norm(u, &r->norm2_w, &r->norm2_b, SUB("norm2"), cout, c->groups) ||
	    get_conv(u, &r->conv2, SUB("conv2"), cout, cout, 3))
		return -1;
	if (cin != cout && get_conv(u, &r->shortcut, SUB("conv_shortcut"), cout, cin, 1)) return -1;
#undef SUB
	return 0;
}

static int get_attn(sd_unet *u, sd_unet_attn *a, const char *prefix, int D, int Dkv, int heads)
{
	char s[200];
	a->heads = heads;
	a->dim_head = D / heads;
	int inner = D; /* heads · (D / heads) */
#define SUB(name) (snprintf(s, sizeof s, "%s." name, prefix), s)
	return get_linear(u, &a->q, SUB("to_q"), inner, D, 0, 0) || get_linear(u, &a->k, SUB("to_k"), inner, Dkv, 0, 0) ||
	               get_linear(u, &a->v, SUB("to_v"), inner, Dkv, 0, 0) ||
	               get_linear(u, &a->out, SUB("to_out.0"), D, inner, 1, 0)
	           ? -1
	           : 0;
#undef SUB
}

static int get_transformer(sd_unet *u, sd_unet_transformer *t, const char *prefix, int C, int heads, int cross,
                           int layers)
{
	char s[256], b[160];
	if (heads < 1 || C % heads)
		return sd_seterr("unet: %s: %d channels do not split into %d attention heads", prefix, C, heads);
	if (layers < 1 || layers > SD_UNET_MAX_TLAYERS)
		return sd_seterr("unet: %s: %d transformer layers, expected 1 to %d", prefix, layers, SD_UNET_MAX_TLAYERS);
	t->c = t->inner = C;
	t->nlayers = layers;
#define SUB(...) (snprintf(s, sizeof s, __VA_ARGS__), s)
	if (get_norm(u, &t->norm_w, &t->norm_b, SUB("%s.norm", prefix), C, u->cfg.groups) ||
	    get_linear(u, &t->proj_in, SUB("%s.proj_in", prefix), C, C, 1, 1) ||
	    get_linear(u, &t->proj_out, SUB("%s.proj_out", prefix), C, C, 1, 1))
		return -1;
	for (int k = 0; k < layers; k++) {
		sd_unet_tblock *p = &t->blk[k];
		snprintf(b, sizeof b, "%s.transformer_blocks.%d", prefix, k);
		if (get_norm(u, &p->ln1_w, &p->ln1_b, SUB("%s.norm1", b), C, 0) ||
		    get_norm(u, &p->ln2_w, &p->ln2_b, SUB("%s.norm2", b), C, 0) ||
		    get_norm(u, &p->ln3_w, &p->ln3_b, SUB("%s.norm3", b), C, 0) ||
		    get_attn(u, &p->attn1, SUB("%s.attn1", b), C, C, heads) ||
		    get_attn(u, &p->attn2, SUB("%s.attn2", b), C, cross, heads) ||
		    get_linear(u, &p->ff1, SUB("%s.ff.net.0.proj", b), 8 * (int64_t)C, C, 1, 0) ||
		    get_linear(u, &p->ff2, SUB("%s.ff.net.2", b), C, 4 * (int64_t)C, 1, 0))
			return -1;
	}
	/* one more transformer block than the config says would be silently ignored: refuse it */
	if (maybe(u, SUB("%s.transformer_blocks.%d.norm1.weight", prefix, layers)))
		return sd_seterr("unet: %s has more than the %d transformer layers of the config", prefix, layers);
#undef SUB
	return 0;
}

/* ---- config ---- */

/* An int (default def), checked against [lo, hi]. */
static int cfg_int(const sd_weights *w, const char *key, int def, int lo, int hi, int *out)
{
	int64_t x;
	int rc = sd_config_int(w, key, &x);
	if (rc < 0) return sd_preerr("unet: config");
	if (rc == 0 && (x < lo || x > hi))
		return sd_seterr("unet: config: %s = %lld is out of range [%d, %d]", key, (long long)x, lo, hi);
	*out = rc == 0 ? (int)x : def;
	return 0;
}

/* A per-down-block int list (an int broadcasts); absent → def.  1 when absent, 0 when read, -1 error. */
static int cfg_list(const sd_weights *w, const char *key, int nb, int def, int lo, int hi, int *out)
{
	int64_t v[MAXB + 1];
	int n = 0, rc = sd_config_int_array(w, key, v, MAXB + 1, &n);
	if (rc < 0) return sd_preerr("unet: config");
	if (rc == 1) {
		for (int i = 0; i < nb; i++) out[i] = def;
		return 1;
	}
	if (n != 1 && n != nb)
		return sd_seterr("unet: config: %s has %d entries for %d blocks", key, n, nb);
	for (int i = 0; i < nb; i++) {
		int64_t x = v[n == 1 ? 0 : i];
		if (x < lo || x > hi)
			return sd_seterr("unet: config: %s = %lld is out of range [%d, %d]", key, (long long)x, lo, hi);
		out[i] = (int)x;
	}
	return 0;
}

static int cfg_bool(const sd_weights *w, const char *key, int def, int *out)
{
	int rc = sd_config_bool(w, key, out);
	if (rc < 0) return sd_preerr("unet: config");
	if (rc) *out = def;
	return 0;
}

/* A string key must be absent, null or one of the accepted values (NULL-terminated). */
static int cfg_only(const sd_weights *w, const char *key, const char *const *ok)
{
	const char *s;
	int rc = sd_config_str(w, key, &s);
	if (rc < 0) return sd_preerr("unet: config");
	if (rc == 1) return 0;
	for (; *ok; ok++)
		if (!strcmp(s, *ok)) return 0;
	return sd_seterr("unet: config: %s \"%s\" is not supported", key, s);
}

static int read_config(sd_unet *u)
{
	sd_unet_config *c = &u->cfg;
	const sd_weights *w = u->w;
	int64_t arr[MAXB + 1];
	int n = 0, rc;

	/* options that change the network into something this file does not build */
	static const char *const unsupported[] = {
		"class_embed_type", "addition_embed_type", "encoder_hid_dim", "encoder_hid_dim_type", "time_cond_proj_dim",
		"num_class_embeds", "timestep_post_act", "time_embedding_act_fn", "cross_attention_norm",
		"projection_class_embeddings_input_dim", "addition_time_embed_dim",
	};
	for (size_t i = 0; i < sizeof unsupported / sizeof *unsupported; i++) {
		int64_t x;
		const char *str;
		int b;
		if (sd_config_int(w, unsupported[i], &x) == 0 || sd_config_str(w, unsupported[i], &str) == 0 ||
		    sd_config_bool(w, unsupported[i], &b) == 0)
			return sd_seterr("unet: config: %s is set; it is not supported (Stable Diffusion 1.x/2.x UNets only)",
			                 unsupported[i]);
	}
	static const char *const silu[] = {"silu", "swish", NULL}, *const positional[] = {"positional", NULL},
	                         *const def[] = {"default", NULL};
	if (cfg_only(w, "act_fn", silu) || cfg_only(w, "time_embedding_type", positional) ||
	    cfg_only(w, "resnet_time_scale_shift", def) || cfg_only(w, "attention_type", def))
		return -1;
	static const char *const off[] = {"dual_cross_attention", "resnet_skip_time_act", "class_embeddings_concat",
	                                  "mid_block_only_cross_attention", "only_cross_attention"};
	for (size_t i = 0; i < sizeof off / sizeof *off; i++) {
		int b = 0;
		rc = sd_config_bool(w, off[i], &b);
		if (rc < 0 && !strcmp(off[i], "only_cross_attention")) { /* a list of booleans */
			int64_t v[MAXB + 1];
			int k = 0;
			rc = 0;
			if (sd_config_int_array(w, off[i], v, MAXB + 1, &k) == 0)
				for (int j = 0; j < k; j++) b |= v[j] != 0;
			else
				b = 1;
		}
		if (rc < 0) return sd_preerr("unet: config");
		if (b) return sd_seterr("unet: config: %s is true; it is not supported", off[i]);
	}

	rc = sd_config_int_array(w, "block_out_channels", arr, MAXB + 1, &n);
	if (rc < 0) return sd_preerr("unet: config");
	if (rc == 1) return sd_seterr("unet: config: no block_out_channels");
	if (n < 1 || n > MAXB) return sd_seterr("unet: %d blocks (block_out_channels), expected 1 to %d", n, MAXB);
	c->nblocks = n;
	for (int i = 0; i < n; i++) {
		if (arr[i] < 1 || arr[i] > 1 << 16)
			return sd_seterr("unet: config: block_out_channels[%d] = %lld is out of range", i, (long long)arr[i]);
		c->block_out[i] = (int)arr[i];
	}
	const char *types[MAXB + 1];
	int nt = 0;
	for (int up = 0; up < 2; up++) {
		const char *key = up ? "up_block_types" : "down_block_types";
		const char *with = up ? "CrossAttnUpBlock2D" : "CrossAttnDownBlock2D", *plain = up ? "UpBlock2D" : "DownBlock2D";
		int *flag = up ? c->up_attn : c->down_attn;
		rc = sd_config_str_array(w, key, types, MAXB + 1, &nt);
		if (rc < 0) return sd_preerr("unet: config");
		if (rc == 1) return sd_seterr("unet: config: no %s", key);
		if (nt != n) return sd_seterr("unet: config: %s has %d entries for %d blocks", key, nt, n);
		for (int i = 0; i < n; i++) {
			if (!strcmp(types[i], with)) flag[i] = 1;
			else if (!strcmp(types[i], plain)) flag[i] = 0;
			else return sd_seterr("unet: config: %s[%d] \"%s\" is not supported (%s or %s)", key, i, types[i], with, plain);
		}
	}
	const char *mid;
	rc = sd_config_str(w, "mid_block_type", &mid);
	if (rc < 0) return sd_preerr("unet: config");
	if (rc == 0) {
		if (strcmp(mid, "UNetMidBlock2DCrossAttn"))
			return sd_seterr("unet: config: mid_block_type \"%s\" is not supported (UNetMidBlock2DCrossAttn)", mid);
		c->mid_attn = 1;
	} else { /* absent or null: what the weights hold */
		c->mid_attn = sd_weights_get(w, "mid_block.resnets.0.conv1.weight") != NULL;
		if (c->mid_attn && !sd_weights_get(w, "mid_block.attentions.0.norm.weight"))
			return sd_seterr("unet: the mid block has no attention (UNetMidBlock2D is not supported)");
	}

	const sd_tensor *t = sd_weights_need(w, "conv_in.weight");
	if (!t) return sd_preerr("unet");
	int in = t->ndim == 4 ? (int)t->shape[1] : 4;
	if (!(t = sd_weights_need(w, "conv_out.weight"))) return sd_preerr("unet");
	int out = t->ndim == 4 ? (int)t->shape[0] : 4;
	if (cfg_int(w, "in_channels", in, 1, 1 << 16, &c->in_channels) ||
	    cfg_int(w, "out_channels", out, 1, 1 << 16, &c->out_channels) ||
	    cfg_list(w, "layers_per_block", n, 2, 1, 64, c->layers) < 0 ||
	    cfg_list(w, "cross_attention_dim", n, 768, 1, 1 << 16, c->cross_dim) < 0 ||
	    cfg_list(w, "transformer_layers_per_block", n, 1, 1, SD_UNET_MAX_TLAYERS, c->tlayers) < 0 ||
	    cfg_int(w, "norm_num_groups", 32, 1, 1 << 16, &c->groups) ||
	    cfg_int(w, "conv_in_kernel", 3, 1, 15, &c->conv_in_kernel) ||
	    cfg_int(w, "conv_out_kernel", 3, 1, 15, &c->conv_out_kernel) ||
	    cfg_bool(w, "use_linear_projection", 0, &c->linear_proj) ||
	    cfg_bool(w, "upcast_attention", 0, &c->upcast_attention) ||
	    cfg_bool(w, "flip_sin_to_cos", 1, &c->flip_sin_to_cos) ||
	    cfg_bool(w, "center_input_sample", 0, &c->center_input_sample))
		return -1;
	if (!(c->conv_in_kernel & 1) || !(c->conv_out_kernel & 1))
		return sd_seterr("unet: config: conv_in_kernel / conv_out_kernel must be odd");
	/* heads: num_attention_heads, else attention_head_dim (diffusers' SD 1.x misnomer), else 8 */
	if ((rc = cfg_list(w, "num_attention_heads", n, 8, 1, 1 << 16, c->heads)) < 0) return -1;
	if (rc == 1 && cfg_list(w, "attention_head_dim", n, 8, 1, 1 << 16, c->heads) < 0) return -1;
	/* the up blocks' transformer depth: reverse_transformer_layers_per_block, else the reverse */
	int64_t rv[MAXB + 1];
	int nr = 0;
	rc = sd_config_int_array(w, "reverse_transformer_layers_per_block", rv, MAXB + 1, &nr);
	if (rc < 0) return sd_preerr("unet: config (reverse_transformer_layers_per_block: one int per up block)");
	for (int i = 0; i < n; i++) {
		c->up_tlayers[i] = c->tlayers[n - 1 - i];
		if (rc == 0) {
			int64_t x = rv[nr == 1 ? 0 : i < nr ? i : nr - 1];
			if (x < 1 || x > SD_UNET_MAX_TLAYERS)
				return sd_seterr("unet: config: reverse_transformer_layers_per_block = %lld is out of range", (long long)x);
			c->up_tlayers[i] = (int)x;
		}
	}
	double d;
	c->eps = 1e-5f;
	if ((rc = sd_config_float(w, "norm_eps", &d)) < 0) return sd_preerr("unet: config");
	if (rc == 0) {
		if (!(d > 0 && d < 1)) return sd_seterr("unet: config: norm_eps %g is out of range", d);
		c->eps = (float)d;
	}
	c->freq_shift = 0;
	if ((rc = sd_config_float(w, "freq_shift", &d)) < 0) return sd_preerr("unet: config");
	if (rc == 0) c->freq_shift = (float)d;
	c->mid_scale = 1;
	if ((rc = sd_config_float(w, "mid_block_scale_factor", &d)) < 0) return sd_preerr("unet: config");
	if (rc == 0) {
		if (!(d > 0 && isfinite(d))) return sd_seterr("unet: config: mid_block_scale_factor %g is not positive", d);
		c->mid_scale = (float)d;
	}
	c->time_proj_dim = c->block_out[0];
	if (c->time_proj_dim / 2 - c->freq_shift == 0)
		return sd_seterr("unet: config: freq_shift %g leaves no frequencies", c->freq_shift);
	if (cfg_int(w, "time_embedding_dim", 4 * c->block_out[0], 1, 1 << 20, &c->temb_dim)) return -1;
	return 0;
}

/* ---- building ---- */

static int build(sd_unet *u)
{
	const sd_unet_config *c = &u->cfg;
	int nb = c->nblocks, top = c->block_out[nb - 1];
	char s[200];
	/* count the layers */
	u->nres = u->ntr = 0;
	for (int i = 0; i < nb; i++) {
		u->nres += c->layers[i] + c->layers[nb - 1 - i] + 1;
		if (c->down_attn[i]) u->ntr += c->layers[i];
		if (c->up_attn[i]) u->ntr += c->layers[nb - 1 - i] + 1;
	}
	if (c->mid_attn) u->nres += 2, u->ntr += 1;
	u->res = calloc(u->nres, sizeof *u->res);
	u->tr = calloc(u->ntr ? u->ntr : 1, sizeof *u->tr);
	u->views = calloc(2 * (size_t)u->ntr + 1, sizeof *u->views);
	if (!u->res || !u->tr || !u->views) return sd_seterr("out of memory");

	if (get_conv(u, &u->conv_in, "conv_in", c->block_out[0], c->in_channels, c->conv_in_kernel) ||
	    get_linear(u, &u->time1, "time_embedding.linear_1", c->temb_dim, c->time_proj_dim, 1, 0) ||
	    get_linear(u, &u->time2, "time_embedding.linear_2", c->temb_dim, c->temb_dim, 1, 0))
		return -1;
	int r = 0, t = 0, ch = c->block_out[0];
	for (int i = 0; i < nb; i++) {
		int oc = c->block_out[i];
		u->down_res[i] = r;
		u->down_tr[i] = t;
		for (int j = 0; j < c->layers[i]; j++) {
			snprintf(s, sizeof s, "down_blocks.%d.resnets.%d", i, j);
			if (get_resnet(u, &u->res[r++], s, ch, oc, 1.0f)) return -1;
			ch = oc;
			if (c->down_attn[i]) {
				snprintf(s, sizeof s, "down_blocks.%d.attentions.%d", i, j);
				if (get_transformer(u, &u->tr[t++], s, oc, c->heads[i], c->cross_dim[i], c->tlayers[i])) return -1;
			}
		}
		if (i < nb - 1) {
			snprintf(s, sizeof s, "down_blocks.%d.downsamplers.0.conv", i);
			if (get_conv(u, &u->down[i], s, oc, oc, 3)) return -1;
		}
	}
	u->mid_res = r;
	u->mid_tr = t;
	if (c->mid_attn) {
		if (get_resnet(u, &u->res[r++], "mid_block.resnets.0", top, top, c->mid_scale) ||
		    get_transformer(u, &u->tr[t++], "mid_block.attentions.0", top, c->heads[nb - 1], c->cross_dim[nb - 1],
		                    c->tlayers[nb - 1]) ||
		    get_resnet(u, &u->res[r++], "mid_block.resnets.1", top, top, c->mid_scale))
			return -1;
	}
	/* up blocks: reversed channels, layers+1 resnets each taking a skip, an upsampler on all but the last */
	int prev = top;
	for (int i = 0; i < nb; i++) {
		int k = nb - 1 - i, oc = c->block_out[k], in = c->block_out[k > 0 ? k - 1 : 0];
		int nl = c->layers[k] + 1;
		u->up_res[i] = r;
		u->up_tr[i] = t;
		u->up_layers[i] = nl;
		for (int j = 0; j < nl; j++) {
			int skip = j == nl - 1 ? in : oc, rin = j == 0 ? prev : oc;
			snprintf(s, sizeof s, "up_blocks.%d.resnets.%d", i, j);
			if (get_resnet(u, &u->res[r++], s, rin + skip, oc, 1.0f)) return -1;
			if (c->up_attn[i]) {
				snprintf(s, sizeof s, "up_blocks.%d.attentions.%d", i, j);
				if (get_transformer(u, &u->tr[t++], s, oc, c->heads[k], c->cross_dim[k], c->up_tlayers[i])) return -1;
			}
		}
		if (i < nb - 1) {
			snprintf(s, sizeof s, "up_blocks.%d.upsamplers.0.conv", i);
			if (get_conv(u, &u->up[i], s, oc, oc, 3)) return -1;
		}
		prev = oc;
	}
	if (get_norm(u, &u->norm_out_w, &u->norm_out_b, "conv_norm_out", c->block_out[0], c->groups) ||
	    get_conv(u, &u->conv_out, "conv_out", c->out_channels, c->block_out[0], c->conv_out_kernel))
		return -1;
	/* weights the config does not account for would be silently ignored: refuse them */
	snprintf(s, sizeof s, "down_blocks.%d.resnets.0.conv1.weight", nb);
	if (maybe(u, s)) return sd_seterr("unet: the weights have more down blocks than the config's %d", nb);
	for (int i = 0; i < nb; i++) {
		snprintf(s, sizeof s, "down_blocks.%d.resnets.%d.conv1.weight", i, c->layers[i]);
		if (maybe(u, s))
			return sd_seterr("unet: down_blocks.%d has more resnets than layers_per_block %d", i, c->layers[i]);
		snprintf(s, sizeof s, "down_blocks.%d.attentions.0.norm.weight", i);
		if (!c->down_attn[i] && maybe(u, s))
			return sd_seterr("unet: down_blocks.%d has attentions but the config says DownBlock2D", i);
		snprintf(s, sizeof s, "up_blocks.%d.attentions.0.norm.weight", i);
		if (!c->up_attn[i] && maybe(u, s))
			return sd_seterr("unet: up_blocks.%d has attentions but the config says UpBlock2D", i);
	}
	return 0;
}

sd_unet *sd_unet_new(const sd_weights *w)
{
	if (!w) {
		sd_seterr("unet: no weights");
		return NULL;
	}
	if (sd_weights_component(w) != SD_UNET) {
		sd_seterr("unet: the weights are those of the %s", sd_component_name(sd_weights_component(w)));
		return NULL;
	}
	sd_unet *u = calloc(1, sizeof *u);
	if (!u) {
		sd_seterr("out of memory");
		return NULL;
	}
	u->w = w;
	const sd_tensor *any = sd_weights_count(w) > 0 ? sd_weights_at(w, 0) : NULL;
	u->dev = any ? any->device : SD_DEVICE_CPU;
	if (!(u->be = sd_backend_get(u->dev)) || read_config(u) || build(u) ||
	    !(u->hdr = sd_arena_new(SD_DEVICE_CPU, 1 << 18)) || !(u->tmp = sd_arena_new(u->dev, 0)) ||
	    !(u->flow[0] = sd_arena_new(u->dev, 0)) || !(u->flow[1] = sd_arena_new(u->dev, 0))) {
		sd_unet_free(u);
		return NULL;
	}
	return u;
}

/* Fill what a hand-made config leaves 0 with diffusers' defaults; -1 when the sizes are impossible. */
static int complete_config(sd_unet_config *c)
{
	int nb = c->nblocks;
	if (nb < 1 || nb > MAXB || c->in_channels < 1 || c->out_channels < 1)
		return sd_seterr("unet: a random UNet of impossible sizes");
	for (int i = 0; i < nb; i++) {
		if (c->block_out[i] < 1) return sd_seterr("unet: a random UNet of impossible sizes");
		if (!c->layers[i]) c->layers[i] = 2;
		if (!c->heads[i]) c->heads[i] = 8;
		if (!c->cross_dim[i]) c->cross_dim[i] = 768;
		if (!c->tlayers[i]) c->tlayers[i] = 1;
	}
	for (int i = 0; i < nb; i++)
		if (!c->up_tlayers[i]) c->up_tlayers[i] = c->tlayers[nb - 1 - i];
	if (!c->groups) c->groups = 32;
	if (!(c->eps > 0)) c->eps = 1e-5f;
	if (!c->conv_in_kernel) c->conv_in_kernel = 3;
	if (!c->conv_out_kernel) c->conv_out_kernel = 3;
	if (!(c->mid_scale > 0)) c->mid_scale = 1;
	c->time_proj_dim = c->block_out[0];
	if (!c->temb_dim) c->temb_dim = 4 * c->block_out[0];
	return 0;
}

sd_unet *sd_unet_new_random(const sd_unet_config *cfg, enum sd_device dev, uint64_t seed)
{
	sd_unet *u = calloc(1, sizeof *u);
	if (!u) {
		sd_seterr("out of memory");
		return NULL;
	}
	u->cfg = *cfg;
	u->dev = dev;
	u->random = 1;
	u->seed = seed;
	if (complete_config(&u->cfg) || !(u->be = sd_backend_get(dev)) || build(u) ||
	    !(u->hdr = sd_arena_new(SD_DEVICE_CPU, 1 << 18)) || !(u->tmp = sd_arena_new(u->dev, 0)) ||
	    !(u->flow[0] = sd_arena_new(u->dev, 0)) || !(u->flow[1] = sd_arena_new(u->dev, 0))) {
		sd_unet_free(u);
		return NULL;
	}
	return u;
}

void sd_unet_free(sd_unet *u)
{
	if (!u) return;
	for (int i = 0; i < u->nowned; i++) sd_tensor_free(u->owned[i]);
	free(u->owned);
	sd_arena_free(u->hdr);
	sd_arena_free(u->own);
	sd_arena_free(u->tmp);
	sd_arena_free(u->flow[0]);
	sd_arena_free(u->flow[1]);
	free(u->res);
	free(u->tr);
	free(u->views);
	for (int i = 0; i < u->nlin; i++) free(u->lin[i].name);
	free(u->lin);
	free(u->rec_res);
	free(u->rec_tr);
	free(u->rec_ptrs);
	sd_arena_free(u->bkeep);
	sd_arena_free(u->bflow[0]);
	sd_arena_free(u->bflow[1]);
	sd_arena_free(u->bscr);
	sd_arena_free(u->brc);
	free(u);
}

const sd_unet_config *sd_unet_get_config(const sd_unet *u)
{
	return &u->cfg;
}

int sd_unet_resnet_count(const sd_unet *u)
{
	return u->nres;
}

sd_unet_resnet *sd_unet_get_resnet(sd_unet *u, int i)
{
	return i >= 0 && i < u->nres ? &u->res[i] : NULL;
}

int sd_unet_transformer_count(const sd_unet *u)
{
	return u->ntr;
}

sd_unet_transformer *sd_unet_get_transformer(sd_unet *u, int i)
{
	return i >= 0 && i < u->ntr ? &u->tr[i] : NULL;
}

sd_unet_linear *sd_unet_find_linear(sd_unet *u, const char *module)
{
	for (int i = 0; i < u->nlin; i++)
		if (!strcmp(u->lin[i].name, module)) return u->lin[i].l;
	return NULL;
}

int sd_unet_linear_count(const sd_unet *u)
{
	return u->nlin;
}

const char *sd_unet_linear_name(const sd_unet *u, int i)
{
	return i >= 0 && i < u->nlin ? u->lin[i].name : NULL;
}

size_t sd_unet_peak_bytes(const sd_unet *u)
{
	return u->peak;
}

void sd_unet_set_hook(sd_unet *u, sd_unet_hook fn, void *ctx)
{
	u->hook = fn;
	u->hook_ctx = ctx;
}

/* ==== one forward ==== */

enum { KEEP, TMP, FLOW };

typedef struct run {
	sd_unet *u;
	sd_arena *keep;
	int rec;          /* every activation its own tensor in keep; nothing reset */
	int ckpt;         /* with rec: only the layer outputs are kept, a layer's internals (TMP) are not */
	sd_unet_act *act; /* where the recorded forward writes, or NULL */
	int hook;
} run;

/* A header (host arena) over data (N,C,H,W) or (N,C,H) when W is 0, or (N,C) when H is 0 too. */
static sd_tensor *hdr(run *r, void *data, int64_t N, int64_t C, int64_t H, int64_t W)
{
	sd_tensor *t = sd_arena_alloc(r->u->hdr, sizeof *t);
	if (!t) return NULL;
	memset(t, 0, sizeof *t);
	t->dtype = SD_DTYPE_F32;
	t->device = r->u->dev;
	t->data = data;
	int64_t sh[4] = {N, C, H, W};
	t->ndim = W > 0 ? 4 : H > 0 ? 3 : 2;
	memcpy(t->shape, sh, sizeof sh);
	return t;
}

/* A new activation from the arena `where` says. */
static sd_tensor *tnew(run *r, int where, int64_t N, int64_t C, int64_t H, int64_t W)
{
	sd_unet *u = r->u;
	sd_arena *a = (r->rec && !(r->ckpt && where == TMP)) || where == KEEP ? r->keep : where == TMP ? u->tmp
	                                                                                             : u->flow[u->fi];
	int64_t n = N * C * (H > 0 ? H : 1) * (W > 0 ? W : 1);
	void *p = sd_arena_alloc(a, (size_t)(n > 0 ? n : 1) * sizeof(float));
	return p ? hdr(r, p, N, C, H, W) : NULL;
}

/* Switch to the other flow arena, forgetting what it held (two layers old). */
static void flip(run *r)
{
	if (r->rec) return;
	r->u->fi ^= 1;
	sd_arena_reset(r->u->flow[r->u->fi]);
}

static size_t live_bytes(run *r)
{
	sd_unet *u = r->u;
	return sd_arena_used(r->keep) + sd_arena_used(u->tmp) + sd_arena_used(u->flow[0]) + sd_arena_used(u->flow[1]);
}

/* The end of a layer: its scratch is dead. */
static void layer_done(run *r)
{
	size_t b = live_bytes(r);
	if (b > r->u->peak) r->u->peak = b;
	if (!r->rec || r->ckpt) sd_arena_reset(r->u->tmp);
}

static void hook(run *r, const char *name, const sd_tensor *t)
{
	if (r->hook) r->u->hook(r->u->hook_ctx, name, t);
}

#define N_(t) ((t)->shape[0])
#define C_(t) ((t)->shape[1])
#define H_(t) ((t)->shape[2])
#define W_(t) ((t)->shape[3])

/* out = resnet i (x); out from `where` (KEEP or FLOW: flip first). */
static sd_tensor *resnet(run *r, int i, const sd_tensor *x, const sd_tensor *temb_act, int where)
{
	sd_unet *u = r->u;
	const sd_unet_resnet *p = &u->res[i];
	int64_t N = N_(x), H = H_(x), W = W_(x), ci = p->cin, co = p->cout;
	sd_unet_resnet_act a = {0};
	if (where == FLOW) flip(r);
	sd_tensor *out = tnew(r, where, N, co, H, W);
	if (!out) return NULL;
	if (r->rec) {
		if (!(a.n1 = tnew(r, TMP, N, ci, H, W)) || !(a.h1 = tnew(r, TMP, N, ci, H, W)) ||
		    !(a.tp = tnew(r, TMP, N, co, 0, 0)) || !(a.a1 = tnew(r, TMP, N, co, H, W)) ||
		    !(a.n2 = tnew(r, TMP, N, co, H, W)) || !(a.h2 = tnew(r, TMP, N, co, H, W)) ||
		    (p->shortcut.w && !(a.sc = tnew(r, TMP, N, co, H, W))))
			return NULL;
		r->act->res[i] = a;
		if (r->ckpt) memset(&r->act->res[i], 0, sizeof a);
		r->act->res_in[i] = (sd_tensor *)x;
		r->act->res_out[i] = out;
	} else {
		/* b1 = n1 = h1, b2 = a1 = n2 = h2; the shortcut in b1 when it fits (h1 is dead by then) */
		if (!(a.n1 = a.h1 = tnew(r, TMP, N, ci, H, W)) || !(a.tp = tnew(r, TMP, N, co, 0, 0)) ||
		    !(a.a1 = a.n2 = a.h2 = tnew(r, TMP, N, co, H, W)))
			return NULL;
		if (p->shortcut.w && !(a.sc = ci >= co ? hdr(r, a.h1->data, N, co, H, W) : tnew(r, TMP, N, co, H, W)))
			return NULL;
	}
	const sd_unet_config *c = &u->cfg;
	if (sd_unet_resnet_forward(out, &a, x, temb_act, p, c->groups, c->eps)) {
		sd_preerr("unet: resnet %d", i);
		return NULL;
	}
	layer_done(r);
	return out;
}

static int lora_rank(const sd_unet_attn *p)
{
	int m = 0;
	const sd_unet_linear *l[4] = {&p->q, &p->k, &p->v, &p->out};
	for (int i = 0; i < 4; i++)
		if (l[i]->lora_a && l[i]->lora_a->ndim == 2 && l[i]->lora_a->shape[0] > m) m = (int)l[i]->lora_a->shape[0];
	return m;
}

/* Activations of one attention (q from Lq rows of D, k/v from Lk rows); share: inference buffers. */
static int attn_act(run *r, sd_unet_attn_act *a, const sd_unet_attn *p, int64_t N, int64_t Lq, int64_t Lk,
                    int64_t D, const sd_unet_attn_act *share)
{
	int rank = lora_rank(p);
	memset(a, 0, sizeof *a);
	if (r->rec) {
		if (!(a->q = tnew(r, TMP, N, Lq, D, 0)) || !(a->k = tnew(r, TMP, N, Lk, D, 0)) ||
		    !(a->v = tnew(r, TMP, N, Lk, D, 0)) || !(a->probs = tnew(r, TMP, N, p->heads, Lq, Lk)) ||
		    !(a->o = tnew(r, TMP, N, Lq, D, 0)))
			return -1;
	} else if (share) {
		a->q = share->q;
		a->o = share->o;
		if (!(a->k = tnew(r, TMP, N, Lk, D, 0)) || !(a->v = tnew(r, TMP, N, Lk, D, 0))) return -1;
	} else if (!(a->q = tnew(r, TMP, N, Lq, D, 0)) || !(a->k = tnew(r, TMP, N, Lk, D, 0)) ||
	           !(a->v = tnew(r, TMP, N, Lk, D, 0)) || !(a->o = tnew(r, TMP, N, Lq, D, 0)))
		return -1;
	if (rank && !(a->lora = tnew(r, TMP, N, Lq > Lk ? Lq : Lk, rank, 0))) return -1;
	return 0;
}

/* out = transformer i (x, ctx); out from `where`. */
static sd_tensor *transformer(run *r, int i, const sd_tensor *x, const sd_tensor *ctx, int where)
{
	sd_unet *u = r->u;
	const sd_unet_transformer *p = &u->tr[i];
	int64_t N = N_(x), C = C_(x), H = H_(x), W = W_(x), L = H * W, I = p->inner, Lc = ctx->shape[1];
	sd_unet_transformer_act a;
	memset(&a, 0, sizeof a);
	if (where == FLOW) flip(r);
	sd_tensor *out = tnew(r, where, N, C, H, W);
	if (!out || !(a.n = tnew(r, TMP, N, C, H, W)) || !(a.nl = tnew(r, TMP, N, L, C, 0)) ||
	    !(a.h[0] = tnew(r, TMP, N, L, I, 0)) || !(a.p = tnew(r, TMP, N, L, C, 0)))
		return NULL;
	for (int k = 0; k < p->nlayers; k++) {
		sd_unet_tblock_act *b = &a.blk[k];
		const sd_unet_tblock *pb = &p->blk[k];
		if (r->rec) {
			if (!(b->ln1 = tnew(r, TMP, N, L, I, 0)) || attn_act(r, &b->a1, &pb->attn1, N, L, L, I, NULL) ||
			    !(b->r1 = tnew(r, TMP, N, L, I, 0)) || !(b->ln2 = tnew(r, TMP, N, L, I, 0)) ||
			    attn_act(r, &b->a2, &pb->attn2, N, L, Lc, I, NULL) || !(b->r2 = tnew(r, TMP, N, L, I, 0)) ||
			    !(b->ln3 = tnew(r, TMP, N, L, I, 0)) || !(b->ffh = tnew(r, TMP, N, L, 8 * I, 0)) ||
			    !(b->ffg = tnew(r, TMP, N, L, 4 * I, 0)) || !(b->tmp = tnew(r, TMP, N, L, I, 0)) ||
			    !(a.h[k + 1] = tnew(r, TMP, N, L, I, 0)))
				return NULL;
		} else if (k == 0) {
			/* one set of buffers for every layer: residuals in place in h[0] */
			if (!(b->ln1 = tnew(r, TMP, N, L, I, 0)) || attn_act(r, &b->a1, &pb->attn1, N, L, L, I, NULL) ||
			    attn_act(r, &b->a2, &pb->attn2, N, L, Lc, I, &b->a1) || !(b->ffh = tnew(r, TMP, N, L, 8 * I, 0)) ||
			    !(b->ffg = tnew(r, TMP, N, L, 4 * I, 0)) || !(b->tmp = tnew(r, TMP, N, L, I, 0)))
				return NULL;
			b->ln2 = b->ln3 = b->ln1;
			b->r1 = b->r2 = a.h[0];
			a.h[1] = a.h[0];
		} else {
			*b = a.blk[0];
			/* adapters may differ per layer: their scratch is sized for layer 0's */
			if ((lora_rank(&pb->attn1) > lora_rank(&p->blk[0].attn1) &&
			     attn_act(r, &b->a1, &pb->attn1, N, L, L, I, NULL)) ||
			    (lora_rank(&pb->attn2) > lora_rank(&p->blk[0].attn2) &&
			     attn_act(r, &b->a2, &pb->attn2, N, L, Lc, I, &b->a1)))
				return NULL;
			a.h[k + 1] = a.h[0];
		}
	}
	if (r->rec) {
		r->act->tr[i] = a;
		if (r->ckpt) memset(&r->act->tr[i], 0, sizeof a);
		r->act->tr_in[i] = (sd_tensor *)x;
		r->act->tr_out[i] = out;
	} else {
		/* nl and p are dead while the other is live: share */
		a.p = a.nl;
	}
	if (sd_unet_transformer_forward(out, &a, x, ctx, p, u->cfg.groups)) {
		sd_preerr("unet: transformer %d", i);
		return NULL;
	}
	layer_done(r);
	return out;
}

/* Nearest-neighbour resize of x (N,C,h,w) to (N,C,H,W) as torch's interpolate(mode="nearest"):
 * source index floor(i·in/out).  The ×2 case is the backend op; other sizes (latents whose sides are
 * not multiples of 2^(blocks−1)) are done here on the CPU. */
static int resize_nearest(sd_tensor *out, const sd_tensor *x)
{
	if (H_(out) == 2 * H_(x) && W_(out) == 2 * W_(x)) return sd_upsample2x(out, x);
	if (x->device != SD_DEVICE_CPU)
		return sd_seterr("unet: resizing %lldx%lld to %lldx%lld (latent sides that do not halve evenly) is only "
		                 "supported on the cpu", (long long)H_(x), (long long)W_(x), (long long)H_(out), (long long)W_(out));
	int64_t P = N_(x) * C_(x), h = H_(x), w = W_(x), Ho = H_(out), Wo = W_(out);
	const float *s = x->data;
	float *d = out->data;
	for (int64_t p = 0; p < P; p++)
		for (int64_t y = 0; y < Ho; y++) {
			int64_t sy = (int64_t)floorf((float)y * ((float)h / (float)Ho));
			if (sy > h - 1) sy = h - 1;
			for (int64_t i = 0; i < Wo; i++) {
				int64_t sx = (int64_t)floorf((float)i * ((float)w / (float)Wo));
				if (sx > w - 1) sx = w - 1;
				d[(p * Ho + y) * Wo + i] = s[(p * h + sy) * w + sx];
			}
		}
	return 0;
}

/*
 * The sinusoidal projection of get_timestep_embedding in float32 as torch computes it:
 * exponent_i = (−ln 10000 · i) / (half − shift), freq_i = exp(exponent_i), arg = t · freq_i,
 * [sin | cos] (or [cos | sin] with flip_sin_to_cos), a zero column appended for odd dims.
 */
static void time_proj(float *out, const float *t, int nt, int N, int dim, int flip, float shift)
{
	int half = dim / 2;
	const float neg_log = (float)-log(10000.0), den = (float)((double)half - (double)shift);
	for (int n = 0; n < N; n++) {
		float tv = t[nt == 1 ? 0 : n], *o = out + (int64_t)n * dim;
		for (int i = 0; i < half; i++) {
			float e = expf(neg_log * (float)i / den), arg = tv * e;
			o[flip ? half + i : i] = sinf(arg);
			o[flip ? i : half + i] = cosf(arg);
		}
		if (dim & 1) o[dim - 1] = 0.0f;
	}
}

/* A copy of x on the UNet's device in keep (x itself when it is there already). */
static const sd_tensor *on_device(run *r, const sd_tensor *x)
{
	if (x->device == r->u->dev) return x;
	sd_tensor *t = tnew(r, KEEP, 1, 1, 0, 0);
	if (!t) return NULL;
	void *p = sd_arena_alloc(r->keep, sd_tensor_nbytes(x));
	if (!p) return NULL;
	*t = *x;
	t->device = r->u->dev;
	t->data = p;
	t->owns = 0;
	return sd_tensor_copy(t, x) ? NULL : t;
}

/* Checks of the inputs against the model, each a one-line "unet: …" message. */
static int check_inputs(const sd_unet *u, const sd_tensor *eps, const sd_tensor *x, const float *t, int nt,
                        const sd_tensor *ctx)
{
	const sd_unet_config *c = &u->cfg;
	char s1[96], s2[96];
	if (!x || !t) return sd_seterr("unet: no latent or no timesteps");
	if (x->dtype != SD_DTYPE_F32 || x->ndim != 4)
		return sd_seterr("unet: latent is %s %s, expected f32 (N, %d, h, w)", sd_dtype_name(x->dtype),
		                 sd_shape_str(x->ndim, x->shape, s1, sizeof s1), c->in_channels);
	if (C_(x) != c->in_channels)
		return sd_seterr("unet: latent %s has %lld channels but the model takes %d",
		                 sd_shape_str(x->ndim, x->shape, s1, sizeof s1), (long long)C_(x), c->in_channels);
	if (N_(x) < 1 || H_(x) < 1 || W_(x) < 1)
		return sd_seterr("unet: latent %s is empty", sd_shape_str(x->ndim, x->shape, s1, sizeof s1));
	if (nt != 1 && nt != N_(x))
		return sd_seterr("unet: %d timesteps for a batch of %lld (give 1 or one per sample)", nt, (long long)N_(x));
	for (int i = 0; i < nt; i++)
		if (!isfinite(t[i])) return sd_seterr("unet: timestep %d is not finite", i);
	if (u->ntr) {
		if (!ctx) return sd_seterr("unet: no context (text conditioning) given");
		if (ctx->dtype != SD_DTYPE_F32 || ctx->ndim != 3 || ctx->shape[1] < 1)
			return sd_seterr("unet: context is %s %s, expected f32 (N, L, D)", sd_dtype_name(ctx->dtype),
			                 sd_shape_str(ctx->ndim, ctx->shape, s1, sizeof s1));
		if (ctx->shape[0] != N_(x))
			return sd_seterr("unet: context %s has a batch of %lld but the latent %s has %lld",
			                 sd_shape_str(ctx->ndim, ctx->shape, s1, sizeof s1), (long long)ctx->shape[0],
			                 sd_shape_str(x->ndim, x->shape, s2, sizeof s2), (long long)N_(x));
		for (int i = 0; i < u->ntr; i++) {
			int64_t want = u->tr[i].blk[0].attn2.k.w->shape[1];
			if (ctx->shape[2] != want)
				return sd_seterr("unet: context %s has width %lld but the model's cross-attention takes %lld",
				                 sd_shape_str(ctx->ndim, ctx->shape, s1, sizeof s1), (long long)ctx->shape[2],
				                 (long long)want);
		}
	}
	if (eps) {
		int64_t want[4] = {N_(x), c->out_channels, H_(x), W_(x)};
		int ok = eps->dtype == SD_DTYPE_F32 && eps->ndim == 4;
		for (int i = 0; ok && i < 4; i++) ok = eps->shape[i] == want[i];
		if (!ok)
			return sd_seterr("unet: output is %s %s, expected f32 %s", sd_dtype_name(eps->dtype),
			                 sd_shape_str(eps->ndim, eps->shape, s1, sizeof s1), sd_shape_str(4, want, s2, sizeof s2));
	}
	return 0;
}

/* The network; eps NULL when recording (the output stays in act->out). */
static int forward(run *r, sd_tensor *eps, const sd_tensor *latent, const float *t, int nt, const sd_tensor *context)
{
	sd_unet *u = r->u;
	const sd_unet_config *c = &u->cfg;
	int nb = c->nblocks, N = (int)N_(latent);
	char name[64];
	const sd_tensor *x0 = on_device(r, latent), *ctx = context ? on_device(r, context) : NULL;
	if (!x0 || (context && !ctx)) return -1;

	/* time: projection (host) → linear_1 → SiLU → linear_2; silu(temb) feeds every resnet */
	int T0 = c->time_proj_dim, T = c->temb_dim;
	float *tp_host = malloc((size_t)N * T0 * sizeof(float));
	if (!tp_host) return sd_seterr("out of memory");
	time_proj(tp_host, t, nt, N, T0, c->flip_sin_to_cos, c->freq_shift);
	sd_tensor *tp = tnew(r, KEEP, N, T0, 0, 0), *th = tnew(r, KEEP, N, T, 0, 0), *ta = r->rec ? tnew(r, KEEP, N, T, 0, 0) : th;
	sd_tensor *temb = tnew(r, KEEP, N, T, 0, 0), *temb_act = tnew(r, KEEP, N, T, 0, 0);
	sd_tensor host = {.dtype = SD_DTYPE_F32, .ndim = 2, .shape = {N, T0}, .data = tp_host, .device = SD_DEVICE_CPU};
	int rc = !tp || !th || !ta || !temb || !temb_act ? -1 : sd_tensor_copy(tp, &host);
	free(tp_host);
	if (rc || sd_linear(th, tp, u->time1.w, u->time1.b) || sd_act(ta, th, SD_ACT_SILU) ||
	    sd_linear(temb, ta, u->time2.w, u->time2.b) || sd_act(temb_act, temb, SD_ACT_SILU))
		return sd_preerr("unet: time embedding");
	hook(r, "time_proj", tp);
	hook(r, "time_embedding", temb);
	if (r->act) {
		sd_unet_act *A = r->act;
		A->time_proj = tp, A->temb_h = th, A->temb_a = ta, A->temb = temb, A->temb_act = temb_act;
	}

	/* the input: center_input_sample, conv_in */
	const sd_tensor *xin = x0;
	if (c->center_input_sample) { /* 2·sample − 1: the −1 as a per-(n, c) broadcast of ones */
		int64_t nc = N * C_(x0);
		float *ones = malloc((size_t)nc * sizeof(float));
		sd_tensor *y = tnew(r, KEEP, N, C_(x0), H_(x0), W_(x0)), *b = tnew(r, KEEP, N, C_(x0), 0, 0);
		if (!ones) return sd_seterr("out of memory");
		for (int64_t i = 0; i < nc; i++) ones[i] = 1.0f;
		sd_tensor host1 = {.dtype = SD_DTYPE_F32, .ndim = 2, .shape = {N, C_(x0)}, .data = ones, .device = SD_DEVICE_CPU};
		rc = !y || !b || sd_tensor_copy(b, &host1) || sd_add(y, x0, b, 2.0f, -1.0f);
		free(ones);
		if (rc) return -1;
		xin = y;
	}
	int kin = c->conv_in_kernel / 2;
	sd_tensor *x = tnew(r, KEEP, N, c->block_out[0], H_(xin), W_(xin));
	if (!x || sd_conv2d(x, xin, u->conv_in.w, u->conv_in.b, 1, kin, kin, kin, kin)) return sd_preerr("unet: conv_in");
	hook(r, "conv_in", x);
	if (r->act) r->act->conv_in = x;

	/* down: every resnet / transformer / downsampler output is a skip */
	int nskip = 0, maxskip = 1;
	for (int i = 0; i < nb; i++) maxskip += c->layers[i] + 1;
	sd_tensor **skip = sd_arena_alloc(u->hdr, (size_t)maxskip * sizeof *skip);
	if (!skip) return -1;
	skip[nskip++] = x;
	for (int i = 0; i < nb; i++) {
		int first = nskip;
		for (int j = 0; j < c->layers[i]; j++) {
			/* a resnet followed by a transformer is not a skip itself: its output flows */
			if (!(x = resnet(r, u->down_res[i] + j, x, temb_act, c->down_attn[i] ? FLOW : KEEP))) return -1;
			if (c->down_attn[i] && !(x = transformer(r, u->down_tr[i] + j, x, ctx, KEEP))) return -1;
			skip[nskip++] = x;
		}
		if (i < nb - 1) {
			sd_tensor *y = tnew(r, KEEP, N, C_(x), (H_(x) + 1) / 2, (W_(x) + 1) / 2);
			/* Downsample2D: 3×3 stride 2, padding 1 */
			if (!y || sd_conv2d(y, x, u->down[i].w, u->down[i].b, 2, 1, 1, 1, 1)) return sd_preerr("unet: downsampler %d", i);
			x = y;
			skip[nskip++] = x;
			if (r->act) r->act->down[i] = x;
			layer_done(r);
		}
		if (r->hook) {
			snprintf(name, sizeof name, "down_blocks.%d", i);
			hook(r, name, x);
			for (int j = first; j < nskip; j++) {
				snprintf(name, sizeof name, "down_blocks.%d.res_samples.%d", i, j - first);
				hook(r, name, skip[j]);
			}
		}
	}

	/* mid */
	if (c->mid_attn) {
		if (!(x = resnet(r, u->mid_res, x, temb_act, FLOW)) || !(x = transformer(r, u->mid_tr, x, ctx, FLOW)) ||
		    !(x = resnet(r, u->mid_res + 1, x, temb_act, FLOW)))
			return -1;
		hook(r, "mid_block", x);
	}

	/* up: pop a skip before each resnet, concatenate it after the hidden state */
	for (int i = 0; i < nb; i++) {
		for (int j = 0; j < u->up_layers[i]; j++) {
			if (nskip < 1) return sd_seterr("unet: internal error: skip stack empty");
			sd_tensor *s = skip[--nskip];
			if (H_(s) != H_(x) || W_(s) != W_(x))
				return sd_seterr("unet: up block %d: hidden %lldx%lld does not match skip %lldx%lld", i,
				                 (long long)H_(x), (long long)W_(x), (long long)H_(s), (long long)W_(s));
			sd_tensor *cat = tnew(r, TMP, N, C_(x) + C_(s), H_(x), W_(x));
			if (!cat || sd_concat1(cat, x, s)) return sd_preerr("unet: up block %d", i);
			if (!(x = resnet(r, u->up_res[i] + j, cat, temb_act, FLOW))) return -1;
			if (c->up_attn[i] && !(x = transformer(r, u->up_tr[i] + j, x, ctx, FLOW))) return -1;
		}
		if (i < nb - 1) {
			/* Upsample2D: nearest to the next skip's size (×2 unless the sides were odd), conv 3×3 */
			const sd_tensor *s = skip[nskip - 1];
			sd_tensor *up = tnew(r, TMP, N, C_(x), H_(s), W_(s));
			flip(r);
			sd_tensor *y = tnew(r, FLOW, N, C_(x), H_(s), W_(s));
			if (!up || !y || resize_nearest(up, x) || sd_conv2d(y, up, u->up[i].w, u->up[i].b, 1, 1, 1, 1, 1))
				return sd_preerr("unet: upsampler %d", i);
			if (r->act) r->act->up[i] = r->ckpt ? NULL : up, r->act->upconv[i] = y;
			x = y;
			layer_done(r);
		}
		snprintf(name, sizeof name, "up_blocks.%d", i);
		hook(r, name, x);
	}

	/* conv_norm_out → SiLU → conv_out (fused unless recorded or hooked: hooks see the norm's output) */
	int64_t C = C_(x), H = H_(x), W = W_(x);
	sd_tensor *n = tnew(r, TMP, N, C, H, W), *a = n, *y;
	if (!n) return -1;
	if (r->rec || r->hook) {
		if (sd_group_norm(n, x, c->groups, u->norm_out_w, u->norm_out_b, c->eps, 0)) return sd_preerr("unet: conv_norm_out");
		hook(r, "conv_norm_out", n);
		if (r->rec && !(a = tnew(r, TMP, N, C, H, W))) return -1;
		if (sd_act(a, n, SD_ACT_SILU)) return -1;
		hook(r, "conv_act", a);
	} else if (sd_group_norm(n, x, c->groups, u->norm_out_w, u->norm_out_b, c->eps, 1))
		return sd_preerr("unet: conv_norm_out");
	int kout = c->conv_out_kernel / 2;
	y = eps && eps->device == u->dev ? eps : tnew(r, r->ckpt ? KEEP : TMP, N, c->out_channels, H, W);
	if (!y || sd_conv2d(y, a, u->conv_out.w, u->conv_out.b, 1, kout, kout, kout, kout)) return sd_preerr("unet: conv_out");
	hook(r, "conv_out", y);
	if (r->act) r->act->norm_out = r->ckpt ? NULL : n, r->act->act_out = r->ckpt ? NULL : a, r->act->out = y;
	if (eps && y != eps && sd_tensor_copy(eps, y)) return -1;
	layer_done(r);
	return 0;
}

/* Arenas for one call: keep = the caller's, or our own (reset). */
static int begin(sd_unet *u, run *r, sd_arena *a)
{
	memset(r, 0, sizeof *r);
	r->u = u;
	sd_arena_reset(u->hdr);
	if (!a) {
		if (!u->own && !(u->own = sd_arena_new(u->dev, 0))) return -1;
		sd_arena_reset(u->own);
		a = u->own;
	}
	r->keep = a;
	u->peak = 0;
	return 0;
}

int sd_unet_forward(sd_unet *u, sd_arena *a, sd_tensor *eps, const sd_tensor *latent, const float *t, int nt,
                    const sd_tensor *context)
{
	run r;
	if (!eps) return sd_seterr("unet: no output tensor");
	if (check_inputs(u, eps, latent, t, nt, context) || begin(u, &r, a)) return -1;
	r.hook = u->hook != NULL;
	int rc = forward(&r, eps, latent, t, nt, context);
	sd_arena_reset(u->tmp);
	return rc;
}

static int record(sd_unet *u, sd_unet_act *act, sd_arena *a, const sd_tensor *latent, const float *t, int nt,
                  const sd_tensor *context, int ckpt)
{
	run r;
	if (!act || !a) return sd_seterr("unet: record: no activation struct or arena");
	if (check_inputs(u, NULL, latent, t, nt, context) || begin(u, &r, a)) return -1;
	if (latent->device != u->dev || (context && context->device != u->dev))
		return sd_seterr("unet: record: the inputs must be on the UNet's device (%s)", sd_device_name(u->dev));
	if (!u->rec_res) {
		u->rec_res = calloc(u->nres, sizeof *u->rec_res);
		u->rec_tr = calloc(u->ntr ? u->ntr : 1, sizeof *u->rec_tr);
		u->rec_ptrs = calloc(2 * (size_t)(u->nres + u->ntr), sizeof *u->rec_ptrs);
		if (!u->rec_res || !u->rec_tr || !u->rec_ptrs) return sd_seterr("out of memory");
	}
	memset(act, 0, sizeof *act);
	act->latent = latent;
	act->context = context;
	act->nres = u->nres;
	act->ntr = u->ntr;
	act->res = u->rec_res;
	act->tr = u->rec_tr;
	act->res_in = u->rec_ptrs;
	act->res_out = act->res_in + u->nres;
	act->tr_in = act->res_out + u->nres;
	act->tr_out = act->tr_in + u->ntr;
	r.rec = 1;
	r.ckpt = ckpt;
	r.act = act;
	r.hook = u->hook != NULL;
	act->checkpointed = ckpt;
	int rc = forward(&r, NULL, latent, t, nt, context);
	if (ckpt) {
		sd_arena_reset(u->tmp);
		for (int i = 0; i < u->nres; i++) /* the up blocks' inputs (concatenations) were not kept */
			if (i >= u->mid_res + (u->cfg.mid_attn ? 2 : 0)) act->res_in[i] = NULL;
	}
	return rc;
}

int sd_unet_forward_record(sd_unet *u, sd_unet_act *act, sd_arena *a, const sd_tensor *latent, const float *t,
                           int nt, const sd_tensor *context)
{
	return record(u, act, a, latent, t, nt, context, 0);
}

int sd_unet_forward_checkpointed(sd_unet *u, sd_unet_act *act, sd_arena *a, const sd_tensor *latent,
                                 const float *t, int nt, const sd_tensor *context)
{
	return record(u, act, a, latent, t, nt, context, 1);
}

/* ==== the whole backward ==== */

/* A tensor of the given shape (ndim 2..4) on like's device, from the arena. */
static sd_tensor *anew(sd_arena *a, const sd_tensor *like, int nd, int64_t d0, int64_t d1, int64_t d2, int64_t d3)
{
	sd_tensor *h = sd_arena_alloc(a, sizeof *h);
	if (!h) return NULL;
	memset(h, 0, sizeof *h);
	h->dtype = SD_DTYPE_F32;
	h->device = like->device;
	h->ndim = nd;
	int64_t sh[4] = {d0, d1, d2, d3};
	memcpy(h->shape, sh, sizeof sh);
	size_t bytes = sd_tensor_nbytes(h);
	return (h->data = sd_arena_alloc(a, bytes ? bytes : 1)) ? h : NULL;
}

/* Resnet i's activations on x recomputed into the arena (a checkpointed backward). */
static int recompute_resnet(sd_unet *u, const sd_unet_act *act, int i, const sd_tensor *x, sd_unet_resnet_act *ra,
                            sd_arena *a)
{
	const sd_unet_resnet *p = &u->res[i];
	int64_t N = N_(x), H = H_(x), W = W_(x), ci = p->cin, co = p->cout;
	memset(ra, 0, sizeof *ra);
	sd_tensor *out;
	if (!(ra->n1 = anew(a, x, 4, N, ci, H, W)) || !(ra->h1 = anew(a, x, 4, N, ci, H, W)) ||
	    !(ra->tp = anew(a, x, 2, N, co, 0, 0)) || !(ra->a1 = anew(a, x, 4, N, co, H, W)) ||
	    !(ra->n2 = anew(a, x, 4, N, co, H, W)) || !(ra->h2 = anew(a, x, 4, N, co, H, W)) ||
	    (p->shortcut.w && !(ra->sc = anew(a, x, 4, N, co, H, W))) || !(out = anew(a, x, 4, N, co, H, W)))
		return -1;
	return sd_unet_resnet_forward(out, ra, x, act->temb_act, p, u->cfg.groups, u->cfg.eps);
}

static int recompute_attn(sd_unet_attn_act *b, const sd_unet_attn *p, sd_arena *a, const sd_tensor *x, int64_t N,
                          int64_t Lq, int64_t Lk, int64_t I)
{
	int rank = lora_rank(p);
	return !(b->q = anew(a, x, 3, N, Lq, I, 0)) || !(b->k = anew(a, x, 3, N, Lk, I, 0)) ||
	               !(b->v = anew(a, x, 3, N, Lk, I, 0)) || !(b->probs = anew(a, x, 4, N, p->heads, Lq, Lk)) ||
	               !(b->o = anew(a, x, 3, N, Lq, I, 0)) || (rank && !(b->lora = anew(a, x, 3, N, Lq > Lk ? Lq : Lk, rank, 0)))
	           ? -1
	           : 0;
}

/* Transformer i's activations on x recomputed into the arena. */
static int recompute_transformer(sd_unet *u, int i, const sd_tensor *x, const sd_tensor *ctx,
                                 sd_unet_transformer_act *ta, sd_arena *a)
{
	const sd_unet_transformer *p = &u->tr[i];
	int64_t N = N_(x), C = C_(x), H = H_(x), W = W_(x), L = H * W, I = p->inner, Lc = ctx->shape[1];
	memset(ta, 0, sizeof *ta);
	sd_tensor *out;
	if (!(ta->n = anew(a, x, 4, N, C, H, W)) || !(ta->nl = anew(a, x, 3, N, L, C, 0)) ||
	    !(ta->h[0] = anew(a, x, 3, N, L, I, 0)) || !(ta->p = anew(a, x, 3, N, L, C, 0)) ||
	    !(out = anew(a, x, 4, N, C, H, W)))
		return -1;
	for (int k = 0; k < p->nlayers; k++) {
		sd_unet_tblock_act *b = &ta->blk[k];
		const sd_unet_tblock *pb = &p->blk[k];
		if (!(b->ln1 = anew(a, x, 3, N, L, I, 0)) || recompute_attn(&b->a1, &pb->attn1, a, x, N, L, L, I) ||
		    !(b->r1 = anew(a, x, 3, N, L, I, 0)) || !(b->ln2 = anew(a, x, 3, N, L, I, 0)) ||
		    recompute_attn(&b->a2, &pb->attn2, a, x, N, L, Lc, I) || !(b->r2 = anew(a, x, 3, N, L, I, 0)) ||
		    !(b->ln3 = anew(a, x, 3, N, L, I, 0)) || !(b->ffh = anew(a, x, 3, N, L, 8 * I, 0)) ||
		    !(b->ffg = anew(a, x, 3, N, L, 4 * I, 0)) || !(b->tmp = anew(a, x, 3, N, L, I, 0)) ||
		    !(ta->h[k + 1] = anew(a, x, 3, N, L, I, 0)))
			return -1;
	}
	return sd_unet_transformer_forward(out, ta, x, ctx, p, u->cfg.groups);
}

/* The backward of resize_nearest: each source pixel gets the sum of the gradients of its copies. */
static int resize_nearest_backward(sd_tensor *dx, const sd_tensor *dy)
{
	if (H_(dy) == 2 * H_(dx) && W_(dy) == 2 * W_(dx)) return sd_upsample2x_backward(dx, dy, 0);
	if (dx->device != SD_DEVICE_CPU) return sd_seterr("unet: backward of an odd-sized resize is only on the cpu");
	int64_t P = N_(dx) * C_(dx), h = H_(dx), w = W_(dx), Ho = H_(dy), Wo = W_(dy);
	const float *s = dy->data;
	float *d = dx->data;
	memset(d, 0, (size_t)(P * h * w) * sizeof *d);
	for (int64_t p = 0; p < P; p++)
		for (int64_t y = 0; y < Ho; y++) {
			int64_t sy = (int64_t)floorf((float)y * ((float)h / (float)Ho));
			if (sy > h - 1) sy = h - 1;
			for (int64_t i = 0; i < Wo; i++) {
				int64_t sx = (int64_t)floorf((float)i * ((float)w / (float)Wo));
				if (sx > w - 1) sx = w - 1;
				d[(p * h + sy) * w + sx] += s[(p * Ho + y) * Wo + i];
			}
		}
	return 0;
}

static int zero_tensor(sd_tensor *t)
{
	if (t->device == SD_DEVICE_CPU) {
		memset(t->data, 0, sd_tensor_nbytes(t));
		return 0;
	}
	sd_tensor *z = sd_tensor_new(t->dtype, t->ndim, t->shape);
	int rc = z ? sd_tensor_copy(t, z) : -1;
	sd_tensor_free(z);
	return rc;
}

static int tr_trained(const sd_unet_transformer *p)
{
	for (int k = 0; k < p->nlayers; k++) {
		const sd_unet_tblock *b = &p->blk[k];
		const sd_unet_linear *l[] = {&b->attn1.q, &b->attn1.k, &b->attn1.v, &b->attn1.out, &b->attn2.q,
		                             &b->attn2.k, &b->attn2.v, &b->attn2.out, &b->ff1, &b->ff2};
		for (int i = 0; i < 10; i++)
			if (l[i]->train) return 1;
	}
	return p->proj_in.train || p->proj_out.train;
}

/* The walk's state: the flowing gradient in two arenas used in turn. */
typedef struct bwalk {
	sd_unet *u;
	const sd_unet_act *act;
	sd_tensor *dctx;
	int fi, stop_tr, done;
} bwalk;

static sd_tensor *flow_new(bwalk *w, const sd_tensor *like)
{
	w->fi ^= 1;
	sd_arena_reset(w->u->bflow[w->fi]);
	return tmp_like(w->u->bflow[w->fi], like, 0);
}

/* g ← the gradient of resnet i's input x (NULL when not needed: then only g's adapters). */
static int back_resnet(bwalk *w, int i, const sd_tensor *x, sd_tensor **g, sd_tensor *dx)
{
	sd_unet *u = w->u;
	const sd_unet_resnet_act *ra = &w->act->res[i];
	sd_unet_resnet_act tmp;
	if (w->act->checkpointed) {
		if (recompute_resnet(u, w->act, i, x, &tmp, u->brc)) return sd_preerr("unet: resnet %d recompute", i);
		ra = &tmp;
	}
	if (sd_unet_resnet_backward(dx, *g, ra, x, &u->res[i], u->cfg.groups, u->cfg.eps, u->bscr, 0))
		return sd_preerr("unet: resnet %d backward", i);
	*g = dx;
	return 0;
}

static int back_transformer(bwalk *w, int i, const sd_tensor *x, sd_tensor **g)
{
	sd_unet *u = w->u;
	sd_arena_reset(u->bscr);
	sd_arena_reset(u->brc);
	const sd_unet_transformer_act *ta = &w->act->tr[i];
	sd_unet_transformer_act tmp;
	if (w->act->checkpointed) {
		if (recompute_transformer(u, i, x, w->act->context, &tmp, u->brc))
			return sd_preerr("unet: transformer %d recompute", i);
		ta = &tmp;
	}
	sd_tensor *dx = NULL;
	if (i == w->stop_tr) w->done = 1;
	else if (!(dx = flow_new(w, x))) return -1;
	if (sd_unet_transformer_backward(dx, w->dctx, *g, ta, x, w->act->context, &u->tr[i], u->cfg.groups, u->bscr, 0))
		return sd_preerr("unet: transformer %d backward", i);
	*g = dx;
	return 0;
}

int sd_unet_backward(sd_unet *u, const sd_unet_act *act, const sd_tensor *deps, sd_tensor *dlatent,
                     sd_tensor *dcontext)
{
	const sd_unet_config *c = &u->cfg;
	const int nb = c->nblocks;
	if (!act->out || !act->conv_in || !act->temb_act) return sd_seterr("unet: backward: no recorded forward");
	if (!sd_tensor_same_shape(deps, act->out) || deps->device != u->dev)
		return sd_seterr("unet: backward: the output gradient must be shaped as the output, on the UNet's device");
	if (dlatent && (!sd_tensor_same_shape(dlatent, act->latent) || dlatent->device != u->dev))
		return sd_seterr("unet: backward: dlatent must be shaped as the latent, on the UNet's device");
	if (dcontext && (!act->context || !sd_tensor_same_shape(dcontext, act->context) || dcontext->device != u->dev))
		return sd_seterr("unet: backward: dcontext must be shaped as the context, on the UNet's device");
	if (dcontext && zero_tensor(dcontext)) return -1;
	bwalk w = {u, act, dcontext, 0, -1, 0};
	if (!dlatent) { /* skip what lies before the first layer that needs a gradient */
		for (int i = 0; i < u->ntr && w.stop_tr < 0; i++)
			if (dcontext || tr_trained(&u->tr[i])) w.stop_tr = i;
		if (w.stop_tr < 0) return 0;
	}
	sd_arena **ar[] = {&u->bkeep, &u->bflow[0], &u->bflow[1], &u->bscr, &u->brc};
	for (int i = 0; i < 5; i++) {
		if (!*ar[i] && !(*ar[i] = sd_arena_new(u->dev, 0))) return -1;
		sd_arena_reset(*ar[i]);
	}

	/* the down path as a chain of nodes (every one a skip), and each up resnet's hidden input and skip */
	int maxskip = 1;
	for (int i = 0; i < nb; i++) maxskip += c->layers[i] + 1;
	const int up0 = u->up_res[0], nup = u->nres - up0;
	const sd_tensor **node = sd_arena_alloc(u->hdr, maxskip * sizeof *node), **hid = sd_arena_alloc(u->hdr, nup * sizeof *hid);
	sd_tensor **dnode = sd_arena_alloc(u->hdr, maxskip * sizeof *dnode);
	int *pop = sd_arena_alloc(u->hdr, nup * sizeof *pop), nn = 0;
	if (!node || !hid || !dnode || !pop) return -1;
	memset(dnode, 0, maxskip * sizeof *dnode);
	node[nn++] = act->conv_in;
	for (int i = 0; i < nb; i++) {
		for (int j = 0; j < c->layers[i]; j++)
			node[nn++] = c->down_attn[i] ? act->tr_out[u->down_tr[i] + j] : act->res_out[u->down_res[i] + j];
		if (i < nb - 1) node[nn++] = act->down[i];
	}
	const sd_tensor *x = c->mid_attn ? act->res_out[u->mid_res + 1] : node[nn - 1], *last[MAXB];
	int top = nn;
	for (int i = 0; i < nb; i++) {
		for (int j = 0; j < u->up_layers[i]; j++) {
			int r = u->up_res[i] + j;
			pop[r - up0] = --top;
			hid[r - up0] = x;
			x = c->up_attn[i] ? act->tr_out[u->up_tr[i] + j] : act->res_out[r];
		}
		last[i] = x;
		if (i < nb - 1) x = act->upconv[i];
	}

	/* head: eps = conv_out(silu(conv_norm_out(x))) */
	int k = c->conv_out_kernel / 2;
	sd_tensor *da = tmp_like(u->bscr, x, 0), *g = flow_new(&w, x);
	if (!da || !g || sd_conv2d_backward(da, deps, u->conv_out.w, 1, k, k, k, k, 0) ||
	    sd_group_norm_backward(g, NULL, NULL, da, x, c->groups, u->norm_out_w, u->norm_out_b, c->eps, 1, 0))
		return sd_preerr("unet: conv_out backward");

	/* up blocks, last first */
	for (int i = nb - 1; i >= 0 && !w.done; i--) {
		if (i < nb - 1) { /* the upsampler: conv(resize(last[i])) */
			sd_arena_reset(u->bscr);
			sd_tensor *dup = tmp_like(u->bscr, act->upconv[i], 0), *gx = flow_new(&w, last[i]);
			if (!dup || !gx || sd_conv2d_backward(dup, g, u->up[i].w, 1, 1, 1, 1, 1, 0) || resize_nearest_backward(gx, dup))
				return sd_preerr("unet: upsampler %d backward", i);
			g = gx;
		}
		for (int j = u->up_layers[i] - 1; j >= 0 && !w.done; j--) {
			int r = u->up_res[i] + j;
			if (c->up_attn[i] && back_transformer(&w, u->up_tr[i] + j, act->res_out[r], &g)) return -1;
			if (w.done) break;
			/* the resnet on cat(hidden, skip): split its input gradient */
			const sd_tensor *h = hid[r - up0], *s = node[pop[r - up0]];
			sd_arena_reset(u->bscr);
			sd_arena_reset(u->brc);
			const sd_tensor *cat = act->res_in[r];
			if (act->checkpointed) {
				sd_tensor *t = anew(u->brc, h, 4, N_(h), C_(h) + C_(s), H_(h), W_(h));
				if (!t || sd_concat1(t, h, s)) return -1;
				cat = t;
			}
			sd_tensor *gcat = tmp_like(u->bscr, cat, 0);
			if (!gcat || back_resnet(&w, r, cat, &g, gcat)) return -1;
			sd_tensor *gx = flow_new(&w, h), *ds = tmp_like(u->bkeep, s, 0);
			if (!gx || !ds || sd_concat1_backward(gx, ds, gcat, 0)) return sd_preerr("unet: up block %d backward", i);
			dnode[pop[r - up0]] = ds;
			g = gx;
		}
	}

	/* mid block: resnet, transformer, resnet */
	if (c->mid_attn && !w.done) {
		int r = u->mid_res;
		sd_arena_reset(u->bscr);
		sd_arena_reset(u->brc);
		sd_tensor *gx = flow_new(&w, act->res_in[r + 1]);
		if (!gx || back_resnet(&w, r + 1, act->res_in[r + 1], &g, gx) ||
		    back_transformer(&w, u->mid_tr, act->tr_in[u->mid_tr], &g))
			return -1;
		if (!w.done) {
			sd_arena_reset(u->bscr);
			sd_arena_reset(u->brc);
			if (!(gx = flow_new(&w, act->res_in[r])) || back_resnet(&w, r, act->res_in[r], &g, gx)) return -1;
		}
	}

	/* down blocks: each node's gradient also gets what its skip received */
	int n = nn - 1;
#define ADD_SKIP() do { if (dnode[n] && sd_add(g, g, dnode[n], 1.0f, 1.0f)) return -1; } while (0)
	if (!w.done) ADD_SKIP();
	for (int i = nb - 1; i >= 0 && !w.done; i--) {
		if (i < nb - 1) { /* node n = downsampler(node n-1): 3×3, stride 2, padding 1 */
			sd_tensor *gx = flow_new(&w, node[n - 1]);
			if (!gx || sd_conv2d_backward(gx, g, u->down[i].w, 2, 1, 1, 1, 1, 0))
				return sd_preerr("unet: downsampler %d backward", i);
			g = gx;
			n--;
			ADD_SKIP();
		}
		for (int j = c->layers[i] - 1; j >= 0 && !w.done; j--) {
			int r = u->down_res[i] + j;
			if (c->down_attn[i] && back_transformer(&w, u->down_tr[i] + j, act->res_out[r], &g)) return -1;
			if (w.done) break;
			sd_arena_reset(u->bscr);
			sd_arena_reset(u->brc);
			sd_tensor *gx = flow_new(&w, node[n - 1]);
			if (!gx || back_resnet(&w, r, node[n - 1], &g, gx)) return -1;
			n--;
			ADD_SKIP();
		}
	}
#undef ADD_SKIP
	if (w.done || !dlatent) return 0;
	/* conv_in (after center_input_sample's 2·x − 1 when configured) */
	k = c->conv_in_kernel / 2;
	if (sd_conv2d_backward(dlatent, g, u->conv_in.w, 1, k, k, k, k, 0)) return sd_preerr("unet: conv_in backward");
	return c->center_input_sample ? sd_scale(dlatent, dlatent, 2.0f) : 0;
}
