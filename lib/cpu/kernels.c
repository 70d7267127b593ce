/*
 * cpu/kernels.c - the CPU backend's op slots (C + OpenMP + OpenBLAS), the reference every other backend
 * is checked against.  Numerics follow torch on CPU: statistics of a norm accumulate in double-free
 * float with two passes (mean, then centred variance), GELU is the erf form, softmax subtracts the row
 * maximum.  Stride-1 convolutions are a sum of shifted sgemms over a padded copy (no im2col; 3× faster
 * than im2col at 512² here), strided ones im2col (in column tiles of bounded size) + sgemm, and 1×1
 * stride-1 convolutions a plain sgemm ($SD_CONV_IM2COL forces im2col, for comparison).  Loops run under OpenMP; sgemm is called from the serial part so that OpenBLAS
 * uses its own threads.
 */
#include <cblas.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "../backend.h"
#include "cpu.h"
#include "simd.h"

/* Run a loop in parallel only when it has enough work: a parallel region costs microseconds when the
 * cores are idle and a scheduler time slice when they are busy, which made small models (the test
 * fixtures) several times slower with 2 threads than with 1. */
#define PAR(work) ((work) >= ((int64_t)1 << 15))

/* ==== convolution ==== */

/* Bytes of im2col scratch per tile: large enough for sgemm to run at full speed, small enough that a
 * 512×512 VAE layer (C·9 × 262144 floats, 1.2 GB at once) stays bounded. */
#define COL_TILE_BYTES ((size_t)32 << 20)

/* col (C·kh·kw, ncols) for output pixels [p0, p0+ncols) of one image x (C, H, W) */
static void im2col(float *col, const float *x, int64_t C, int64_t H, int64_t W, int kh, int kw,
                   int stride, int pt, int pl, int64_t Wo, int64_t p0, int64_t ncols)
{
	#pragma omp parallel for collapse(2) schedule(static) if(PAR(C * kh * kw * ncols))
	for (int64_t c = 0; c < C; c++)
		for (int k = 0; k < kh * kw; k++) {
			int ky = k / kw, kx = k % kw;
			float *dst = col + ((c * kh * kw) + k) * ncols;
			const float *src = x + c * H * W;
			for (int64_t p = 0; p < ncols; p++) {
				int64_t oy = (p0 + p) / Wo, ox = (p0 + p) % Wo;
				int64_t iy = oy * stride - pt + ky, ix = ox * stride - pl + kx;
				dst[p] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? src[iy * W + ix] : 0.0f;
			}
		}
}

/* (O, C, kh, kw) → (taps, O, C): the per-tap matrices conv_shifted multiplies by. */
static void pack_taps(float *wt, const float *w, int64_t O, int64_t C, int64_t taps)
{
	#pragma omp parallel for schedule(static) if(PAR(O * C * taps))
	for (int64_t o = 0; o < O; o++)
		for (int64_t c = 0; c < C; c++)
			for (int64_t t = 0; t < taps; t++) wt[(t * O + o) * C + c] = w[(o * C + c) * taps + t];
}

static void *cpu_conv_pack(const float *w, int64_t O, int64_t C, int kh, int kw)
{
	float *wt = sd_cpu_alloc((size_t)(O * C * kh * kw) * sizeof(float));
	if (wt) pack_taps(wt, w, O, C, (int64_t)kh * kw);
	return wt;
}

/*
 * Stride-1 convolution without im2col: with x zero-padded to (C, Hp, Wp) per image and the images laid
 * side by side (channel-major: row c of the padded matrix holds every image's channel c, S floats
 * each), the output computed on the padded width, out_wide (O, N·S), is Σ over the kh·kw taps of
 * W_tap (O, C) · x_pad shifted by ky·Wp + kx: one sgemm per tap for the whole batch.  The columns past
 * Wo in each row, and past Ho rows in each image, are junk and dropped when copying out.  Memory: one
 * padded copy of x and one wide output instead of a kh·kw-times larger column matrix.  wt is the
 * weight packed as (taps, O, C) (cached with the weight), or NULL to pack it here.
 */
static int conv_shifted(float *out, const float *x, const float *w, const float *wt, const float *b, int64_t N,
                        int64_t C, int64_t H, int64_t W, int64_t O, int kh, int kw, int pt, int pl, int64_t Ho,
                        int64_t Wo)
{
	int64_t Hp = Ho + kh - 1, Wp = Wo + kw - 1, S = Hp * Wp + kw, taps = (int64_t)kh * kw;
	int64_t cols = (N - 1) * S + Ho * Wp; /* the last image needs only its Ho output rows */
	float *xp = sd_cpu_scratch(0, (size_t)(C * N * S) * sizeof(float));
	float *ow = xp ? sd_cpu_scratch(3, (size_t)(O * N * S) * sizeof(float)) : NULL;
	if (!ow) return -1;
	if (!wt) {
		float *t = sd_cpu_scratch(2, (size_t)(taps * O * C) * sizeof(float));
		if (!t) return -1;
		pack_taps(t, w, O, C, taps);
		wt = t;
	}
	#pragma omp parallel for collapse(2) schedule(static) if(PAR(C * N * S))
	for (int64_t c = 0; c < C; c++)
		for (int64_t n = 0; n < N; n++) {
			float *d = xp + (c * N + n) * S;
			const float *src = x + (n * C + c) * H * W;
			memset(d, 0, (size_t)S * sizeof(float));
			for (int64_t y = 0; y < H; y++) {
				int64_t py = y + pt;
				if (py < 0 || py >= Hp) continue;
				for (int64_t i = 0; i < W; i++) {
					int64_t px = i + pl;
					if (px >= 0 && px < Wp) d[py * Wp + px] = src[y * W + i];
				}
			}
		}
	for (int64_t t = 0; t < taps; t++) {
		int64_t ky = t / kw, kx = t % kw;
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)O, (int)cols, (int)C, 1.0f, wt + t * O * C,
		            (int)C, xp + ky * Wp + kx, (int)(N * S), t ? 1.0f : 0.0f, ow, (int)(N * S));
	}
	#pragma omp parallel for collapse(3) schedule(static) if(PAR(N * O * Ho * Wo))
	for (int64_t n = 0; n < N; n++)
		for (int64_t o = 0; o < O; o++)
			for (int64_t y = 0; y < Ho; y++) {
				float bo = b ? b[o] : 0.0f;
				const float *src = ow + o * N * S + n * S + y * Wp;
				float *d = out + ((n * O + o) * Ho + y) * Wo;
				for (int64_t i = 0; i < Wo; i++) d[i] = src[i] + bo;
			}
	return 0;
}

static int cpu_conv2d(float *out, const float *x, const float *w, const void *wp, const float *b, int64_t N,
                      int64_t C, int64_t H, int64_t W, int64_t O, int kh, int kw, int stride, int pt, int pl,
                      int64_t Ho, int64_t Wo)
{
	int64_t K = C * kh * kw, P = Ho * Wo;
	if (stride == 1 && kh * kw > 1 && getenv("SD_CONV_IM2COL") == NULL)
		return conv_shifted(out, x, w, wp, b, N, C, H, W, O, kh, kw, pt, pl, Ho, Wo);
	int direct = kh == 1 && kw == 1 && stride == 1 && pt == 0 && pl == 0 && Ho == H && Wo == W;
	int64_t tile = (int64_t)(COL_TILE_BYTES / sizeof(float)) / (K ? K : 1);
	if (tile < 64) tile = 64;
	if (tile > P) tile = P;
	float *col = NULL;
	if (!direct && P > 0 && !(col = sd_cpu_scratch(0, (size_t)K * tile * sizeof(float))))
		return -1;
	for (int64_t n = 0; n < N; n++) {
		const float *xn = x + n * C * H * W;
		float *on = out + n * O * P;
		if (b) {
			#pragma omp parallel for schedule(static) if(PAR(O * P))
			for (int64_t o = 0; o < O; o++)
				for (int64_t p = 0; p < P; p++) on[o * P + p] = b[o];
		}
		if (direct) {
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)O, (int)P, (int)K, 1.0f, w, (int)K,
			            xn, (int)P, b ? 1.0f : 0.0f, on, (int)P);
			continue;
		}
		for (int64_t p0 = 0; p0 < P; p0 += tile) {
			int64_t nc = P - p0 < tile ? P - p0 : tile;
			im2col(col, xn, C, H, W, kh, kw, stride, pt, pl, Wo, p0, nc);
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)O, (int)nc, (int)K, 1.0f, w, (int)K,
			            col, (int)nc, b ? 1.0f : 0.0f, on + p0, (int)P);
		}
	}
	return 0;
}

/* ==== normalisation ==== */

static inline float silu(float v)
{
	return v / (1.0f + expf(-v));
}

static int cpu_group_norm(float *out, const float *x, const float *gamma, const float *beta, int64_t N,
                          int64_t C, int64_t S, int groups, float eps, int act)
{
	int64_t cg = C / groups;
	#pragma omp parallel for collapse(2) schedule(static) if(PAR(N * C * S))
	for (int64_t n = 0; n < N; n++)
		for (int g = 0; g < groups; g++) {
			const float *xs = x + (n * C + g * cg) * S;
			float *os = out + (n * C + g * cg) * S;
			int64_t cnt = cg * S;
			double sum = 0;
			for (int64_t i = 0; i < cnt; i++) sum += xs[i];
			double mean = sum / (double)cnt, var = 0;
			for (int64_t i = 0; i < cnt; i++) {
				double d = xs[i] - mean;
				var += d * d;
			}
			var /= (double)cnt;
			float rstd = (float)(1.0 / sqrt(var + eps)), m = (float)mean;
			for (int64_t c = 0; c < cg; c++) {
				int64_t ch = g * cg + c;
				float ga = gamma ? gamma[ch] : 1.0f, be = beta ? beta[ch] : 0.0f;
				float a = rstd * ga, bb = be - m * a;
				const float *xc = xs + c * S;
				float *oc = os + c * S;
				if (act)
					for (int64_t i = 0; i < S; i++) oc[i] = silu(xc[i] * a + bb);
				else
					for (int64_t i = 0; i < S; i++) oc[i] = xc[i] * a + bb;
			}
		}
	return 0;
}

static int cpu_layer_norm(float *out, const float *x, const float *gamma, const float *beta, int64_t rows,
                          int64_t D, float eps)
{
	#pragma omp parallel for schedule(static) if(PAR(rows * D))
	for (int64_t r = 0; r < rows; r++) {
		const float *xr = x + r * D;
		float *o = out + r * D;
		double sum = 0, var = 0;
		for (int64_t i = 0; i < D; i++) sum += xr[i];
		double mean = sum / (double)D;
		for (int64_t i = 0; i < D; i++) {
			double d = xr[i] - mean;
			var += d * d;
		}
		float rstd = (float)(1.0 / sqrt(var / (double)D + eps)), m = (float)mean;
		for (int64_t i = 0; i < D; i++)
			o[i] = (xr[i] - m) * rstd * (gamma ? gamma[i] : 1.0f) + (beta ? beta[i] : 0.0f);
	}
	return 0;
}

/* ==== elementwise ==== */

static inline float gelu_erf(float v)
{
	return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

static int cpu_act(float *out, const float *x, int64_t n, enum sd_act act)
{
	switch (act) {
	case SD_ACT_SILU:
		#pragma omp parallel for simd schedule(static) if(PAR(n))
		for (int64_t i = 0; i < n; i++) out[i] = silu(x[i]);
		break;
	case SD_ACT_GELU:
		#pragma omp parallel for schedule(static) if(PAR(n))
		for (int64_t i = 0; i < n; i++) out[i] = gelu_erf(x[i]);
		break;
	case SD_ACT_GELU_TANH:
		#pragma omp parallel for schedule(static) if(PAR(n))
		for (int64_t i = 0; i < n; i++) {
			float v = x[i];
			out[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
		}
		break;
	case SD_ACT_QUICK_GELU:
		#pragma omp parallel for simd schedule(static) if(PAR(n))
		for (int64_t i = 0; i < n; i++) out[i] = x[i] / (1.0f + expf(-1.702f * x[i]));
		break;
	default:
		return sd_seterr("unknown activation %d", (int)act);
	}
	return 0;
}

static int cpu_geglu(float *out, const float *x, int64_t rows, int64_t F)
{
	#pragma omp parallel for schedule(static) if(PAR(rows * F))
	for (int64_t r = 0; r < rows; r++) {
		const float *a = x + r * 2 * F, *g = a + F;
		float *o = out + r * F;
		for (int64_t i = 0; i < F; i++) o[i] = a[i] * gelu_erf(g[i]);
	}
	return 0;
}

static int cpu_add(float *out, const float *a, const float *b, float alpha, float beta, int64_t n, int64_t m,
                   int64_t S)
{
	if (!b) {
		#pragma omp parallel for simd schedule(static) if(PAR(n))
		for (int64_t i = 0; i < n; i++) out[i] = alpha * a[i];
	} else if (m == n && S == 1) {
		if (alpha == 1.0f && beta == 1.0f) {
			#pragma omp parallel for simd schedule(static) if(PAR(n))
			for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
		} else {
			#pragma omp parallel for simd schedule(static) if(PAR(n))
			for (int64_t i = 0; i < n; i++) out[i] = alpha * a[i] + beta * b[i];
		}
	} else if (S == 1 && n % m == 0) {
		/* b repeats along rows (a bias over the last dimension) */
		#pragma omp parallel for schedule(static) if(PAR(n))
		for (int64_t r = 0; r < n / m; r++)
			for (int64_t j = 0; j < m; j++) out[r * m + j] = alpha * a[r * m + j] + beta * b[j];
	} else {
		int64_t blocks = n / S;
		#pragma omp parallel for schedule(static) if(PAR(n))
		for (int64_t k = 0; k < blocks; k++) {
			float bv = beta * b[k % m];
			for (int64_t i = k * S; i < (k + 1) * S; i++) out[i] = alpha * a[i] + bv;
		}
	}
	return 0;
}

static int cpu_mul(float *out, const float *a, const float *b, int64_t n)
{
	#pragma omp parallel for simd schedule(static) if(PAR(n))
	for (int64_t i = 0; i < n; i++) out[i] = a[i] * b[i];
	return 0;
}

/* One row: x ← softmax(x·scale) over n entries, vectorised (the attention's hottest non-GEMM loop:
 * 1.3 G exps per 512² UNet step). */
static void softmax_row(float *x, int64_t n, float scale)
{
	__m256 vs = _mm256_set1_ps(scale), vm = _mm256_set1_ps(-INFINITY);
	int64_t j = 0;
	for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + j));
	float mx = hmax8(vm);
	for (; j < n; j++) mx = x[j] > mx ? x[j] : mx;
	/* max of x·scale = scale·max x for scale > 0; compute it directly otherwise */
	if (!(scale > 0)) {
		mx = -INFINITY;
		for (int64_t k = 0; k < n; k++) mx = x[k] * scale > mx ? x[k] * scale : mx;
	} else {
		mx *= scale;
	}
	__m256 vmx = _mm256_set1_ps(mx), vsum = _mm256_setzero_ps();
	for (j = 0; j + 8 <= n; j += 8) {
		__m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + j), vs, vmx));
		_mm256_storeu_ps(x + j, e);
		vsum = _mm256_add_ps(vsum, e);
	}
	float sum = hsum8(vsum);
	for (; j < n; j++) {
		x[j] = expf(x[j] * scale - mx);
		sum += x[j];
	}
	__m256 vinv = _mm256_set1_ps(1.0f / sum);
	for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), vinv));
	for (float inv = 1.0f / sum; j < n; j++) x[j] *= inv;
}

static int cpu_softmax(float *x, int64_t rows, int64_t cols, int64_t ld, float scale, int64_t causal)
{
	#pragma omp parallel for schedule(static) if(PAR(rows * cols))
	for (int64_t r = 0; r < rows; r++) {
		float *xr = x + r * ld;
		int64_t lim = causal >= 0 ? r + causal + 1 : cols;
		if (lim > cols) lim = cols;
		softmax_row(xr, lim, scale);
		for (int64_t j = lim; j < cols; j++) xr[j] = 0.0f;
	}
	return 0;
}

/* ==== layout ==== */

static int cpu_transpose(float *out, const float *x, int64_t batch, int64_t R, int64_t C)
{
	enum { T = 32 };
	#pragma omp parallel for collapse(3) schedule(static) if(PAR(batch * R * C))
	for (int64_t b = 0; b < batch; b++)
		for (int64_t i0 = 0; i0 < R; i0 += T)
			for (int64_t j0 = 0; j0 < C; j0 += T) {
				const float *xb = x + b * R * C;
				float *ob = out + b * R * C;
				for (int64_t i = i0; i < i0 + T && i < R; i++)
					for (int64_t j = j0; j < j0 + T && j < C; j++) ob[j * R + i] = xb[i * C + j];
			}
	return 0;
}

static int cpu_upsample2x(float *out, const float *x, int64_t P, int64_t H, int64_t W)
{
	#pragma omp parallel for collapse(2) schedule(static) if(PAR(P * H * W * 4))
	for (int64_t p = 0; p < P; p++)
		for (int64_t y = 0; y < H; y++) {
			const float *src = x + (p * H + y) * W;
			float *d0 = out + (p * 2 * H + 2 * y) * 2 * W, *d1 = d0 + 2 * W;
			for (int64_t i = 0; i < W; i++) d0[2 * i] = d0[2 * i + 1] = src[i];
			memcpy(d1, d0, (size_t)(2 * W) * sizeof(float));
		}
	return 0;
}

static int cpu_embedding(float *out, const int32_t *ids, const float *table, int64_t n, int64_t V, int64_t D)
{
	for (int64_t i = 0; i < n; i++)
		if (ids[i] < 0 || ids[i] >= V)
			return sd_seterr("sd_embedding: id %d at position %lld is outside [0, %lld)", ids[i], (long long)i,
			                 (long long)V);
	for (int64_t i = 0; i < n; i++) memcpy(out + i * D, table + (int64_t)ids[i] * D, (size_t)D * sizeof(float));
	return 0;
}

/* f16 → f32 with F16C (exact, as sd_f16_to_f32), bf16 → f32 by a shift; in parallel chunks. */
static int cpu_to_f32(float *dst, const void *src, enum sd_dtype dtype, int64_t n)
{
	if (dtype != SD_DTYPE_F16 && dtype != SD_DTYPE_BF16)
		return sd_seterr("to_f32: %s is not f16 or bf16", sd_dtype_name(dtype));
	const uint16_t *s = src;
	const int64_t chunk = 1 << 16;
#pragma omp parallel for schedule(static) if (n > 4 * chunk)
	for (int64_t c0 = 0; c0 < n; c0 += chunk) {
		int64_t c1 = c0 + chunk < n ? c0 + chunk : n, i = c0;
		if (dtype == SD_DTYPE_F16) {
			for (; i + 8 <= c1; i += 8)
				_mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
			for (; i < c1; i++) dst[i] = sd_f16_to_f32(s[i]);
		} else {
			for (; i + 8 <= c1; i += 8) {
				__m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
				_mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
			}
			for (; i < c1; i++) dst[i] = sd_bf16_to_f32(s[i]);
		}
	}
	return 0;
}

const struct sd_backend sd_cpu_backend = {
	.name = "cpu",
	.device = SD_DEVICE_CPU,
	.alloc = sd_cpu_alloc,
	.free = sd_cpu_free,
	.memset0 = sd_cpu_memset0,
	.copy = sd_cpu_copy,
	.sync = sd_cpu_sync,
	.gemm = sd_cpu_gemm,
	.conv2d = cpu_conv2d,
	.conv_pack = cpu_conv_pack,
	.conv_pack_free = sd_cpu_free,
	.group_norm = cpu_group_norm,
	.layer_norm = cpu_layer_norm,
	.act = cpu_act,
	.geglu = cpu_geglu,
	.add = cpu_add,
	.mul = cpu_mul,
	.softmax = cpu_softmax,
	.transpose = cpu_transpose,
	.upsample2x = cpu_upsample2x,
	.embedding = cpu_embedding,
	.conv2d_backward_input = sd_cpu_conv2d_backward_input,
	.group_norm_backward = sd_cpu_group_norm_backward,
	.layer_norm_backward = sd_cpu_layer_norm_backward,
	.act_backward = sd_cpu_act_backward,
	.geglu_backward = sd_cpu_geglu_backward,
	.softmax_backward = sd_cpu_softmax_backward,
	.upsample2x_backward = sd_cpu_upsample2x_backward,
	.reduce = sd_cpu_reduce,
	.gaussian_sample_backward = sd_cpu_gaussian_sample_backward,
	.mse_loss = sd_cpu_mse_loss,
	.dropout_mask = sd_cpu_dropout_mask,
	.adam_step = sd_cpu_adam_step,
	.sumsq = sd_cpu_sumsq,
	.attention = sd_cpu_attention,
	.to_f32 = cpu_to_f32,
};
