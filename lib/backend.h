/*
 * backend.h - the table of function pointers a compute backend fills (after ggml-backend-impl.h and
 * BLIS's bli_cntx_init_*).  lib/ops.c validates shapes once and calls a slot; the CPU table
 * (lib/cpu/backend.c) is the reference and fills every slot; kernels/cuda.cu fills what it can, and an
 * empty slot makes the op fail with "<op>: not implemented on cuda".  Slots see raw pointers that are
 * already on the backend's device; they return 0 or -1 with sd_seterr().
 */
#ifndef SD_BACKEND_H
#define SD_BACKEND_H

#include "sd.h"

/* The float constants of one Adam/AdamW step, derived on the host in double the way torch.optim's
 * single-tensor path derives them, then rounded to float as torch hands Python scalars to f32 kernels. */
struct sd_adam_coef {
	float decay;     /* AdamW: p ← p·decay first, decay = 1 − lr·wd (1: none) */
	float wd;        /* Adam: g ← g + wd·p (0: none) */
	float b1, c1;    /* m ← m·β1 + c1·g, c1 = 1 − β1 */
	float b2, c2;    /* v ← v·β2 + (c2·g)·g, c2 = 1 − β2 */
	float bc2_sqrt;  /* √(1 − β2^t) */
	float eps;
	float neg_step;  /* −lr / (1 − β1^t): p ← p + (neg_step·m) / (√v / bc2_sqrt + eps) */
};

struct sd_backend {
	const char *name;
	enum sd_device device;

	/* ---- memory ---- */
	void *(*alloc)(size_t bytes);              /* 64-byte aligned on the CPU; NULL with a message */
	void (*free)(void *p);
	int (*memset0)(void *p, size_t bytes);
	/* copy n bytes; each side is on the host or on this backend's device as its `*_dev` flag says */
	int (*copy)(void *dst, int dst_dev, const void *src, int src_dev, size_t n);
	int (*sync)(void);

	/* ---- ops ---- */
	/* Strided batched sgemm, row-major: for b in [0,batch): C_b = alpha·op(A_b)·op(B_b) + beta·C_b,
	 * C_b is M×N (ldc), A_b is M×K (or K×M when ta) with lda, B_b K×N (or N×K when tb) with ldb. */
	int (*gemm)(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
	            const float *A, int64_t lda, int64_t strideA,
	            const float *B, int64_t ldb, int64_t strideB,
	            float beta, float *C, int64_t ldc, int64_t strideC, int64_t batch);
	/* out (N,O,Ho,Wo) = conv(x (N,C,H,W), w (O,C,kh,kw)) + b (O, may be NULL), zero padding;
	 * wp, when not NULL, is w as conv_pack made it (the backend's own layout, cached with the weight) */
	int (*conv2d)(float *out, const float *x, const float *w, const void *wp, const float *b, int64_t N,
	              int64_t C, int64_t H, int64_t W, int64_t O, int kh, int kw, int stride, int pt, int pl,
	              int64_t Ho, int64_t Wo);
	/* w (O,C,kh,kw) in the layout conv2d prefers for a stride-1 convolution, or NULL (none or no
	 * memory: conv2d then works from w); freed with conv_pack_free */
	void *(*conv_pack)(const float *w, int64_t O, int64_t C, int kh, int kw);
	void (*conv_pack_free)(void *wp);
	/* x (N, C, S) normalised per (n, group) of C/groups channels, then ·gamma + beta, then SiLU if silu */
	int (*group_norm)(float *out, const float *x, const float *gamma, const float *beta, int64_t N,
	                  int64_t C, int64_t S, int groups, float eps, int silu);
	/* rows × D, normalised per row */
	int (*layer_norm)(float *out, const float *x, const float *gamma, const float *beta, int64_t rows,
	                  int64_t D, float eps);
	int (*act)(float *out, const float *x, int64_t n, enum sd_act act);
	/* x rows × 2F → out rows × F */
	int (*geglu)(float *out, const float *x, int64_t rows, int64_t F);
	/* out[i] = alpha·a[i] + beta·b[(i / S) % m], i < n (b == NULL: out = alpha·a) */
	int (*add)(float *out, const float *a, const float *b, float alpha, float beta, int64_t n, int64_t m,
	           int64_t S);
	/* out = a ⊙ b */
	int (*mul)(float *out, const float *a, const float *b, int64_t n);
	/* row softmax of x·scale over `cols` of each of `rows` rows (row stride ld), in place; when
	 * causal >= 0, entries j > r + causal of row r are masked (probability 0) */
	int (*softmax)(float *x, int64_t rows, int64_t cols, int64_t ld, float scale, int64_t causal);
	/* out[b][j][i] = x[b][i][j] for x (batch, R, C) */
	int (*transpose)(float *out, const float *x, int64_t batch, int64_t R, int64_t C);
	/* nearest ×2: (P, H, W) → (P, 2H, 2W) */
	int (*upsample2x)(float *out, const float *x, int64_t P, int64_t H, int64_t W);
	/* out (n × D) = table[ids[i]] (ids host or device memory as the backend keeps it, checked < V) */
	int (*embedding)(float *out, const int32_t *ids, const float *table, int64_t n, int64_t V, int64_t D);

	/* ---- training (lib/ops-backward.c and lib/train/; the CPU ones in cpu/backward.c) ----
	 * A backward slot writes an input gradient dx with `acc`: 0 overwrites (dx's old contents are never
	 * read, they may be NaN), 1 adds to it.  Parameter gradients (dgamma, dbeta; NULL to skip) always
	 * add. */
	/* dx (N,C,H,W) of out = conv2d(x, w (O,C,kh,kw), stride, pads pt/pl top-left) given dy (N,O,Ho,Wo) */
	int (*conv2d_backward_input)(float *dx, const float *dy, const float *w, int64_t N, int64_t C, int64_t H,
	                             int64_t W, int64_t O, int kh, int kw, int stride, int pt, int pl, int64_t Ho,
	                             int64_t Wo, int acc);
	/* the group_norm slot's backward (statistics recomputed from x; silu: through the fused SiLU) */
	int (*group_norm_backward)(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
	                           const float *gamma, const float *beta, int64_t N, int64_t C, int64_t S, int groups,
	                           float eps, int silu, int acc);
	int (*layer_norm_backward)(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
	                           const float *gamma, int64_t rows, int64_t D, float eps, int acc);
	int (*act_backward)(float *dx, const float *dy, const float *x, int64_t n, enum sd_act act, int acc);
	/* dx rows × 2F from dy rows × F */
	int (*geglu_backward)(float *dx, const float *dy, const float *x, int64_t rows, int64_t F, int acc);
	/* per row (row stride ld for all three): dx = scale · y ⊙ (dy − Σ dy⊙y), y the softmax output;
	 * dx may be dy when acc = 0 */
	int (*softmax_backward)(float *dx, const float *dy, const float *y, int64_t rows, int64_t cols, int64_t ld,
	                        float scale, int acc);
	/* dx (P,H,W): sum of each 2×2 block of dy (P,2H,2W) */
	int (*upsample2x_backward)(float *dx, const float *dy, int64_t P, int64_t H, int64_t W, int acc);
	/* out[j] (+)= alpha · Σ_a Σ_s x[(a·m + j)·S + s], j < m: the gradient of a broadcast operand */
	int (*reduce)(float *out, const float *x, int64_t A, int64_t m, int64_t S, float alpha, int acc);
	/* z = mean + exp(½·clamp(logvar, −30, 20))·eps with moments (N, 2C, S) = [mean | logvar] per
	 * sample: dmoments from dz (N, C, S) */
	int (*gaussian_sample_backward)(float *dmoments, const float *dz, const float *moments, const float *eps,
	                                int64_t N, int64_t C, int64_t S, int acc);
	/* *loss (host) = Σ_n w[n]·Σ_i (pred−target)² / (N·per); dpred = (float)(gscale·2·w[n]/(N·per))·(pred−target)
	 * (overwritten); w host memory, NULL = all 1 */
	int (*mse_loss)(double *loss, float *dpred, const float *pred, const float *target, const float *w,
	                int64_t N, int64_t per, float gscale);
	/* mask[i] = 1/(1−p) (as torch's float division) when the counter-based uniform u(seed, stream, i)
	 * < 1 − p, else 0 */
	int (*dropout_mask)(float *mask, int64_t n, float p, uint64_t seed, uint64_t stream);
	/* one Adam/AdamW update of n elements (see struct sd_adam_coef); m, v updated in place */
	int (*adam_step)(float *p, const float *g, float *m, float *v, int64_t n, const struct sd_adam_coef *k);
	/* *out (host) = Σ x² accumulated in double */
	int (*sumsq)(double *out, const float *x, int64_t n);

	/* ---- fused ops (optional: NULL makes lib/ops.c compose the op from the slots above) ---- */
	/* out (N,Lq,H·dv) = softmax(scale · q kᵀ) v per head, q (N,Lq,H·d), k (N,Lk,H·d), v (N,Lk,H·dv), heads
	 * laid out as sd_attention's; causal masks keys j > query i; the scores are never stored whole
	 * (sd_attention calls it when no `probs` are asked for).  N, Lq, Lk, H ≥ 1. */
	int (*attention)(float *out, const float *q, const float *k, const float *v, int64_t N, int64_t Lq, int64_t Lk,
	                 int64_t H, int64_t d, int64_t dv, float scale, int causal);

	/* ---- weights kept in their stored dtype (sd_weights_load_stored) ----
	 * dst[i] = src[i] widened exactly to f32, src n elements of SD_DTYPE_F16 or SD_DTYPE_BF16 (the ops
	 * convert a weight at use: the numbers are those of a weight widened at load) */
	int (*to_f32)(float *dst, const void *src, enum sd_dtype dtype, int64_t n);
};

extern const struct sd_backend sd_cpu_backend;
/* NULL when built without CUDA or no GPU can be used (then sd_errmsg says why). */
const struct sd_backend *sd_cuda_backend(void);

/* Apply sd_threads() to OpenBLAS/OpenMP once (called by the CPU backend before its first op). */
void sd_threads_apply(void);

#endif
