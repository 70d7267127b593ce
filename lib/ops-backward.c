/*
 * ops-backward.c - the backward of each op of sd.h whose forward is in ops.c ("every op with its
 * backward"): check shapes, dtypes and devices once, then call the backend, as lib/ops.c does for the
 * forwards.  What is GEMM-shaped (linear, attention) goes through the backend's sgemm and sd_matmul; the
 * rest through the training slots of lib/backend.h.  The derivatives are those of torch's autograd for the
 * same forwards (torch/csrc/autograd/FunctionsManual.cpp: the linear, convolution, native_group_norm,
 * native_layer_norm, softmax, and scaled-dot-product attention backwards).  The dropout mask of the
 * LoRA linear (nn/linear.c) is here too: it is a backend slot like the others.
 *
 * Input gradients honour `acc` (0 overwrite, 1 add); parameter gradients always add (see sd.h).
 */
#include <stdlib.h>
#include <string.h>
#include "ops-check.h"

/* ==== checks ==== */

#define NOT_IMPLEMENTED(op, be) sd_seterr("%s: not implemented on %s", op, (be)->name)
#define SLOT(be, op, slot) do { if (!(be)->slot) return NOT_IMPLEMENTED(op, be); } while (0)

/* y (+)= alpha·x over n floats with the add slot (acc 0: y = alpha·x) */
static int axpy(const struct sd_backend *be, float *y, const float *x, float alpha, int64_t n, int acc)
{
	if (n == 0) return 0;
	if (acc) return be->add(y, y, x, 1.0f, alpha, n, n, 1);
	return be->add(y, x, NULL, alpha, 0.0f, n, 1, 1);
}

/* ==== linear ==== */

int sd_linear_backward(sd_tensor *dx, sd_tensor *dw, sd_tensor *db, const sd_tensor *dy, const sd_tensor *x,
                       const sd_tensor *w, int acc)
{
	static const char op[] = "sd_linear_backward";
	static const char *const names[] = {"dx", "dw", "db", "dy", "x", "w"};
	const struct sd_backend *be = PREP(op, dx, dw, db, dy, x, w);
	if (!be) return -1;
	if (w->ndim != 2) return shape_err(op, "w", w);
	int64_t O = w->shape[0], I = w->shape[1];
	if (dy->ndim < 1 || dy->shape[dy->ndim - 1] != O) return shape_err(op, "dy", dy);
	int64_t rows = O ? inner(dy, 0) / O : 0;
	int64_t xshape[SD_MAX_DIMS];
	memcpy(xshape, dy->shape, sizeof xshape);
	xshape[dy->ndim - 1] = I;
	if (dx && need_shape(op, "dx", dx, dy->ndim, xshape)) return -1;
	if (dw) {
		if (!x) return sd_seterr("%s: dw needs x", op);
		if (need_shape(op, "x", x, dy->ndim, xshape) || need_shape(op, "dw", dw, 2, w->shape)) return -1;
	}
	if (db && need_shape(op, "db", db, 1, &O)) return -1;
	SLOT(be, op, gemm);
	if (dx && rows * I > 0) {
		if (O == 0) {
			if (!acc && be->memset0(dx->data, sd_tensor_nbytes(dx))) return -1;
		} else if (be->gemm(0, 0, rows, I, O, 1.0f, dy->data, O, 0, w->data, I, 0, acc ? 1.0f : 0.0f, dx->data, I, 0,
		                    1))
			return -1;
	}
	if (dw && rows && O * I > 0 &&
	    be->gemm(1, 0, O, I, rows, 1.0f, dy->data, O, 0, x->data, I, 0, 1.0f, dw->data, I, 0, 1))
		return -1;
	if (db && rows && O) {
		SLOT(be, op, reduce);
		if (be->reduce(db->data, dy->data, rows, O, 1, 1.0f, 1)) return -1;
	}
	return 0;
}

/* ==== convolution ==== */

int sd_conv2d_backward(sd_tensor *dx, const sd_tensor *dy, const sd_tensor *w, int stride, int pt, int pb, int pl,
                       int pr, int acc)
{
	static const char op[] = "sd_conv2d_backward";
	static const char *const names[] = {"dx", "dy", "w"};
	const struct sd_backend *be = PREP(op, dx, dy, w);
	if (!be) return -1;
	if (dx->ndim != 4) return shape_err(op, "dx", dx);
	if (w->ndim != 4 || w->shape[1] != dx->shape[1]) return shape_err(op, "w", w);
	if (stride < 1 || pt < 0 || pb < 0 || pl < 0 || pr < 0)
		return sd_seterr("%s: bad stride %d or padding", op, stride);
	int64_t N = dx->shape[0], C = dx->shape[1], H = dx->shape[2], W = dx->shape[3], kh = w->shape[2], kw = w->shape[3];
	if (H + pt + pb < kh || W + pl + pr < kw) return shape_err(op, "dx (smaller than the kernel)", dx);
	int64_t Ho = (H + pt + pb - kh) / stride + 1, Wo = (W + pl + pr - kw) / stride + 1;
	int64_t shape[4] = {N, w->shape[0], Ho, Wo};
	if (need_shape(op, "dy", dy, 4, shape)) return -1;
	SLOT(be, op, conv2d_backward_input);
	if (sd_tensor_numel(dx) == 0) return 0;
	return be->conv2d_backward_input(dx->data, dy->data, w->data, N, C, H, W, w->shape[0], (int)kh, (int)kw, stride, pt,
	                                 pl, Ho, Wo, acc);
}

/* ==== normalisation ==== */

static int need_vec(const char *op, const char *what, const sd_tensor *t, int64_t n)
{
	if (t && (t->ndim != 1 || t->shape[0] != n)) return shape_err(op, what, t);
	return 0;
}

int sd_group_norm_backward(sd_tensor *dx, sd_tensor *dgamma, sd_tensor *dbeta, const sd_tensor *dy,
                           const sd_tensor *x, int groups, const sd_tensor *gamma, const sd_tensor *beta, float eps,
                           int silu, int acc)
{
	static const char op[] = "sd_group_norm_backward";
	static const char *const names[] = {"dx", "dgamma", "dbeta", "dy", "x", "gamma", "beta"};
	const struct sd_backend *be = PREP(op, dx, dgamma, dbeta, dy, x, gamma, beta);
	if (!be) return -1;
	if (x->ndim < 2) return shape_err(op, "x", x);
	int64_t C = x->shape[1];
	if (groups < 1 || C % groups)
		return sd_seterr("%s: %lld channels do not split into %d groups", op, (long long)C, groups);
	if (need_vec(op, "gamma", gamma, C) || need_vec(op, "beta", beta, C) || need_vec(op, "dgamma", dgamma, C) ||
	    need_vec(op, "dbeta", dbeta, C) || need_like(op, "dy", dy, x) || need_like(op, "dx", dx, x))
		return -1;
	if (!dx) return sd_seterr("%s: dx is required", op);
	SLOT(be, op, group_norm_backward);
	if (sd_tensor_numel(x) == 0) return 0;
	return be->group_norm_backward(dx->data, dgamma ? dgamma->data : NULL, dbeta ? dbeta->data : NULL, dy->data,
	                               x->data, gamma ? gamma->data : NULL, beta ? beta->data : NULL, x->shape[0], C,
	                               inner(x, 2), groups, eps, silu, acc);
}

int sd_layer_norm_backward(sd_tensor *dx, sd_tensor *dgamma, sd_tensor *dbeta, const sd_tensor *dy,
                           const sd_tensor *x, const sd_tensor *gamma, float eps, int acc)
{
	static const char op[] = "sd_layer_norm_backward";
	static const char *const names[] = {"dx", "dgamma", "dbeta", "dy", "x", "gamma"};
	const struct sd_backend *be = PREP(op, dx, dgamma, dbeta, dy, x, gamma);
	if (!be) return -1;
	if (x->ndim < 1) return shape_err(op, "x", x);
	int64_t D = x->shape[x->ndim - 1];
	if (need_vec(op, "gamma", gamma, D) || need_vec(op, "dgamma", dgamma, D) || need_vec(op, "dbeta", dbeta, D) ||
	    need_like(op, "dy", dy, x) || need_like(op, "dx", dx, x))
		return -1;
	if (!dx) return sd_seterr("%s: dx is required", op);
	SLOT(be, op, layer_norm_backward);
	if (sd_tensor_numel(x) == 0) return 0;
	return be->layer_norm_backward(dx->data, dgamma ? dgamma->data : NULL, dbeta ? dbeta->data : NULL, dy->data,
	                               x->data, gamma ? gamma->data : NULL, inner(x, 0) / D, D, eps, acc);
}

/* ==== elementwise ==== */

int sd_act_backward(sd_tensor *dx, const sd_tensor *dy, const sd_tensor *x, enum sd_act act, int acc)
{
	static const char op[] = "sd_act_backward";
	static const char *const names[] = {"dx", "dy", "x"};
	const struct sd_backend *be = PREP(op, dx, dy, x);
	if (!be) return -1;
	if ((unsigned)act >= SD_ACT_COUNT) return sd_seterr("%s: unknown activation %d", op, (int)act);
	if (need_like(op, "dy", dy, x) || need_like(op, "dx", dx, x)) return -1;
	SLOT(be, op, act_backward);
	if (sd_tensor_numel(x) == 0) return 0;
	return be->act_backward(dx->data, dy->data, x->data, sd_tensor_numel(x), act, acc);
}

int sd_geglu_backward(sd_tensor *dx, const sd_tensor *dy, const sd_tensor *x, int acc)
{
	static const char op[] = "sd_geglu_backward";
	static const char *const names[] = {"dx", "dy", "x"};
	const struct sd_backend *be = PREP(op, dx, dy, x);
	if (!be) return -1;
	if (x->ndim < 1 || x->shape[x->ndim - 1] % 2) return shape_err(op, "x (last dimension must be even)", x);
	int64_t shape[SD_MAX_DIMS];
	memcpy(shape, x->shape, sizeof shape);
	int64_t F = shape[x->ndim - 1] /= 2;
	if (need_shape(op, "dy", dy, x->ndim, shape) || need_like(op, "dx", dx, x)) return -1;
	SLOT(be, op, geglu_backward);
	if (F == 0 || sd_tensor_numel(x) == 0) return 0;
	return be->geglu_backward(dx->data, dy->data, x->data, inner(dy, 0) / F, F, acc);
}

int sd_softmax_backward(sd_tensor *dx, const sd_tensor *dy, const sd_tensor *y, int acc)
{
	static const char op[] = "sd_softmax_backward";
	static const char *const names[] = {"dx", "dy", "y"};
	const struct sd_backend *be = PREP(op, dx, dy, y);
	if (!be) return -1;
	if (y->ndim < 1) return shape_err(op, "y", y);
	if (need_like(op, "dy", dy, y) || need_like(op, "dx", dx, y)) return -1;
	if (acc && dx == dy) return sd_seterr("%s: dx may be dy only when overwriting", op);
	SLOT(be, op, softmax_backward);
	int64_t D = y->shape[y->ndim - 1];
	if (sd_tensor_numel(y) == 0) return 0;
	return be->softmax_backward(dx->data, dy->data, y->data, inner(y, 0) / D, D, D, 1.0f, acc);
}

int sd_add_backward(sd_tensor *da, sd_tensor *db, const sd_tensor *dout, float alpha, float beta, int acc)
{
	static const char op[] = "sd_add_backward";
	static const char *const names[] = {"da", "db", "dout"};
	const struct sd_backend *be = PREP(op, da, db, dout);
	if (!be) return -1;
	if (need_like(op, "da", da, dout)) return -1;
	SLOT(be, op, add);
	int64_t n = sd_tensor_numel(dout);
	if (da && axpy(be, da->data, dout->data, alpha, n, acc)) return -1;
	if (!db) return 0;
	if (sd_tensor_same_shape(db, dout)) return axpy(be, db->data, dout->data, beta, n, acc);
	/* the broadcasts sd_add accepts: trailing dimensions, or (N, C) over (N, C, *) */
	const sd_tensor *a = dout, *b = db;
	int64_t A, m = sd_tensor_numel(b), S = 1;
	int trailing = b->ndim <= a->ndim;
	for (int i = 0; trailing && i < b->ndim; i++) trailing = b->shape[b->ndim - 1 - i] == a->shape[a->ndim - 1 - i];
	if (trailing) {
		A = m ? n / m : 0;
	} else if (b->ndim == 2 && a->ndim >= 3 && b->shape[0] == a->shape[0] && b->shape[1] == a->shape[1]) {
		A = 1;
		S = inner(a, 2);
	} else {
		return shape_err(op, "db (not broadcastable onto dout)", db);
	}
	SLOT(be, op, reduce);
	if (m == 0) return 0;
	return be->reduce(db->data, dout->data, A, m, S, beta, acc);
}

int sd_mul_backward(sd_tensor *da, sd_tensor *db, const sd_tensor *dout, const sd_tensor *a, const sd_tensor *b,
                    int acc)
{
	static const char op[] = "sd_mul_backward";
	static const char *const names[] = {"da", "db", "dout", "a", "b"};
	const struct sd_backend *be = PREP(op, da, db, dout, a, b);
	if (!be) return -1;
	if ((da && !b) || (db && !a)) return sd_seterr("%s: da needs b and db needs a", op);
	if (need_like(op, "da", da, dout) || need_like(op, "db", db, dout) || (a && need_like(op, "a", a, dout)) ||
	    (b && need_like(op, "b", b, dout)))
		return -1;
	SLOT(be, op, mul);
	SLOT(be, op, add);
	int64_t n = sd_tensor_numel(dout);
	if (n == 0) return 0;
	for (int k = 0; k < 2; k++) {
		sd_tensor *d = k ? db : da;
		const sd_tensor *other = k ? a : b;
		if (!d) continue;
		if (!acc) {
			if (be->mul(d->data, dout->data, other->data, n)) return -1;
			continue;
		}
		float *t = scratch(be, 0, (size_t)n * sizeof(float));
		if (!t || be->mul(t, dout->data, other->data, n) || be->add(d->data, d->data, t, 1.0f, 1.0f, n, n, 1))
			return -1;
	}
	return 0;
}

/* ==== attention ==== */

/* Rows of queries per block: bounds the two score buffers to block × Lk × heads floats each. */
#define ATTN_SCRATCH_FLOATS ((int64_t)8 << 20)

int sd_attention_backward(sd_tensor *dq, sd_tensor *dk, sd_tensor *dv, const sd_tensor *dout, const sd_tensor *q,
                          const sd_tensor *k, const sd_tensor *v, const sd_tensor *probs, int heads, float scale,
                          int causal, int acc)
{
	static const char op[] = "sd_attention_backward";
	static const char *const names[] = {"dq", "dk", "dv", "dout", "q", "k", "v", "probs"};
	const struct sd_backend *be = PREP(op, dq, dk, dv, dout, q, k, v, probs);
	if (!be) return -1;
	if (q->ndim != 3) return shape_err(op, "q", q);
	int64_t N = q->shape[0], Lq = q->shape[1], Lk = k->shape[1];
	if (heads < 1 || q->shape[2] % heads)
		return sd_seterr("%s: %lld features do not split into %d heads", op, (long long)q->shape[2], heads);
	int64_t H = heads, d = q->shape[2] / heads;
	if (k->ndim != 3 || k->shape[0] != N || k->shape[2] != q->shape[2]) return shape_err(op, "k", k);
	if (v->ndim != 3 || v->shape[0] != N || v->shape[1] != Lk || v->shape[2] % heads) return shape_err(op, "v", v);
	int64_t dvh = v->shape[2] / heads;
	int64_t oshape[3] = {N, Lq, H * dvh}, pshape[4] = {N, H, Lq, Lk};
	if (need_shape(op, "dout", dout, 3, oshape) || need_like(op, "dq", dq, q) || need_like(op, "dk", dk, k) ||
	    need_like(op, "dv", dv, v) || (probs && need_shape(op, "probs", probs, 4, pshape)))
		return -1;
	SLOT(be, op, gemm);
	SLOT(be, op, softmax);
	SLOT(be, op, softmax_backward);
	/* dk and dv are sums over query blocks: start them at zero unless accumulating */
	if (!acc) {
		if (dk && sd_tensor_numel(dk) && be->memset0(dk->data, sd_tensor_nbytes(dk))) return -1;
		if (dv && sd_tensor_numel(dv) && be->memset0(dv->data, sd_tensor_nbytes(dv))) return -1;
	}
	if (dq && !acc && sd_tensor_numel(dq) && Lk == 0 && be->memset0(dq->data, sd_tensor_nbytes(dq))) return -1;
	if (N == 0 || Lq == 0 || Lk == 0 || H * d + H * dvh == 0) return 0;
	int64_t blk = ATTN_SCRATCH_FLOATS / (H * Lk);
	if (blk < 1) blk = 1;
	if (blk > Lq) blk = Lq;
	float *dP = scratch(be, 0, (size_t)(H * blk * Lk) * sizeof(float));
	float *Pr = probs ? NULL : scratch(be, 1, (size_t)(H * blk * Lk) * sizeof(float));
	if (!dP || (!probs && !Pr)) return -1;
	const float *Q = q->data, *K = k->data, *V = v->data, *dO = dout->data;
	for (int64_t n = 0; n < N; n++)
		for (int64_t r0 = 0; r0 < Lq; r0 += blk) {
			int64_t rows = Lq - r0 < blk ? Lq - r0 : blk;
			const float *Qb = Q + (n * Lq + r0) * H * d, *Kn = K + n * Lk * H * d, *Vn = V + n * Lk * H * dvh;
			const float *dOb = dO + (n * Lq + r0) * H * dvh;
			/* P for these rows, per head h at P + h·ps (row stride Lk) */
			const float *P;
			int64_t ps;
			if (probs) {
				P = (const float *)probs->data + (n * H * Lq + r0) * Lk;
				ps = Lq * Lk;
			} else {
				if (be->gemm(0, 1, rows, Lk, d, 1.0f, Qb, H * d, d, Kn, H * d, d, 0.0f, Pr, Lk, rows * Lk, H))
					return -1;
				for (int64_t h = 0; h < H; h++)
					if (be->softmax(Pr + h * rows * Lk, rows, Lk, Lk, scale, causal ? r0 : -1)) return -1;
				P = Pr;
				ps = rows * Lk;
			}
			/* dv_h (Lk, dv) += P_hᵀ · dO_h */
			if (dv && dvh && be->gemm(1, 0, Lk, dvh, rows, 1.0f, P, Lk, ps, dOb, H * dvh, dvh, 1.0f,
			                          (float *)dv->data + n * Lk * H * dvh, H * dvh, dvh, H))
				return -1;
			if (!dq && !dk) continue;
			/* dP_h (rows, Lk) = dO_h · V_hᵀ, then dS = scale · P ⊙ (dP − Σ dP⊙P) in place */
			if (be->gemm(0, 1, rows, Lk, dvh, 1.0f, dOb, H * dvh, dvh, Vn, H * dvh, dvh, 0.0f, dP, Lk, rows * Lk, H))
				return -1;
			for (int64_t h = 0; h < H; h++)
				if (be->softmax_backward(dP + h * rows * Lk, dP + h * rows * Lk, P + h * ps, rows, Lk, Lk, scale, 0))
					return -1;
			/* dq_h (rows, d) = dS_h · K_h;  dk_h (Lk, d) += dS_hᵀ · Q_h */
			if (dq && d && be->gemm(0, 0, rows, d, Lk, 1.0f, dP, Lk, rows * Lk, Kn, H * d, d, acc ? 1.0f : 0.0f,
			                        (float *)dq->data + (n * Lq + r0) * H * d, H * d, d, H))
				return -1;
			if (dk && d && be->gemm(1, 0, Lk, d, rows, 1.0f, dP, Lk, rows * Lk, Qb, H * d, d, 1.0f,
			                        (float *)dk->data + n * Lk * H * d, H * d, d, H))
				return -1;
		}
	return 0;
}

/* ==== layout ==== */

/* dx (acc) transpose of dy as (batch, R, C) → (batch, C, R) */
static int transpose_acc(const struct sd_backend *be, sd_tensor *dx, const sd_tensor *dy, int64_t batch, int64_t R,
                         int64_t C, int acc)
{
	int64_t n = batch * R * C;
	if (n == 0) return 0;
	if (!acc) return be->transpose(dx->data, dy->data, batch, R, C);
	float *t = scratch(be, 0, (size_t)n * sizeof(float));
	if (!t || be->transpose(t, dy->data, batch, R, C)) return -1;
	return be->add(dx->data, dx->data, t, 1.0f, 1.0f, n, n, 1);
}

int sd_nchw_to_nlc_backward(sd_tensor *dx, const sd_tensor *dy, int acc)
{
	static const char op[] = "sd_nchw_to_nlc_backward";
	static const char *const names[] = {"dx", "dy"};
	const struct sd_backend *be = PREP(op, dx, dy);
	if (!be) return -1;
	if (dx->ndim != 4) return shape_err(op, "dx", dx);
	int64_t shape[3] = {dx->shape[0], dx->shape[2] * dx->shape[3], dx->shape[1]};
	if (need_shape(op, "dy", dy, 3, shape)) return -1;
	SLOT(be, op, transpose);
	SLOT(be, op, add);
	return transpose_acc(be, dx, dy, shape[0], shape[1], shape[2], acc);
}

int sd_nlc_to_nchw_backward(sd_tensor *dx, const sd_tensor *dy, int acc)
{
	static const char op[] = "sd_nlc_to_nchw_backward";
	static const char *const names[] = {"dx", "dy"};
	const struct sd_backend *be = PREP(op, dx, dy);
	if (!be) return -1;
	if (dy->ndim != 4 || dx->ndim != 3 || dx->shape[0] != dy->shape[0] || dx->shape[2] != dy->shape[1] ||
	    dx->shape[1] != dy->shape[2] * dy->shape[3])
		return shape_err(op, "dx (must be (N, H·W, C) for dy (N, C, H, W))", dx);
	SLOT(be, op, transpose);
	SLOT(be, op, add);
	return transpose_acc(be, dx, dy, dy->shape[0], dy->shape[1], dx->shape[1], acc);
}

int sd_upsample2x_backward(sd_tensor *dx, const sd_tensor *dy, int acc)
{
	static const char op[] = "sd_upsample2x_backward";
	static const char *const names[] = {"dx", "dy"};
	const struct sd_backend *be = PREP(op, dx, dy);
	if (!be) return -1;
	if (dx->ndim != 4) return shape_err(op, "dx", dx);
	int64_t shape[4] = {dx->shape[0], dx->shape[1], 2 * dx->shape[2], 2 * dx->shape[3]};
	if (need_shape(op, "dy", dy, 4, shape)) return -1;
	SLOT(be, op, upsample2x_backward);
	if (sd_tensor_numel(dx) == 0) return 0;
	return be->upsample2x_backward(dx->data, dy->data, dx->shape[0] * dx->shape[1], dx->shape[2], dx->shape[3], acc);
}

int sd_concat1_backward(sd_tensor *da, sd_tensor *db, const sd_tensor *dout, int acc)
{
	static const char op[] = "sd_concat1_backward";
	static const char *const names[] = {"da", "db", "dout"};
	const struct sd_backend *be = PREP(op, da, db, dout);
	if (!be) return -1;
	if (dout->ndim < 2) return shape_err(op, "dout", dout);
	int64_t Ca = -1, Cb = -1;
	for (int k = 0; k < 2; k++) {
		const sd_tensor *t = k ? db : da;
		if (!t) continue;
		int ok = t->ndim == dout->ndim && t->shape[0] == dout->shape[0] && t->shape[1] <= dout->shape[1];
		for (int i = 2; ok && i < t->ndim; i++) ok = t->shape[i] == dout->shape[i];
		if (!ok) return shape_err(op, k ? "db (must match dout but in dim 1)" : "da (must match dout but in dim 1)", t);
		*(k ? &Cb : &Ca) = t->shape[1];
	}
	if (Ca < 0 && Cb < 0) return 0;
	if (Ca < 0) Ca = dout->shape[1] - Cb;
	if (Cb < 0) Cb = dout->shape[1] - Ca;
	if (Ca + Cb != dout->shape[1]) return shape_err(op, "dout (dim 1 is not da's + db's)", dout);
	SLOT(be, op, add);
	int64_t S = inner(dout, 2), sa = Ca * S, sb = Cb * S;
	for (int64_t n = 0; n < dout->shape[0]; n++) {
		const float *o = (const float *)dout->data + n * (sa + sb);
		if (da && axpy(be, (float *)da->data + n * sa, o, 1.0f, sa, acc)) return -1;
		if (db && axpy(be, (float *)db->data + n * sb, o + sa, 1.0f, sb, acc)) return -1;
	}
	return 0;
}

int sd_gaussian_sample_backward(sd_tensor *dmoments, const sd_tensor *dz, const sd_tensor *moments,
                                const sd_tensor *eps, int acc)
{
	static const char op[] = "sd_gaussian_sample_backward";
	static const char *const names[] = {"dmoments", "dz", "moments", "eps"};
	const struct sd_backend *be = PREP(op, dmoments, dz, moments, eps);
	if (!be) return -1;
	if (moments->ndim < 2 || moments->shape[1] % 2) return shape_err(op, "moments (dim 1 must be even)", moments);
	int64_t shape[SD_MAX_DIMS];
	memcpy(shape, moments->shape, sizeof shape);
	shape[1] /= 2;
	if (need_shape(op, "dz", dz, moments->ndim, shape) || need_shape(op, "eps", eps, moments->ndim, shape) ||
	    need_like(op, "dmoments", dmoments, moments))
		return -1;
	SLOT(be, op, gaussian_sample_backward);
	if (sd_tensor_numel(dz) == 0) return 0;
	return be->gaussian_sample_backward(dmoments->data, dz->data, moments->data, eps->data, shape[0], shape[1],
	                                    inner(dz, 2), acc);
}

/* ==== dropout ==== */

int sd_dropout_mask(sd_tensor *mask, float p, uint64_t seed, uint64_t stream)
{
	static const char op[] = "sd_dropout_mask";
	static const char *const names[] = {"mask"};
	const struct sd_backend *be = PREP(op, mask);
	if (!be) return -1;
	if (!(p >= 0.0f && p < 1.0f)) return sd_seterr("%s: p = %g is outside [0, 1)", op, p);
	SLOT(be, op, dropout_mask);
	if (sd_tensor_numel(mask) == 0) return 0;
	return be->dropout_mask(mask->data, sd_tensor_numel(mask), p, seed, stream);
}

uint64_t sd_dropout_stream(uint64_t step, uint32_t layer, uint32_t use)
{
	/* 32 bits of step, 24 of layer, 8 of use: injective for steps < 2^32, layers < 2^24, uses < 256 */
	return (step << 32) ^ ((uint64_t)(layer & 0xffffff) << 8) ^ (use & 0xff);
}
