/*
 * nn/linear.c - one linear with an optional LoRA adapter and dropout, each forward next to its backward,
 * as PEFT computes it (peft/tuners/lora/layer.py, Linear.forward: result + lora_B(lora_A(dropout(x))) ·
 * scaling, s = alpha / r): the run-time forward, the training forward with a given dropout mask and its
 * backward (checked once, then composed of the linear, matmul and mul ops), and the layer in training
 * (the dropout masks regenerated from their seed in the backward).  The model walks (models/clip.c,
 * vae.c, unet.c) call these; the trainer (train/step.c) attaches the adapters.
 *
 * Input gradients honour `acc` (0 overwrite, 1 add); parameter gradients always add (see sd.h).
 */
#include <stdlib.h>
#include <string.h>
#include "ops-check.h"

/* A 2-D view (rows, cols) of t's data (no copy; t's device). */
static sd_tensor view2(const sd_tensor *t, int64_t rows, int64_t cols)
{
	sd_tensor v = *t;
	v.ndim = 2;
	v.shape[0] = rows;
	v.shape[1] = cols;
	v.owns = 0;
	v.aux = NULL;
	v.aux_free = NULL;
	return v;
}

/* A 2-D tensor header over scratch memory */
static int scratch2(sd_tensor *v, const struct sd_backend *be, int slot, int64_t rows, int64_t cols)
{
	memset(v, 0, sizeof *v);
	v->dtype = SD_DTYPE_F32;
	v->ndim = 2;
	v->shape[0] = rows;
	v->shape[1] = cols;
	v->device = be->device;
	v->data = scratch(be, slot, (size_t)(rows * cols > 0 ? rows * cols : 1) * sizeof(float));
	return v->data ? 0 : -1;
}

/* ==== the layer ==== */

int sd_lora_rank(const sd_lora_layer *l)
{
	return l && l->a && l->b ? (int)l->a->shape[0] : 0;
}

int sd_lora_linear_forward(sd_tensor *out, const sd_tensor *x, const sd_tensor *w, const sd_tensor *b,
                           const sd_lora_layer *l, sd_tensor *ax)
{
	if (sd_linear(out, x, w, b)) return -1;
	if (!l || !l->a) return 0;
	if (!l->b || l->a->ndim != 2 || l->b->ndim != 2 || l->b->shape[1] != l->a->shape[0])
		return sd_seterr("sd_lora_linear_forward: A and B must be (r, in) and (out, r)");
	if (!ax) return sd_seterr("sd_lora_linear_forward: an adapter is set but no scratch was given");
	sd_tensor t = *x; /* x·Aᵀ (…, r) over the scratch */
	t.shape[t.ndim - 1] = l->a->shape[0];
	t.data = ax->data;
	t.device = ax->device;
	t.owns = 0;
	if (sd_tensor_numel(&t) > sd_tensor_numel(ax)) return sd_seterr("sd_lora_linear_forward: scratch too small");
	if (sd_linear(&t, x, l->a, NULL)) return -1;
	/* out (…, O) += scale · t (…, r) · Bᵀ */
	return sd_matmul(out, &t, l->b, 0, 1, l->scale, 1.0f);
}

/* ==== in training ==== */

/* (rows, r) view of the first rows·r floats of ax, checked to be large enough */
static int ax_view(const char *op, sd_tensor *t, const sd_tensor *ax, int64_t rows, int64_t r)
{
	if (!ax) return sd_seterr("%s: an adapter is set but ax was not given", op);
	if (ax->dtype != SD_DTYPE_F32) return sd_seterr("%s: ax is %s, expected f32", op, sd_dtype_name(ax->dtype));
	if (sd_tensor_numel(ax) < rows * r) return shape_err(op, "ax (too small)", ax);
	*t = view2(ax, rows, r);
	return 0;
}

static int check_lora(const char *op, const sd_lora_layer *l, int64_t O, int64_t I)
{
	if (!l->b || l->a->ndim != 2 || l->b->ndim != 2 || l->b->shape[1] != l->a->shape[0] || l->a->shape[1] != I ||
	    l->b->shape[0] != O)
		return sd_seterr("%s: A and B must be (r, %lld) and (%lld, r)", op, (long long)I, (long long)O);
	return 0;
}

int sd_lora_linear_forward_train(sd_tensor *out, sd_tensor *ax, const sd_tensor *x, const sd_tensor *w,
                                 const sd_tensor *b, const sd_lora_layer *l, const sd_tensor *mask)
{
	static const char op[] = "sd_lora_linear_forward_train";
	if (!mask || !l || !l->a) return sd_lora_linear_forward(out, x, w, b, l, ax);
	static const char *const names[] = {"out", "x", "mask"};
	const struct sd_backend *be = PREP(op, out, x, mask);
	if (!be) return -1;
	if (x->ndim < 1 || w->ndim != 2 || x->shape[x->ndim - 1] != w->shape[1]) return shape_err(op, "x", x);
	if (need_like(op, "mask", mask, x) || check_lora(op, l, w->shape[0], w->shape[1])) return -1;
	int64_t I = w->shape[1], O = w->shape[0], r = l->a->shape[0], rows = I ? inner(x, 0) / I : 0;
	if (sd_linear(out, x, w, b)) return -1;
	if (rows == 0 || r == 0) return 0;
	sd_tensor xd, t, o2 = view2(out, rows, O), x2 = view2(x, rows, I), m2 = view2(mask, rows, I);
	/* ax = (x ⊙ mask)·Aᵀ, out += s · ax·Bᵀ (PEFT: result + lora_B(lora_A(dropout(x))) · scaling) */
	if (ax_view(op, &t, ax, rows, r) || scratch2(&xd, be, 1, rows, I) || sd_mul(&xd, &x2, &m2)) return -1;
	if (sd_linear(&t, &xd, l->a, NULL)) return -1;
	return sd_matmul(&o2, &t, l->b, 0, 1, l->scale, 1.0f);
}

int sd_lora_linear_backward(sd_tensor *dx, sd_tensor *da, sd_tensor *db, const sd_tensor *dy, const sd_tensor *x,
                            const sd_tensor *w, const sd_lora_layer *l, const sd_tensor *ax, const sd_tensor *mask,
                            int acc)
{
	static const char op[] = "sd_lora_linear_backward";
	static const char *const names[] = {"dx", "dA", "dB", "dy", "x", "w", "mask"};
	const struct sd_backend *be = PREP(op, dx, da, db, dy, x, w, mask);
	if (!be) return -1;
	int lora = l && l->a && sd_lora_rank(l) > 0;
	if (!lora) return dx ? sd_linear_backward(dx, NULL, NULL, dy, NULL, w, acc) : 0;
	if (w->ndim != 2) return shape_err(op, "w", w);
	int64_t O = w->shape[0], I = w->shape[1], r = l->a->shape[0];
	if (check_lora(op, l, O, I)) return -1;
	if (!x) return sd_seterr("%s: x is required", op);
	if (x->ndim < 1 || x->shape[x->ndim - 1] != I) return shape_err(op, "x", x);
	int64_t rows = I ? inner(x, 0) / I : inner(dy, 0) / (O ? O : 1);
	int64_t yshape[SD_MAX_DIMS];
	memcpy(yshape, x->shape, sizeof yshape);
	yshape[x->ndim - 1] = O;
	if (need_shape(op, "dy", dy, x->ndim, yshape) || need_like(op, "dx", dx, x) || need_like(op, "mask", mask, x) ||
	    (da && need_shape(op, "dA", da, 2, l->a->shape)) || (db && need_shape(op, "dB", db, 2, l->b->shape)))
		return -1;
	sd_tensor t;
	if (ax_view(op, &t, ax, rows, r)) return -1;
	if (dx && sd_linear_backward(dx, NULL, NULL, dy, NULL, w, acc)) return -1;
	if (rows == 0) return 0;
	sd_tensor dy2 = view2(dy, rows, O), x2 = view2(x, rows, I), g, xd;
	/* dB (O, r) += s · dyᵀ · ax */
	if (db && sd_matmul(db, &dy2, &t, 1, 0, l->scale, 1.0f)) return -1;
	if (!da && !dx) return 0;
	/* g (rows, r) = dy · B */
	if (scratch2(&g, be, 0, rows, r) || sd_matmul(&g, &dy2, l->b, 0, 0, 1.0f, 0.0f)) return -1;
	sd_tensor m2 = mask ? view2(mask, rows, I) : x2;
	if (da) {
		/* dA (r, I) += s · gᵀ · (x ⊙ mask) */
		const sd_tensor *src = &x2;
		if (mask) {
			if (scratch2(&xd, be, 1, rows, I) || sd_mul(&xd, &x2, &m2)) return -1;
			src = &xd;
		}
		if (sd_matmul(da, &g, src, 1, 0, l->scale, 1.0f)) return -1;
	}
	if (dx) {
		sd_tensor dx2 = view2(dx, rows, I);
		/* dx += s · (g · A) ⊙ mask (dx already holds dy·w) */
		if (!mask) return sd_matmul(&dx2, &g, l->a, 0, 0, l->scale, 1.0f);
		if (scratch2(&xd, be, 1, rows, I) || sd_matmul(&xd, &g, l->a, 0, 0, l->scale, 0.0f) || sd_mul(&xd, &xd, &m2) ||
		    sd_add(&dx2, &dx2, &xd, 1.0f, 1.0f))
			return -1;
	}
	return 0;
}

/* A dropout mask shaped like x for t (NULL when t has no dropout), or NULL with *err set. */
static sd_tensor *mask_for(const sd_tensor *x, const sd_lora_train *t, int *err)
{
	*err = 0;
	if (!t || !(t->dropout > 0)) return NULL;
	sd_tensor *m = sd_tensor_new_on(x->device, SD_DTYPE_F32, x->ndim, x->shape);
	uint64_t step = t->step ? *t->step : 0;
	if (!m || sd_dropout_mask(m, t->dropout, t->seed, sd_dropout_stream(step, t->id, 0))) {
		sd_tensor_free(m);
		*err = 1;
		return NULL;
	}
	return m;
}

int sd_lora_train_forward(sd_tensor *out, sd_tensor *ax, const sd_tensor *x, const sd_tensor *w, const sd_tensor *b,
                          const sd_lora_layer *l, const sd_lora_train *t)
{
	if (!l || !l->a || !t || !(t->dropout > 0)) return sd_lora_linear_forward(out, x, w, b, l, ax);
	int err;
	sd_tensor *m = mask_for(x, t, &err);
	if (err) return -1;
	int rc = sd_lora_linear_forward_train(out, ax, x, w, b, l, m);
	sd_tensor_free(m);
	return rc;
}

int sd_lora_train_backward(sd_tensor *dx, const sd_tensor *dy, const sd_tensor *x, const sd_tensor *w,
                           const sd_lora_layer *l, const sd_lora_train *t, int acc)
{
	if (!l || !l->a || sd_lora_rank(l) == 0) return dx ? sd_linear_backward(dx, NULL, NULL, dy, NULL, w, acc) : 0;
	sd_tensor *da = t ? t->da : NULL, *db = t ? t->db : NULL;
	if (!dx && !da && !db) return 0;
	int err;
	sd_tensor *m = mask_for(x, t, &err), *xd = NULL, *ax = NULL;
	if (err) return -1;
	/* ax = (x ⊙ mask)·Aᵀ as the forward computed it (its scratch was shared by the layer's linears) */
	int64_t shape[SD_MAX_DIMS];
	memcpy(shape, x->shape, sizeof shape);
	shape[x->ndim - 1] = l->a->shape[0];
	int rc = -1;
	if (!(ax = sd_tensor_new_on(x->device, SD_DTYPE_F32, x->ndim, shape))) goto out;
	if (m && (!(xd = sd_tensor_new_on(x->device, SD_DTYPE_F32, x->ndim, x->shape)) || sd_mul(xd, x, m))) goto out;
	if (sd_linear(ax, xd ? xd : x, l->a, NULL)) goto out;
	rc = sd_lora_linear_backward(dx, da, db, dy, x, w, l, ax, m, acc);
out:
	sd_tensor_free(m);
	sd_tensor_free(xd);
	sd_tensor_free(ax);
	return rc;
}
