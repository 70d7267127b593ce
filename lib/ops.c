/*
 * ops.c - the backend-neutral ops: check shapes, dtypes and devices once, then call a slot of the
 * tensors' backend table (lib/backend.h).  Also the backend registry, device selection and threads.
 */
#include <errno.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include "backend.h"

/* ==== threads ==== */

static int nthreads; /* 0 = not decided yet */

int sd_threads(void)
{
	if (nthreads > 0) return nthreads;
	const char *s = getenv("SD_THREADS");
	long n = 0;
	if (s && *s) {
		char *end;
		errno = 0;
		n = strtol(s, &end, 10);
		if (errno || *end || n < 1 || n > 1024) n = 0; /* ignored when malformed */
	}
	if (n == 0) n = sysconf(_SC_NPROCESSORS_ONLN);
	nthreads = n > 0 ? (int)n : 1;
	return nthreads;
}

extern void openblas_set_num_threads(int);

void sd_set_threads(int n)
{
	nthreads = n > 0 ? n : 1;
	openblas_set_num_threads(nthreads);
	omp_set_num_threads(nthreads);
}

static pthread_once_t threads_once = PTHREAD_ONCE_INIT;

static void apply_threads(void)
{
	int n = sd_threads();
	openblas_set_num_threads(n);
	omp_set_num_threads(n);
}

void sd_threads_apply(void)
{
	pthread_once(&threads_once, apply_threads);
}

/* ==== devices ==== */

const char *sd_device_name(enum sd_device dev)
{
	return dev == SD_DEVICE_CUDA ? "cuda" : "cpu";
}

const struct sd_backend *sd_backend_get(enum sd_device dev)
{
	if (dev == SD_DEVICE_CPU) return &sd_cpu_backend;
	if (dev == SD_DEVICE_CUDA) return sd_cuda_backend();
	sd_seterr("unknown device %d", (int)dev);
	return NULL;
}

int sd_cuda_available(void)
{
	return sd_cuda_backend() != NULL;
}

/* 1 when every slot of the table is filled (the table is a run of pointers after name and device). */
static int backend_complete(const struct sd_backend *be)
{
	const char *p = (const char *)&be->alloc, *end = (const char *)(be + 1);
	for (; p + sizeof(void (*)(void)) <= end; p += sizeof(void (*)(void))) {
		void (*f)(void);
		memcpy(&f, p, sizeof f);
		if (!f) return 0;
	}
	return 1;
}

int sd_device_parse(const char *s, enum sd_device *out)
{
	if (!s || !*s) s = getenv("SD_DEVICE");
	if (!s || !*s || !strcasecmp(s, "auto")) {
		/* CUDA only when its backend can run every op; until then auto means the CPU */
		*out = sd_cuda_available() && backend_complete(sd_cuda_backend()) ? SD_DEVICE_CUDA : SD_DEVICE_CPU;
		return 0;
	}
	if (!strcasecmp(s, "cpu")) {
		*out = SD_DEVICE_CPU;
		return 0;
	}
	if (!strcasecmp(s, "cuda")) {
		if (!sd_cuda_available())
			return sd_preerr("device cuda is not available");
		*out = SD_DEVICE_CUDA;
		return 0;
	}
	return sd_seterr("unknown device '%s' (expected cpu, cuda or auto)", s);
}

/* ==== op helpers ==== */

/* The backend shared by n tensors, or NULL with "<op>: …" when they are on different devices. */
static const struct sd_backend *common_backend(const char *op, int n, const sd_tensor *const *ts)
{
	for (int i = 1; i < n; i++)
		if (ts[i]->device != ts[0]->device) {
			sd_seterr("%s: tensors on different devices (%s and %s)", op, sd_device_name(ts[0]->device),
			          sd_device_name(ts[i]->device));
			return NULL;
		}
	const struct sd_backend *be = sd_backend_get(ts[0]->device);
	if (be && be->device == SD_DEVICE_CPU) sd_threads_apply();
	return be;
}

#define NOT_IMPLEMENTED(op, be) sd_seterr("%s: not implemented on %s", op, (be)->name)

static int need_f32(const char *op, const char *what, const sd_tensor *t)
{
	if (t->dtype != SD_DTYPE_F32)
		return sd_seterr("%s: %s is %s, expected f32", op, what, sd_dtype_name(t->dtype));
	return 0;
}

/* ==== matmul ==== */

int sd_matmul(sd_tensor *out, const sd_tensor *a, const sd_tensor *b, int ta, int tb, float alpha,
              float beta)
{
	static const char op[] = "sd_matmul";
	char sa[96], sb[96], so[96];
	if (need_f32(op, "a", a) || need_f32(op, "b", b) || need_f32(op, "out", out)) return -1;
	if (a->ndim < 2 || b->ndim < 2 || out->ndim != a->ndim)
		goto bad;
	int nd = a->ndim;
	int64_t M = ta ? a->shape[nd - 1] : a->shape[nd - 2], K = ta ? a->shape[nd - 2] : a->shape[nd - 1];
	int64_t Kb = tb ? b->shape[b->ndim - 1] : b->shape[b->ndim - 2];
	int64_t N = tb ? b->shape[b->ndim - 2] : b->shape[b->ndim - 1];
	if (K != Kb || out->shape[nd - 2] != M || out->shape[nd - 1] != N)
		goto bad;
	int64_t batch = 1;
	for (int i = 0; i < nd - 2; i++) {
		if (out->shape[i] != a->shape[i]) goto bad;
		batch *= a->shape[i];
	}
	int shared_b = b->ndim == 2;
	if (!shared_b) {
		if (b->ndim != nd) goto bad;
		for (int i = 0; i < nd - 2; i++)
			if (b->shape[i] != a->shape[i]) goto bad;
	}
	const sd_tensor *ts[3] = {out, a, b};
	const struct sd_backend *be = common_backend(op, 3, ts);
	if (!be) return -1;
	if (!be->gemm) return NOT_IMPLEMENTED(op, be);
	if (batch == 0 || M == 0 || N == 0) return 0;
	return be->gemm(ta, tb, M, N, K, alpha, a->data, ta ? M : K, M * K, b->data, tb ? K : N,
	                shared_b ? 0 : K * N, beta, out->data, N, M * N, batch);
bad:
	return sd_seterr("%s: shapes do not fit: a %s%s, b %s%s, out %s", op,
	                 sd_shape_str(a->ndim, a->shape, sa, sizeof sa), ta ? "ᵀ" : "",
	                 sd_shape_str(b->ndim, b->shape, sb, sizeof sb), tb ? "ᵀ" : "",
	                 sd_shape_str(out->ndim, out->shape, so, sizeof so));
}

/* ==== scratch for ops that need temporary memory (attention scores, widened weights) ==== */

enum { SCRATCH_ATTENTION, SCRATCH_WEIGHT0, SCRATCH_WEIGHT1, SCRATCH_SLOTS };

/* A growing per-thread buffer per slot on the backend's device, reused across calls. */
static float *scratch(const struct sd_backend *be, int slot, size_t bytes)
{
	static _Thread_local struct { void *p; size_t n; } bufs[2][SCRATCH_SLOTS];
	int d = be->device == SD_DEVICE_CUDA;
	if (bufs[d][slot].n < bytes) {
		if (bufs[d][slot].p) be->free(bufs[d][slot].p);
		bufs[d][slot].p = be->alloc(bytes ? bytes : 1);
		bufs[d][slot].n = bufs[d][slot].p ? bytes : 0;
		if (!bufs[d][slot].p) {
			sd_seterr("out of memory (%zu bytes of scratch on %s)", bytes, be->name);
			return NULL;
		}
	}
	return bufs[d][slot].p;
}

/* ==== checks shared by the ops ==== */

static int shape_err(const char *op, const char *what, const sd_tensor *t)
{
	char s[96];
	return sd_seterr("%s: %s has shape %s", op, what, sd_shape_str(t->ndim, t->shape, s, sizeof s));
}

/* `out` must have exactly the given shape. */
static int need_shape_of(const char *op, const char *what, const sd_tensor *out, int ndim, const int64_t *shape)
{
	char s1[96], s2[96];
	int ok = out->ndim == ndim;
	for (int i = 0; ok && i < ndim; i++) ok = out->shape[i] == shape[i];
	if (!ok)
		return sd_seterr("%s: %s has shape %s, expected %s", op, what, sd_shape_str(out->ndim, out->shape, s1, sizeof s1),
		                 sd_shape_str(ndim, shape, s2, sizeof s2));
	return 0;
}

static int need_shape(const char *op, const sd_tensor *out, int ndim, const int64_t *shape)
{
	return need_shape_of(op, "out", out, ndim, shape);
}

/* f32 and one backend for all non-NULL tensors of an op; returns the backend or NULL. */
static const struct sd_backend *prep(const char *op, int n, const sd_tensor *const *ts, const char *const *names)
{
	const sd_tensor *live[8];
	int k = 0;
	for (int i = 0; i < n; i++) {
		if (!ts[i]) continue;
		if (ts[i]->dtype != SD_DTYPE_F32) {
			sd_seterr("%s: %s is %s, expected f32", op, names[i], sd_dtype_name(ts[i]->dtype));
			return NULL;
		}
		live[k++] = ts[i];
	}
	return common_backend(op, k, live);
}

#define PREP(op, ...) prep(op, sizeof((const sd_tensor *[]){__VA_ARGS__}) / sizeof(const sd_tensor *), \
                           (const sd_tensor *[]){__VA_ARGS__}, names)
#define SLOT(be, op, slot) do { if (!(be)->slot) return NOT_IMPLEMENTED(op, be); } while (0)

/* ==== weights in their stored dtype (sd_weights_load_stored) ==== */

/* A weight operand may be f32, f16 or bf16, on the backend's device. */
static int need_weight(const char *op, const char *what, const sd_tensor *w, const struct sd_backend *be)
{
	if (w->dtype != SD_DTYPE_F32 && w->dtype != SD_DTYPE_F16 && w->dtype != SD_DTYPE_BF16)
		return sd_seterr("%s: %s is %s, expected f32, f16 or bf16", op, what, sd_dtype_name(w->dtype));
	if (w->device != be->device)
		return sd_seterr("%s: tensors on different devices (%s and %s)", op, sd_device_name(be->device),
		                 sd_device_name(w->device));
	if (w->dtype != SD_DTYPE_F32 && !be->to_f32)
		return sd_seterr("%s: a %s %s is not implemented on %s", op, sd_dtype_name(w->dtype), what, be->name);
	return 0;
}

/* w's values as f32: its own data when f32, else widened at use into scratch slot SCRATCH_WEIGHT0 +
 * which (two weights of one op can be live), valid until the next use of that slot.  NULL with a
 * message when out of memory. */
static const float *weight_f32(const struct sd_backend *be, const sd_tensor *w, int which)
{
	if (w->dtype == SD_DTYPE_F32) return w->data;
	float *buf = scratch(be, SCRATCH_WEIGHT0 + which, (size_t)sd_tensor_numel(w) * sizeof(float));
	if (!buf || be->to_f32(buf, w->data, w->dtype, sd_tensor_numel(w))) return NULL;
	return buf;
}

static int64_t inner(const sd_tensor *t, int from)
{
	int64_t n = 1;
	for (int i = from; i < t->ndim; i++) n *= t->shape[i];
	return n;
}

/* ==== ops ==== */

int sd_linear(sd_tensor *out, const sd_tensor *x, const sd_tensor *w, const sd_tensor *b)
{
	static const char op[] = "sd_linear";
	static const char *const names[] = {"out", "x", "b"};
	const struct sd_backend *be = PREP(op, out, x, b);
	if (!be || need_weight(op, "w", w, be)) return -1;
	if (w->ndim != 2) return shape_err(op, "w", w);
	if (x->ndim < 1 || x->shape[x->ndim - 1] != w->shape[1]) return shape_err(op, "x", x);
	if (b && (b->ndim != 1 || b->shape[0] != w->shape[0])) return shape_err(op, "b", b);
	int64_t shape[SD_MAX_DIMS];
	memcpy(shape, x->shape, sizeof shape);
	shape[x->ndim - 1] = w->shape[0];
	if (need_shape(op, out, x->ndim, shape)) return -1;
	SLOT(be, op, gemm);
	int64_t rows = inner(x, 0) / (w->shape[1] ? w->shape[1] : 1), O = w->shape[0], I = w->shape[1];
	if (x->shape[x->ndim - 1] == 0) rows = inner(out, 0) / (O ? O : 1);
	if (rows == 0 || O == 0) return 0;
	if (b) SLOT(be, op, add);
	/* out = x·wᵀ (beta 0: out's old contents, maybe NaN from an arena, are never read), then += bias */
	const float *wf = weight_f32(be, w, 0);
	if (!wf || be->gemm(0, 1, rows, O, I, 1.0f, x->data, I, 0, wf, I, 0, 0.0f, out->data, O, 0, 1)) return -1;
	return b ? be->add(out->data, out->data, b->data, 1.0f, 1.0f, rows * O, O, 1) : 0;
}

/* $SD_CONV_CACHE=0 turns off keeping packed convolution weights (which doubles their memory). */
static int conv_cache_on(void)
{
	static int on = -1;
	if (on < 0) {
		const char *s = getenv("SD_CONV_CACHE");
		on = !(s && !strcmp(s, "0"));
	}
	return on;
}

int sd_conv2d(sd_tensor *out, const sd_tensor *x, const sd_tensor *w, const sd_tensor *b, int stride, int pt,
              int pb, int pl, int pr)
{
	static const char op[] = "sd_conv2d";
	static const char *const names[] = {"out", "x", "b"};
	const struct sd_backend *be = PREP(op, out, x, b);
	if (!be || need_weight(op, "w", w, be)) return -1;
	if (x->ndim != 4) return shape_err(op, "x", x);
	if (w->ndim != 4 || w->shape[1] != x->shape[1]) return shape_err(op, "w", w);
	if (b && (b->ndim != 1 || b->shape[0] != w->shape[0])) return shape_err(op, "b", b);
	if (stride < 1 || pt < 0 || pb < 0 || pl < 0 || pr < 0)
		return sd_seterr("%s: bad stride %d or padding", op, stride);
	int64_t H = x->shape[2], W = x->shape[3], kh = w->shape[2], kw = w->shape[3];
	if (H + pt + pb < kh || W + pl + pr < kw) return shape_err(op, "x (smaller than the kernel)", x);
	int64_t Ho = (H + pt + pb - kh) / stride + 1, Wo = (W + pl + pr - kw) / stride + 1;
	int64_t shape[4] = {x->shape[0], w->shape[0], Ho, Wo};
	if (need_shape(op, out, 4, shape)) return -1;
	SLOT(be, op, conv2d);
	if (sd_tensor_numel(out) == 0) return 0;
	/* an f32 weight the model owns is packed once for the backend and the packing kept with it; an
	 * f16/bf16 one is widened and packed at use (keeping an f32 packing would double it and more) */
	const void *wp = NULL;
	void *own_wp = NULL;
	const int pack = stride == 1 && kh * kw > 1 && be->conv_pack;
	const float *wf = weight_f32(be, w, 0);
	if (!wf) return -1;
	if (pack && w->dtype == SD_DTYPE_F32 && w->owns && conv_cache_on()) {
		sd_tensor *wm = (sd_tensor *)w; /* the cache is derived data, not a change of w */
		if (!wm->aux && (wm->aux = be->conv_pack(w->data, w->shape[0], w->shape[1], (int)kh, (int)kw)))
			wm->aux_free = be->conv_pack_free;
		if (wm->aux_free == be->conv_pack_free) wp = wm->aux;
	} else if (pack && w->dtype != SD_DTYPE_F32 && conv_cache_on()) {
		wp = own_wp = be->conv_pack(wf, w->shape[0], w->shape[1], (int)kh, (int)kw);
	}
	int rc = be->conv2d(out->data, x->data, wf, wp, b ? b->data : NULL, x->shape[0], x->shape[1], H, W, w->shape[0],
	                    (int)kh, (int)kw, stride, pt, pl, Ho, Wo);
	if (own_wp) be->conv_pack_free(own_wp);
	return rc;
}

/* gamma/beta of a norm: NULL or a vector of n */
static int need_vec(const char *op, const char *what, const sd_tensor *t, int64_t n)
{
	if (t && (t->ndim != 1 || t->shape[0] != n)) return shape_err(op, what, t);
	return 0;
}

int sd_group_norm(sd_tensor *out, const sd_tensor *x, int groups, const sd_tensor *gamma, const sd_tensor *beta,
                  float eps, int silu)
{
	static const char op[] = "sd_group_norm";
	static const char *const names[] = {"out", "x", "gamma", "beta"};
	const struct sd_backend *be = PREP(op, out, x, gamma, beta);
	if (!be) return -1;
	if (x->ndim < 2) return shape_err(op, "x", x);
	int64_t C = x->shape[1];
	if (groups < 1 || C % groups) return sd_seterr("%s: %lld channels do not split into %d groups", op, (long long)C, groups);
	if (need_vec(op, "gamma", gamma, C) || need_vec(op, "beta", beta, C) || need_shape(op, out, x->ndim, x->shape))
		return -1;
	SLOT(be, op, group_norm);
	if (sd_tensor_numel(x) == 0) return 0;
	return be->group_norm(out->data, x->data, gamma ? gamma->data : NULL, beta ? beta->data : NULL, x->shape[0], C,
	                      inner(x, 2), groups, eps, silu);
}

int sd_layer_norm(sd_tensor *out, const sd_tensor *x, const sd_tensor *gamma, const sd_tensor *beta, float eps)
{
	static const char op[] = "sd_layer_norm";
	static const char *const names[] = {"out", "x", "gamma", "beta"};
	const struct sd_backend *be = PREP(op, out, x, gamma, beta);
	if (!be) return -1;
	if (x->ndim < 1) return shape_err(op, "x", x);
	int64_t D = x->shape[x->ndim - 1];
	if (need_vec(op, "gamma", gamma, D) || need_vec(op, "beta", beta, D) || need_shape(op, out, x->ndim, x->shape))
		return -1;
	SLOT(be, op, layer_norm);
	if (sd_tensor_numel(x) == 0) return 0;
	return be->layer_norm(out->data, x->data, gamma ? gamma->data : NULL, beta ? beta->data : NULL,
	                      inner(x, 0) / D, D, eps);
}

int sd_act(sd_tensor *out, const sd_tensor *x, enum sd_act act)
{
	static const char op[] = "sd_act";
	static const char *const names[] = {"out", "x"};
	const struct sd_backend *be = PREP(op, out, x);
	if (!be) return -1;
	if ((unsigned)act >= SD_ACT_COUNT) return sd_seterr("%s: unknown activation %d", op, (int)act);
	if (need_shape(op, out, x->ndim, x->shape)) return -1;
	SLOT(be, op, act);
	return be->act(out->data, x->data, sd_tensor_numel(x), act);
}

int sd_geglu(sd_tensor *out, const sd_tensor *x)
{
	static const char op[] = "sd_geglu";
	static const char *const names[] = {"out", "x"};
	const struct sd_backend *be = PREP(op, out, x);
	if (!be) return -1;
	if (x->ndim < 1 || x->shape[x->ndim - 1] % 2) return shape_err(op, "x (last dimension must be even)", x);
	int64_t shape[SD_MAX_DIMS];
	memcpy(shape, x->shape, sizeof shape);
	int64_t F = shape[x->ndim - 1] /= 2;
	if (need_shape(op, out, x->ndim, shape)) return -1;
	SLOT(be, op, geglu);
	if (F == 0) return 0;
	return be->geglu(out->data, x->data, inner(out, 0) / F, F);
}

static int add_op(const char *op, sd_tensor *out, const sd_tensor *a, const sd_tensor *b, float alpha, float beta)
{
	static const char *const names[] = {"out", "a"};
	const struct sd_backend *be = PREP(op, out, a);
	if (!be || (b && need_weight(op, "b", b, be))) return -1; /* b may be a stored weight (f16, bf16) */
	if (need_shape(op, out, a->ndim, a->shape)) return -1;
	int64_t n = sd_tensor_numel(a), m = b ? sd_tensor_numel(b) : 1, S = 1;
	if (b && !sd_tensor_same_shape(a, b)) {
		int trailing = b->ndim <= a->ndim;
		for (int i = 0; trailing && i < b->ndim; i++)
			trailing = b->shape[b->ndim - 1 - i] == a->shape[a->ndim - 1 - i];
		if (!trailing) {
			if (b->ndim == 2 && a->ndim >= 3 && b->shape[0] == a->shape[0] && b->shape[1] == a->shape[1])
				S = inner(a, 2);
			else
				return shape_err(op, "b (not broadcastable onto a)", b);
		}
	}
	SLOT(be, op, add);
	if (n == 0) return 0;
	const float *bf = b ? weight_f32(be, b, 1) : NULL;
	if (b && !bf) return -1;
	return be->add(out->data, a->data, bf, alpha, beta, n, m, S);
}

int sd_add(sd_tensor *out, const sd_tensor *a, const sd_tensor *b, float alpha, float beta)
{
	return add_op("sd_add", out, a, b, alpha, beta);
}

int sd_scale(sd_tensor *out, const sd_tensor *x, float s)
{
	return add_op("sd_scale", out, x, NULL, s, 0.0f);
}

int sd_mul(sd_tensor *out, const sd_tensor *a, const sd_tensor *b)
{
	static const char op[] = "sd_mul";
	static const char *const names[] = {"out", "a", "b"};
	const struct sd_backend *be = PREP(op, out, a, b);
	if (!be) return -1;
	if (!sd_tensor_same_shape(a, b)) return shape_err(op, "b (must match a)", b);
	if (need_shape(op, out, a->ndim, a->shape)) return -1;
	SLOT(be, op, mul);
	return be->mul(out->data, a->data, b->data, sd_tensor_numel(a));
}

int sd_softmax(sd_tensor *out, const sd_tensor *x)
{
	static const char op[] = "sd_softmax";
	static const char *const names[] = {"out", "x"};
	const struct sd_backend *be = PREP(op, out, x);
	if (!be) return -1;
	if (x->ndim < 1) return shape_err(op, "x", x);
	if (need_shape(op, out, x->ndim, x->shape)) return -1;
	SLOT(be, op, softmax);
	int64_t D = x->shape[x->ndim - 1];
	if (sd_tensor_numel(x) == 0) return 0;
	if (out != x && be->copy(out->data, be->device != SD_DEVICE_CPU, x->data, be->device != SD_DEVICE_CPU,
	                         sd_tensor_nbytes(x)))
		return -1;
	return be->softmax(out->data, inner(x, 0) / D, D, D, 1.0f, -1);
}

/* Rows of queries handled per block: bounds the score scratch to block × Lk × heads floats. */
#define ATTN_SCRATCH_FLOATS ((int64_t)8 << 20)

int sd_attention(sd_tensor *out, const sd_tensor *q, const sd_tensor *k, const sd_tensor *v, int heads, float scale,
                 int causal, sd_tensor *probs)
{
	static const char op[] = "sd_attention";
	static const char *const names[] = {"out", "q", "k", "v", "probs"};
	const struct sd_backend *be = PREP(op, out, q, k, v, probs);
	if (!be) return -1;
	if (q->ndim != 3) return shape_err(op, "q", q);
	int64_t N = q->shape[0], Lq = q->shape[1], Lk = k->shape[1];
	if (heads < 1 || q->shape[2] % heads) return sd_seterr("%s: %lld features do not split into %d heads", op,
	                                                       (long long)q->shape[2], heads);
	int64_t d = q->shape[2] / heads;
	if (k->ndim != 3 || k->shape[0] != N || k->shape[2] != q->shape[2]) return shape_err(op, "k", k);
	if (v->ndim != 3 || v->shape[0] != N || v->shape[1] != Lk || v->shape[2] % heads) return shape_err(op, "v", v);
	int64_t dv = v->shape[2] / heads, H = heads;
	int64_t oshape[3] = {N, Lq, H * dv}, pshape[4] = {N, H, Lq, Lk};
	if (need_shape(op, out, 3, oshape)) return -1;
	if (probs && need_shape_of(op, "probs", probs, 4, pshape)) return -1;
	SLOT(be, op, gemm);
	SLOT(be, op, softmax);
	if (N == 0 || Lq == 0 || H * dv == 0) return 0;
	if (Lk == 0) return be->memset0(out->data, sd_tensor_nbytes(out));
	/* The backend's fused kernel when it has one, no probabilities are kept and the score matrix is
	 * large (Lq·Lk ≥ 2^15): 2× faster than the GEMM path at the UNet's 64×64 and 32×32 levels, level
	 * with it on the VAE's d = 512 and near 2^15, slower below (the 8×8 level, CLIP: GEMM tiles fit
	 * there, the fused kernel's query blocks do not), where the GEMM path also keeps CLIP's output
	 * the same bits with and without probs.  $SD_ATTENTION=gemm forces the GEMM path and any other
	 * non-empty value the fused kernel (tests/unit/test_attention.c, tests/bench/attention.c). */
	const char *how = getenv("SD_ATTENTION");
	int fused = how && *how ? strcmp(how, "gemm") != 0 : Lq * Lk >= ((int64_t)1 << 15);
	if (!probs && be->attention && fused)
		return be->attention(out->data, q->data, k->data, v->data, N, Lq, Lk, H, d, dv, scale, causal);
	int64_t blk = probs ? Lq : ATTN_SCRATCH_FLOATS / (H * Lk);
	if (blk < 1) blk = 1;
	if (blk > Lq) blk = Lq;
	float *S = probs ? NULL : scratch(be, SCRATCH_ATTENTION, (size_t)(H * blk * Lk) * sizeof(float));
	if (!probs && !S) return -1;
	const float *Q = q->data, *K = k->data, *V = v->data;
	float *O = out->data;
	for (int64_t n = 0; n < N; n++)
		for (int64_t r0 = 0; r0 < Lq; r0 += blk) {
			int64_t rows = Lq - r0 < blk ? Lq - r0 : blk;
			float *Sb = probs ? (float *)probs->data + n * H * Lq * Lk : S;
			/* scores for every head: (H batches) rows × Lk = Q_h[r0:] · K_hᵀ; heads sit d apart in a row */
			if (be->gemm(0, 1, rows, Lk, d, 1.0f, Q + (n * Lq + r0) * H * d, H * d, d, K + n * Lk * H * d, H * d, d,
			             0.0f, Sb, Lk, rows * Lk, H))
				return -1;
			for (int64_t h = 0; h < H; h++)
				if (be->softmax(Sb + h * rows * Lk, rows, Lk, Lk, scale, causal ? r0 : -1)) return -1;
			if (be->gemm(0, 0, rows, dv, Lk, 1.0f, Sb, Lk, rows * Lk, V + n * Lk * H * dv, H * dv, dv, 0.0f,
			             O + (n * Lq + r0) * H * dv, H * dv, dv, H))
				return -1;
		}
	return 0;
}

int sd_nchw_to_nlc(sd_tensor *out, const sd_tensor *x)
{
	static const char op[] = "sd_nchw_to_nlc";
	static const char *const names[] = {"out", "x"};
	const struct sd_backend *be = PREP(op, out, x);
	if (!be) return -1;
	if (x->ndim != 4) return shape_err(op, "x", x);
	int64_t shape[3] = {x->shape[0], x->shape[2] * x->shape[3], x->shape[1]};
	if (need_shape(op, out, 3, shape)) return -1;
	SLOT(be, op, transpose);
	if (sd_tensor_numel(x) == 0) return 0;
	return be->transpose(out->data, x->data, shape[0], shape[2], shape[1]);
}

int sd_nlc_to_nchw(sd_tensor *out, const sd_tensor *x)
{
	static const char op[] = "sd_nlc_to_nchw";
	static const char *const names[] = {"out", "x"};
	const struct sd_backend *be = PREP(op, out, x);
	if (!be) return -1;
	if (x->ndim != 3 || out->ndim != 4 || out->shape[0] != x->shape[0] || out->shape[1] != x->shape[2] ||
	    out->shape[2] * out->shape[3] != x->shape[1])
		return shape_err(op, "out (must be (N, C, H, W) with H·W = L)", out);
	SLOT(be, op, transpose);
	if (sd_tensor_numel(x) == 0) return 0;
	return be->transpose(out->data, x->data, x->shape[0], x->shape[1], x->shape[2]);
}

int sd_upsample2x(sd_tensor *out, const sd_tensor *x)
{
	static const char op[] = "sd_upsample2x";
	static const char *const names[] = {"out", "x"};
	const struct sd_backend *be = PREP(op, out, x);
	if (!be) return -1;
	if (x->ndim != 4) return shape_err(op, "x", x);
	int64_t shape[4] = {x->shape[0], x->shape[1], 2 * x->shape[2], 2 * x->shape[3]};
	if (need_shape(op, out, 4, shape)) return -1;
	SLOT(be, op, upsample2x);
	if (sd_tensor_numel(x) == 0) return 0;
	return be->upsample2x(out->data, x->data, x->shape[0] * x->shape[1], x->shape[2], x->shape[3]);
}

int sd_concat1(sd_tensor *out, const sd_tensor *a, const sd_tensor *b)
{
	static const char op[] = "sd_concat1";
	static const char *const names[] = {"out", "a", "b"};
	const struct sd_backend *be = PREP(op, out, a, b);
	if (!be) return -1;
	int ok = a->ndim >= 2 && b->ndim == a->ndim && a->shape[0] == b->shape[0];
	for (int i = 2; ok && i < a->ndim; i++) ok = a->shape[i] == b->shape[i];
	if (!ok) return shape_err(op, "b (must match a but in dim 1)", b);
	int64_t shape[SD_MAX_DIMS];
	memcpy(shape, a->shape, sizeof shape);
	shape[1] += b->shape[1];
	if (need_shape(op, out, a->ndim, shape)) return -1;
	int dev = be->device != SD_DEVICE_CPU;
	size_t sa = (size_t)inner(a, 1) * sizeof(float), sb = (size_t)inner(b, 1) * sizeof(float);
	for (int64_t n = 0; n < a->shape[0]; n++) {
		char *o = (char *)out->data + n * (sa + sb);
		if ((sa && be->copy(o, dev, (const char *)a->data + n * sa, dev, sa)) ||
		    (sb && be->copy(o + sa, dev, (const char *)b->data + n * sb, dev, sb)))
			return -1;
	}
	return 0;
}

int sd_embedding(sd_tensor *out, const sd_tensor *ids, const sd_tensor *table)
{
	static const char op[] = "sd_embedding";
	static const char *const names[] = {"out"};
	const struct sd_backend *be = PREP(op, out);
	if (!be || need_weight(op, "table", table, be)) return -1;
	if (ids->dtype != SD_DTYPE_I32) return sd_seterr("%s: ids are %s, expected i32", op, sd_dtype_name(ids->dtype));
	if (ids->device != table->device) return sd_seterr("%s: ids and table on different devices", op);
	if (table->ndim != 2) return shape_err(op, "table", table);
	int64_t shape[SD_MAX_DIMS];
	if (ids->ndim >= SD_MAX_DIMS) return shape_err(op, "ids", ids);
	memcpy(shape, ids->shape, sizeof(int64_t) * ids->ndim);
	shape[ids->ndim] = table->shape[1];
	if (need_shape(op, out, ids->ndim + 1, shape)) return -1;
	SLOT(be, op, embedding);
	if (table->dtype != SD_DTYPE_F32 && be->device == SD_DEVICE_CPU) {
		/* the rows asked for, widened one by one (not the whole table at each call) */
		const int32_t *id = ids->data;
		const int64_t n = sd_tensor_numel(ids), V = table->shape[0], D = table->shape[1];
		for (int64_t i = 0; i < n; i++) {
			if (id[i] < 0 || id[i] >= V)
				return sd_seterr("%s: id %d at position %lld is outside [0, %lld)", op, id[i], (long long)i, (long long)V);
			if (be->to_f32((float *)out->data + i * D, (const uint16_t *)table->data + id[i] * D, table->dtype, D))
				return -1;
		}
		return 0;
	}
	const float *tf = weight_f32(be, table, 0);
	if (!tf) return -1;
	return be->embedding(out->data, ids->data, tf, sd_tensor_numel(ids), table->shape[0], table->shape[1]);
}
