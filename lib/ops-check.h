/*
 * ops-check.h - the argument checks shared by the backward ops (ops-backward.c) and the LoRA linear
 * (nn/linear.c): dtype and device agreement, shapes, and per-thread scratch.  Internal to lib/; each
 * file that includes it gets its own copies (static), its own scratch buffers included.
 */
#ifndef SD_OPS_CHECK_H
#define SD_OPS_CHECK_H

#include "backend.h"

/* f32 and one device for the non-NULL tensors; the backend, or NULL with a message */
static inline const struct sd_backend *prep(const char *op, int n, const sd_tensor *const *ts, const char *const *names)
{
	const sd_tensor *first = NULL;
	for (int i = 0; i < n; i++) {
		if (!ts[i]) continue;
		if (ts[i]->dtype != SD_DTYPE_F32) {
			sd_seterr("%s: %s is %s, expected f32", op, names[i], sd_dtype_name(ts[i]->dtype));
			return NULL;
		}
		if (!first) first = ts[i];
		else if (ts[i]->device != first->device) {
			sd_seterr("%s: tensors on different devices (%s and %s)", op, sd_device_name(first->device),
			          sd_device_name(ts[i]->device));
			return NULL;
		}
	}
	if (!first) {
		sd_seterr("%s: no tensors", op);
		return NULL;
	}
	const struct sd_backend *be = sd_backend_get(first->device);
	if (be && be->device == SD_DEVICE_CPU) sd_threads_apply();
	return be;
}

#define PREP(op, ...) prep(op, sizeof((const sd_tensor *[]){__VA_ARGS__}) / sizeof(const sd_tensor *), \
                           (const sd_tensor *[]){__VA_ARGS__}, names)

static inline int shape_err(const char *op, const char *what, const sd_tensor *t)
{
	char s[96];
	return sd_seterr("%s: %s has shape %s", op, what, sd_shape_str(t->ndim, t->shape, s, sizeof s));
}

/* t must have exactly the given shape */
static inline int need_shape(const char *op, const char *what, const sd_tensor *t, int ndim, const int64_t *shape)
{
	char s1[96], s2[96];
	int ok = t->ndim == ndim;
	for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
	if (!ok)
		return sd_seterr("%s: %s has shape %s, expected %s", op, what, sd_shape_str(t->ndim, t->shape, s1, sizeof s1),
		                 sd_shape_str(ndim, shape, s2, sizeof s2));
	return 0;
}

static inline int need_like(const char *op, const char *what, const sd_tensor *t, const sd_tensor *like)
{
	return t ? need_shape(op, what, t, like->ndim, like->shape) : 0;
}

static inline int64_t inner(const sd_tensor *t, int from)
{
	int64_t n = 1;
	for (int i = from; i < t->ndim; i++) n *= t->shape[i];
	return n;
}

static inline int isdev(const struct sd_backend *be)
{
	return be->device != SD_DEVICE_CPU;
}

/* A growing per-thread buffer per device and slot (0, 1), reused across calls. */
static inline float *scratch(const struct sd_backend *be, int slot, size_t bytes)
{
	static _Thread_local struct { void *p; size_t n; const struct sd_backend *be; } bufs[2][2];
	int d = isdev(be);
	if (bufs[d][slot].n < bytes) {
		if (bufs[d][slot].p) bufs[d][slot].be->free(bufs[d][slot].p);
		bufs[d][slot].p = be->alloc(bytes);
		bufs[d][slot].n = bufs[d][slot].p ? bytes : 0;
		bufs[d][slot].be = be;
		if (!bufs[d][slot].p) {
			sd_seterr("out of memory (%zu bytes of scratch on %s)", bytes, be->name);
			return NULL;
		}
	}
	return bufs[d][slot].p;
}

#endif
