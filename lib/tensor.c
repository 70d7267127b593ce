/*
 * tensor.c - struct sd_tensor: dtypes, shapes, allocation on a device, dtype conversion (f16/bf16 as
 * torch rounds them: nearest even), and the scratch arena.  Shapes follow PyTorch (row-major).
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include "backend.h"

/* ==== dtypes ==== */

static const struct { const char *name; size_t size; int is_float; } dtypes[SD_DTYPE_COUNT] = {
	[SD_DTYPE_F32] = {"f32", 4, 1}, [SD_DTYPE_F16] = {"f16", 2, 1}, [SD_DTYPE_BF16] = {"bf16", 2, 1},
	[SD_DTYPE_I32] = {"i32", 4, 0}, [SD_DTYPE_I64] = {"i64", 8, 0}, [SD_DTYPE_U8] = {"u8", 1, 0},
	[SD_DTYPE_F64] = {"f64", 8, 1},
};

size_t sd_dtype_size(enum sd_dtype t)
{
	return (unsigned)t < SD_DTYPE_COUNT ? dtypes[t].size : 0;
}

const char *sd_dtype_name(enum sd_dtype t)
{
	return (unsigned)t < SD_DTYPE_COUNT ? dtypes[t].name : "?";
}

int sd_dtype_is_float(enum sd_dtype t)
{
	return (unsigned)t < SD_DTYPE_COUNT && dtypes[t].is_float;
}

int sd_dtype_parse(const char *name, size_t n, enum sd_dtype *out)
{
	for (int i = 0; i < SD_DTYPE_COUNT; i++)
		if (strlen(dtypes[i].name) == n && memcmp(dtypes[i].name, name, n) == 0) {
			*out = (enum sd_dtype)i;
			return 0;
		}
	char shown[40];
	size_t k = n < 32 ? n : 32;
	for (size_t i = 0; i < k; i++)
		shown[i] = (name[i] >= 32 && name[i] < 127) ? name[i] : '?';
	strcpy(shown + k, n > 32 ? "..." : "");
	return sd_seterr("unknown dtype '%s' (expected f32, f16, bf16, i32, i64, u8 or f64)", shown);
}

float sd_f16_to_f32(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
	if (exp == 0x1f) {
		bits = sign | 0x7f800000u | (man << 13);
	} else if (exp == 0) {
		if (man == 0) {
			bits = sign;
		} else { /* subnormal: normalise */
			int e = -1;
			do { e++; man <<= 1; } while (!(man & 0x400));
			bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
		}
	} else {
		bits = sign | ((exp + 112) << 23) | (man << 13);
	}
	float f;
	memcpy(&f, &bits, 4);
	return f;
}

uint16_t sd_f32_to_f16(float f)
{
	uint32_t x;
	memcpy(&x, &f, 4);
	uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
	if (ax >= 0x7f800000u) /* inf or NaN (keep NaN quiet and non-zero) */
		return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 | ((ax >> 13) & 0x3ff) : 0));
	if (ax >= 0x477ff000u) /* rounds to >= 65520: overflow */
		return (uint16_t)(sign | 0x7c00);
	if (ax < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
		if (ax < 0x33000000u) return (uint16_t)sign; /* < 2^-25 rounds to 0 */
		uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
		int shift = 126 - (int)e; /* 14 + (113 - e) - 1 ... bits to drop from the 24-bit mantissa */
		uint32_t r = m >> (shift), rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
		if (rem > half || (rem == half && (r & 1))) r++;
		return (uint16_t)(sign | r);
	}
	uint32_t r = ((ax >> 13) - (112u << 10)), rem = ax & 0x1fff;
	if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
	return (uint16_t)(sign | r);
}

float sd_bf16_to_f32(uint16_t h)
{
	uint32_t bits = (uint32_t)h << 16;
	float f;
	memcpy(&f, &bits, 4);
	return f;
}

uint16_t sd_f32_to_bf16(float f)
{
	uint32_t x;
	memcpy(&x, &f, 4);
	if ((x & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((x >> 16) | 0x40);
	x += 0x7fff + ((x >> 16) & 1);
	return (uint16_t)(x >> 16);
}

/* ==== tensors ==== */

int sd_shape_numel(int ndim, const int64_t *shape, int64_t *numel)
{
	if (ndim < 0 || ndim > SD_MAX_DIMS)
		return sd_seterr("%d dimensions (at most %d)", ndim, SD_MAX_DIMS);
	int64_t n = 1;
	for (int i = 0; i < ndim; i++) {
		if (shape[i] < 0)
			return sd_seterr("negative dimension %lld", (long long)shape[i]);
		if (shape[i] != 0 && n > INT64_MAX / shape[i])
			return sd_seterr("shape product overflows");
		n *= shape[i];
	}
	/* every byte count must fit too: cap elements so that n * 8 cannot overflow */
	if (n > INT64_MAX / 8)
		return sd_seterr("shape product overflows");
	*numel = n;
	return 0;
}

char *sd_shape_str(int ndim, const int64_t *shape, char *buf, size_t n)
{
	size_t k = 0;
	if (!n) return buf;
	buf[0] = 0;
	k += (size_t)snprintf(buf + k, n - k, "[");
	for (int i = 0; i < ndim && k < n; i++)
		k += (size_t)snprintf(buf + k, n - k, i ? ",%lld" : "%lld", (long long)shape[i]);
	if (k < n) snprintf(buf + k, n - k, "]");
	return buf;
}

static sd_tensor *header(enum sd_dtype dtype, int ndim, const int64_t *shape, int64_t *numel)
{
	if ((unsigned)dtype >= SD_DTYPE_COUNT) {
		sd_seterr("bad dtype %d", (int)dtype);
		return NULL;
	}
	if (sd_shape_numel(ndim, shape, numel) < 0)
		return NULL;
	sd_tensor *t = calloc(1, sizeof *t);
	if (!t) {
		sd_seterr("out of memory");
		return NULL;
	}
	t->dtype = dtype;
	t->ndim = ndim;
	for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
	return t;
}

sd_tensor *sd_tensor_new_on(enum sd_device dev, enum sd_dtype dtype, int ndim, const int64_t *shape)
{
	int64_t n = 0;
	sd_tensor *t = header(dtype, ndim, shape, &n);
	if (!t) return NULL;
	const struct sd_backend *be = sd_backend_get(dev);
	if (!be) {
		free(t);
		return NULL;
	}
	size_t bytes = (size_t)n * sd_dtype_size(dtype);
	t->data = be->alloc(bytes ? bytes : 1);
	if (!t->data) {
		char s[160];
		sd_seterr("out of memory for a %s tensor %s (%zu bytes) on %s", sd_dtype_name(dtype),
		          sd_shape_str(ndim, shape, s, sizeof s), bytes, be->name);
		free(t);
		return NULL;
	}
	if (be->memset0(t->data, bytes) < 0) {
		be->free(t->data);
		free(t);
		return NULL;
	}
	t->device = dev;
	t->owns = 1;
	return t;
}

sd_tensor *sd_tensor_new(enum sd_dtype dtype, int ndim, const int64_t *shape)
{
	return sd_tensor_new_on(SD_DEVICE_CPU, dtype, ndim, shape);
}

sd_tensor *sd_tensor_newv(enum sd_dtype dtype, int ndim, ...)
{
	int64_t shape[SD_MAX_DIMS];
	va_list ap;
	if (ndim < 0 || ndim > SD_MAX_DIMS) {
		sd_seterr("%d dimensions (at most %d)", ndim, SD_MAX_DIMS);
		return NULL;
	}
	va_start(ap, ndim);
	for (int i = 0; i < ndim; i++) shape[i] = va_arg(ap, int64_t);
	va_end(ap);
	return sd_tensor_new(dtype, ndim, shape);
}

sd_tensor *sd_tensor_wrap(enum sd_dtype dtype, int ndim, const int64_t *shape, void *data)
{
	int64_t n = 0;
	sd_tensor *t = header(dtype, ndim, shape, &n);
	if (!t) return NULL;
	t->data = data;
	t->owns = 0;
	return t;
}

void sd_tensor_free(sd_tensor *t)
{
	if (!t) return;
	if (t->aux && t->aux_free) t->aux_free(t->aux);
	if (t->owns && t->data) {
		const struct sd_backend *be = sd_backend_get(t->device);
		if (be) be->free(t->data);
	}
	free(t);
}

int64_t sd_tensor_numel(const sd_tensor *t)
{
	int64_t n = 1;
	for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
	return n;
}

size_t sd_tensor_nbytes(const sd_tensor *t)
{
	return (size_t)sd_tensor_numel(t) * sd_dtype_size(t->dtype);
}

int sd_tensor_same_shape(const sd_tensor *a, const sd_tensor *b)
{
	if (a->ndim != b->ndim) return 0;
	for (int i = 0; i < a->ndim; i++)
		if (a->shape[i] != b->shape[i]) return 0;
	return 1;
}

static double get_elem(const void *p, enum sd_dtype t, int64_t i)
{
	switch (t) {
	case SD_DTYPE_F32: return ((const float *)p)[i];
	case SD_DTYPE_F16: return sd_f16_to_f32(((const uint16_t *)p)[i]);
	case SD_DTYPE_BF16: return sd_bf16_to_f32(((const uint16_t *)p)[i]);
	case SD_DTYPE_I32: return ((const int32_t *)p)[i];
	case SD_DTYPE_I64: return (double)((const int64_t *)p)[i];
	case SD_DTYPE_U8: return ((const uint8_t *)p)[i];
	case SD_DTYPE_F64: return ((const double *)p)[i];
	default: return 0;
	}
}

static void put_elem(void *p, enum sd_dtype t, int64_t i, double v)
{
	switch (t) {
	case SD_DTYPE_F32: ((float *)p)[i] = (float)v; break;
	case SD_DTYPE_F16: ((uint16_t *)p)[i] = sd_f32_to_f16((float)v); break;
	case SD_DTYPE_BF16: ((uint16_t *)p)[i] = sd_f32_to_bf16((float)v); break;
	case SD_DTYPE_I32: ((int32_t *)p)[i] = isfinite(v) && fabs(v) < 2147483648.0 ? (int32_t)v : 0; break;
	case SD_DTYPE_I64: ((int64_t *)p)[i] = isfinite(v) && fabs(v) < 9.2e18 ? (int64_t)v : 0; break;
	case SD_DTYPE_U8: ((uint8_t *)p)[i] = isfinite(v) && v >= 0 && v < 256 ? (uint8_t)v : 0; break;
	case SD_DTYPE_F64: ((double *)p)[i] = v; break;
	default: break;
	}
}

/* Converts element by element through double, with direct loops for the hot f16/bf16 → f32 paths
 * (model loading).  i64 values beyond 2^53 lose precision only when converted to a float type. */
sd_tensor *sd_tensor_convert(const sd_tensor *src, enum sd_dtype to)
{
	if (src->device != SD_DEVICE_CPU) {
		sd_seterr("sd_tensor_convert: tensor is on %s, not the CPU", sd_device_name(src->device));
		return NULL;
	}
	sd_tensor *t = sd_tensor_new(to, src->ndim, src->shape);
	if (!t) return NULL;
	int64_t n = sd_tensor_numel(src);
	if (src->dtype == to) {
		memcpy(t->data, src->data, sd_tensor_nbytes(src));
	} else if (to == SD_DTYPE_F32 && src->dtype == SD_DTYPE_F16) {
		const uint16_t *s = src->data;
		float *d = t->data;
		for (int64_t i = 0; i < n; i++) d[i] = sd_f16_to_f32(s[i]);
	} else if (to == SD_DTYPE_F32 && src->dtype == SD_DTYPE_BF16) {
		const uint16_t *s = src->data;
		float *d = t->data;
		for (int64_t i = 0; i < n; i++) d[i] = sd_bf16_to_f32(s[i]);
	} else if (src->dtype == SD_DTYPE_I64 && to == SD_DTYPE_I32) {
		const int64_t *s = src->data;
		int32_t *d = t->data;
		for (int64_t i = 0; i < n; i++) d[i] = (int32_t)s[i];
	} else {
		for (int64_t i = 0; i < n; i++) put_elem(t->data, to, i, get_elem(src->data, src->dtype, i));
	}
	return t;
}

sd_tensor *sd_tensor_to_device(const sd_tensor *src, enum sd_device dev)
{
	sd_tensor *t = sd_tensor_new_on(dev, src->dtype, src->ndim, src->shape);
	if (!t) return NULL;
	if (sd_tensor_copy(t, src) < 0) {
		sd_tensor_free(t);
		return NULL;
	}
	return t;
}

int sd_tensor_copy(sd_tensor *dst, const sd_tensor *src)
{
	if (dst->dtype != src->dtype || sd_tensor_numel(dst) != sd_tensor_numel(src))
		return sd_seterr("sd_tensor_copy: %s[%lld] into %s[%lld]", sd_dtype_name(src->dtype),
		                 (long long)sd_tensor_numel(src), sd_dtype_name(dst->dtype),
		                 (long long)sd_tensor_numel(dst));
	size_t n = sd_tensor_nbytes(src);
	if (!n) return 0;
	enum sd_device dev = dst->device != SD_DEVICE_CPU ? dst->device : src->device;
	const struct sd_backend *be = sd_backend_get(dev);
	if (!be) return -1;
	return be->copy(dst->data, dst->device != SD_DEVICE_CPU, src->data, src->device != SD_DEVICE_CPU, n);
}

/* ==== arena ==== */

struct block {
	struct block *next;
	char *base;
	size_t size, used;
};

struct sd_arena {
	enum sd_device dev;
	size_t block_size;
	struct block *head; /* current block first */
	size_t used, peak;  /* bytes handed out since the last reset */
	sd_arena *host;     /* for a device arena: host memory for tensor headers */
};

sd_arena *sd_arena_new(enum sd_device dev, size_t block)
{
	if (!sd_backend_get(dev)) return NULL;
	sd_arena *a = calloc(1, sizeof *a);
	if (!a) {
		sd_seterr("out of memory");
		return NULL;
	}
	a->dev = dev;
	a->block_size = block ? block : (size_t)64 << 20;
	return a;
}

void *sd_arena_alloc(sd_arena *a, size_t bytes)
{
	size_t need = (bytes + 63) & ~(size_t)63;
	if (need < bytes) {
		sd_seterr("arena: %zu bytes is too large", bytes);
		return NULL;
	}
	struct block *b = a->head;
	if (!b || b->size - b->used < need) {
		const struct sd_backend *be = sd_backend_get(a->dev);
		size_t size = need > a->block_size ? need : a->block_size;
		b = calloc(1, sizeof *b);
		if (!b || !(b->base = be->alloc(size))) {
			free(b);
			sd_seterr("arena: out of memory (%zu bytes on %s)", size, be->name);
			return NULL;
		}
		b->size = size;
		b->next = a->head;
		a->head = b;
	}
	void *p = b->base + b->used;
	b->used += need;
	a->used += need;
	if (a->used > a->peak) a->peak = a->used;
	return p;
}

sd_tensor *sd_arena_tensor(sd_arena *a, enum sd_dtype dtype, int ndim, const int64_t *shape)
{
	int64_t n = 0;
	if ((unsigned)dtype >= SD_DTYPE_COUNT || sd_shape_numel(ndim, shape, &n) < 0) {
		if ((unsigned)dtype >= SD_DTYPE_COUNT) sd_seterr("bad dtype %d", (int)dtype);
		return NULL;
	}
	/* headers are written by the host: on a device arena they live in a host-side companion arena */
	if (a->dev != SD_DEVICE_CPU && !a->host && !(a->host = sd_arena_new(SD_DEVICE_CPU, 64 << 10)))
		return NULL;
	sd_tensor *t = sd_arena_alloc(a->dev != SD_DEVICE_CPU ? a->host : a, sizeof *t);
	if (!t) return NULL;
	memset(t, 0, sizeof *t);
	t->data = sd_arena_alloc(a, (size_t)n * sd_dtype_size(dtype));
	if (!t->data) return NULL;
	t->dtype = dtype;
	t->ndim = ndim;
	for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
	t->device = a->dev;
	t->owns = 0;
	return t;
}

/* Keeps one block, the size of everything used in this step, so a steady-state step allocates once. */
void sd_arena_reset(sd_arena *a)
{
	const struct sd_backend *be = sd_backend_get(a->dev);
	size_t total = 0;
	for (struct block *b = a->head; b; b = b->next) total += b->size;
	if (a->head && a->head->next) {
		for (struct block *b = a->head, *n; b; b = n) {
			n = b->next;
			be->free(b->base);
			free(b);
		}
		a->head = NULL;
		if (total > a->block_size) a->block_size = total;
	}
	if (a->head) a->head->used = 0;
	a->used = 0;
	if (a->host) sd_arena_reset(a->host);
}

size_t sd_arena_used(const sd_arena *a)
{
	return a->used;
}

size_t sd_arena_peak(const sd_arena *a)
{
	return a->peak;
}

void sd_arena_free(sd_arena *a)
{
	if (!a) return;
	const struct sd_backend *be = sd_backend_get(a->dev);
	for (struct block *b = a->head, *n; b; b = n) {
		n = b->next;
		be->free(b->base);
		free(b);
	}
	sd_arena_free(a->host);
	free(a);
}

int sd_tensor_widen(sd_tensor *t)
{
	if (t->dtype == SD_DTYPE_F32) return 0;
	if (t->device != SD_DEVICE_CPU || (t->dtype != SD_DTYPE_F16 && t->dtype != SD_DTYPE_BF16))
		return sd_seterr("sd_tensor_widen: a %s tensor on %s", sd_dtype_name(t->dtype), sd_device_name(t->device));
	sd_tensor *w = sd_tensor_convert(t, SD_DTYPE_F32);
	if (!w) return -1;
	if (t->aux && t->aux_free) t->aux_free(t->aux);
	if (t->owns && t->data) sd_backend_get(t->device)->free(t->data);
	t->data = w->data, t->dtype = SD_DTYPE_F32, t->owns = 1, t->aux = NULL, t->aux_free = NULL;
	w->owns = 0;
	sd_tensor_free(w);
	return 0;
}
