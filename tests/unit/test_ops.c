/*
 * test_ops.c - every op of sd.h's "backends and ops" on the CPU against a naive double-precision loop
 * written here from the PyTorch definitions (torch.nn.functional.linear, conv2d, group_norm, layer_norm,
 * silu, gelu, softmax, scaled_dot_product_attention, ...), on random inputs in [-1, 1] of a few sizes
 * (odd ones, size-1 edges, and sizes that make the conv and attention kernels split their work into
 * several tiles/row blocks); in-place use where sd.h allows it; shape errors; and, when a GPU is
 * present, CUDA against CPU (an op whose CUDA slot is empty must say "not implemented on cuda").
 *
 * Outputs are pre-filled with NaN: sd.h lets `out` come from an arena, so an op must never read it.
 */
#include <stdarg.h>
#include <stdint.h>
#include "sd.h"
#include "test.h"

/* ==== helpers ==== */

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t xorshift(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}
/* uniform in [-1, 1] */
static float urand(void) { return (float)((double)(xorshift() >> 11) / 4503599627370496.0 - 1.0); }

#define DIMS(...) (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (int64_t[]){__VA_ARGS__}
#define F(t) ((float *)(t)->data)
#define N_(t) sd_tensor_numel(t)
#define FREE(...) do {                                                                   \
	sd_tensor *fl_[] = {__VA_ARGS__};                                                   \
	for (size_t i_ = 0; i_ < sizeof fl_ / sizeof *fl_; i_++) sd_tensor_free(fl_[i_]);   \
} while (0)

static sd_tensor *fill(sd_tensor *t, float v)
{
	for (int64_t i = 0; i < N_(t); i++) F(t)[i] = v;
	return t;
}
/* random values in [-1, 1] */
static sd_tensor *rnd(int ndim, const int64_t *shape)
{
	sd_tensor *t = sd_tensor_new(SD_DTYPE_F32, ndim, shape);
	for (int64_t i = 0; i < N_(t); i++) F(t)[i] = urand();
	return t;
}
/* an output: NaN everywhere, so that reading it shows */
static sd_tensor *nans(int ndim, const int64_t *shape)
{
	return fill(sd_tensor_new(SD_DTYPE_F32, ndim, shape), NAN);
}
static sd_tensor *zeros(int ndim, const int64_t *shape)
{
	return sd_tensor_new(SD_DTYPE_F32, ndim, shape);
}
/* a plain float buffer for a reference result */
static float *ref_buf(int64_t n)
{
	float *p = malloc((size_t)(n ? n : 1) * sizeof(float));
	for (int64_t i = 0; i < n; i++) p[i] = NAN;
	return p;
}

/* call must fail with -1 and a message containing `op` (and `also`, when not NULL) */
#define CHECK_ERR(call, op, also) check_err_(__FILE__, __LINE__, #call, (call), (op), (also))
static void check_err_(const char *file, int line, const char *what, int rc, const char *op, const char *also)
{
	const char *m = sd_errmsg();
	if (rc != -1 || !strstr(m, op) || (also && !strstr(m, also))) {
		printf("  %s:%d: %s: expected -1 and a message with '%s'%s%s, got %d: '%s'\n", file, line, what, op,
		       also ? " and " : "", also ? also : "", rc, m);
		test_failed_++;
	}
}

/* ==== references (double precision, straight from the PyTorch definitions) ==== */

static double d_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
static double d_silu(double x) { return x * d_sigmoid(x); }
static double d_gelu(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }
static double d_gelu_tanh(double x)
{
	return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}
static double d_quick_gelu(double x) { return x * d_sigmoid(1.702 * x); }
static double d_act(double x, enum sd_act a)
{
	switch (a) {
	case SD_ACT_SILU: return d_silu(x);
	case SD_ACT_GELU: return d_gelu(x);
	case SD_ACT_GELU_TANH: return d_gelu_tanh(x);
	case SD_ACT_QUICK_GELU: return d_quick_gelu(x);
	default: return NAN;
	}
}

/* out (rows, O) = x (rows, I) · wᵀ + b */
static void ref_linear(float *out, const float *x, const float *w, const float *b, int64_t rows, int64_t I,
                       int64_t O)
{
	for (int64_t r = 0; r < rows; r++)
		for (int64_t o = 0; o < O; o++) {
			double s = b ? b[o] : 0.0;
			for (int64_t i = 0; i < I; i++) s += (double)x[r * I + i] * w[o * I + i];
			out[r * O + o] = (float)s;
		}
}

/* F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, b, stride) */
static void ref_conv2d(float *out, const float *x, const float *w, const float *b, int64_t N, int64_t C,
                       int64_t H, int64_t W, int64_t O, int64_t kh, int64_t kw, int stride, int pt, int pb,
                       int pl, int pr)
{
	int64_t Ho = (H + pt + pb - kh) / stride + 1, Wo = (W + pl + pr - kw) / stride + 1;
	double *acc = malloc((size_t)(Ho * Wo) * sizeof(double));
	for (int64_t n = 0; n < N; n++)
		for (int64_t o = 0; o < O; o++) {
			for (int64_t p = 0; p < Ho * Wo; p++) acc[p] = b ? b[o] : 0.0;
			for (int64_t c = 0; c < C; c++)
				for (int64_t ky = 0; ky < kh; ky++)
					for (int64_t kx = 0; kx < kw; kx++) {
						double wv = w[((o * C + c) * kh + ky) * kw + kx];
						const float *xc = x + (n * C + c) * H * W;
						for (int64_t oy = 0; oy < Ho; oy++) {
							int64_t iy = oy * stride - pt + ky;
							if (iy < 0 || iy >= H) continue;
							for (int64_t ox = 0; ox < Wo; ox++) {
								int64_t ix = ox * stride - pl + kx;
								if (ix >= 0 && ix < W) acc[oy * Wo + ox] += wv * xc[iy * W + ix];
							}
						}
					}
			for (int64_t p = 0; p < Ho * Wo; p++) out[(n * O + o) * Ho * Wo + p] = (float)acc[p];
		}
	free(acc);
}

/* F.group_norm (biased variance, eps inside the sqrt), then SiLU when silu */
static void ref_group_norm(float *out, const float *x, const float *g, const float *bt, int64_t N, int64_t C,
                           int64_t S, int groups, double eps, int silu)
{
	int64_t cg = C / groups, cnt = cg * S;
	for (int64_t n = 0; n < N; n++)
		for (int64_t gi = 0; gi < groups; gi++) {
			const float *xs = x + (n * C + gi * cg) * S;
			double mean = 0, var = 0;
			for (int64_t i = 0; i < cnt; i++) mean += xs[i];
			mean /= (double)cnt;
			for (int64_t i = 0; i < cnt; i++) var += (xs[i] - mean) * (xs[i] - mean);
			var /= (double)cnt;
			for (int64_t c = 0; c < cg; c++) {
				int64_t ch = gi * cg + c;
				for (int64_t i = 0; i < S; i++) {
					double y = (xs[c * S + i] - mean) / sqrt(var + eps) * (g ? g[ch] : 1.0) + (bt ? bt[ch] : 0.0);
					out[(n * C + ch) * S + i] = (float)(silu ? d_silu(y) : y);
				}
			}
		}
}

static void ref_layer_norm(float *out, const float *x, const float *g, const float *bt, int64_t rows, int64_t D,
                           double eps)
{
	for (int64_t r = 0; r < rows; r++) {
		const float *xr = x + r * D;
		double mean = 0, var = 0;
		for (int64_t i = 0; i < D; i++) mean += xr[i];
		mean /= (double)D;
		for (int64_t i = 0; i < D; i++) var += (xr[i] - mean) * (xr[i] - mean);
		var /= (double)D;
		for (int64_t i = 0; i < D; i++)
			out[r * D + i] = (float)((xr[i] - mean) / sqrt(var + eps) * (g ? g[i] : 1.0) + (bt ? bt[i] : 0.0));
	}
}

static void ref_softmax(float *out, const float *x, int64_t rows, int64_t D)
{
	for (int64_t r = 0; r < rows; r++) {
		double mx = -INFINITY, s = 0;
		for (int64_t j = 0; j < D; j++) mx = fmax(mx, x[r * D + j]);
		for (int64_t j = 0; j < D; j++) s += exp(x[r * D + j] - mx);
		for (int64_t j = 0; j < D; j++) out[r * D + j] = (float)(exp(x[r * D + j] - mx) / s);
	}
}

/*
 * F.scaled_dot_product_attention(q', k', v', is_causal=causal, scale=scale) with
 * q' = q.view(N, Lq, H, d).transpose(1, 2) (and k', v' likewise), the result transposed back to
 * (N, Lq, H·dv); probs (N, H, Lq, Lk) = the softmax weights.  causal masks key j > query i (top-left).
 */
static void ref_attention(float *out, float *probs, const float *q, const float *k, const float *v, int64_t N,
                          int64_t H, int64_t Lq, int64_t Lk, int64_t d, int64_t dv, double scale, int causal)
{
	double *s = malloc((size_t)Lk * sizeof(double)), *acc = malloc((size_t)dv * sizeof(double));
	for (int64_t n = 0; n < N; n++)
		for (int64_t h = 0; h < H; h++)
			for (int64_t i = 0; i < Lq; i++) {
				const float *qi = q + ((n * Lq + i) * H + h) * d;
				double mx = -INFINITY, sum = 0;
				for (int64_t j = 0; j < Lk; j++) {
					if (causal && j > i) { s[j] = -INFINITY; continue; }
					const float *kj = k + ((n * Lk + j) * H + h) * d;
					double dot = 0;
					for (int64_t c = 0; c < d; c++) dot += (double)qi[c] * kj[c];
					s[j] = dot * scale;
					if (s[j] > mx) mx = s[j];
				}
				for (int64_t j = 0; j < Lk; j++) sum += s[j] = exp(s[j] - mx);
				for (int64_t e = 0; e < dv; e++) acc[e] = 0;
				for (int64_t j = 0; j < Lk; j++) {
					double p = s[j] / sum;
					if (probs) probs[((n * H + h) * Lq + i) * Lk + j] = (float)p;
					if (p == 0) continue;
					const float *vj = v + ((n * Lk + j) * H + h) * dv;
					for (int64_t e = 0; e < dv; e++) acc[e] += p * vj[e];
				}
				for (int64_t e = 0; e < dv; e++) out[((n * Lq + i) * H + h) * dv + e] = (float)acc[e];
			}
	free(s);
	free(acc);
}

/* ==== matmul ==== */

/* out (batch, M, N) = alpha·op(a)·op(b) + beta·out, b shared when b_batch == 0 */
static void ref_matmul(float *out, const float *a, const float *b, int64_t batch, int64_t M, int64_t Nn,
                       int64_t K, int ta, int tb, int b_shared, double alpha, double beta)
{
	for (int64_t t = 0; t < batch; t++) {
		const float *A = a + t * M * K, *B = b + (b_shared ? 0 : t * K * Nn);
		float *C = out + t * M * Nn;
		for (int64_t i = 0; i < M; i++)
			for (int64_t j = 0; j < Nn; j++) {
				double s = 0;
				for (int64_t kk = 0; kk < K; kk++)
					s += (double)(ta ? A[kk * M + i] : A[i * K + kk]) * (tb ? B[j * K + kk] : B[kk * Nn + j]);
				C[i * Nn + j] = (float)(alpha * s + (beta != 0 ? beta * C[i * Nn + j] : 0.0));
			}
	}
}

TEST(matmul)
{
	struct { int64_t lead[2]; int nlead; int64_t M, N, K; int ta, tb, shared; float alpha, beta; } cs[] = {
		{{1}, 0, 1, 1, 1, 0, 0, 0, 1.0f, 0.0f},
		{{2, 3}, 2, 5, 7, 3, 0, 1, 1, 0.5f, 0.0f},
		{{2, 3}, 2, 5, 7, 3, 1, 0, 0, 1.0f, -0.75f},
		{{4}, 1, 9, 1, 17, 1, 1, 0, 2.0f, 0.25f},
		{{1}, 0, 33, 65, 129, 0, 0, 1, 1.0f, 1.0f},
	};
	for (size_t ci = 0; ci < sizeof cs / sizeof *cs; ci++) {
		int nl = cs[ci].nlead;
		int64_t M = cs[ci].M, Nn = cs[ci].N, K = cs[ci].K, batch = 1;
		int64_t sa[4], sb[4], so[4];
		for (int i = 0; i < nl; i++) sa[i] = sb[i] = so[i] = cs[ci].lead[i], batch *= cs[ci].lead[i];
		sa[nl] = cs[ci].ta ? K : M, sa[nl + 1] = cs[ci].ta ? M : K;
		int bo = cs[ci].shared ? nl : 0; /* a shared b is 2-D */
		sb[nl] = cs[ci].tb ? Nn : K, sb[nl + 1] = cs[ci].tb ? K : Nn;
		so[nl] = M, so[nl + 1] = Nn;
		sd_tensor *a = rnd(nl + 2, sa), *b = rnd(nl + 2 - bo, sb + bo);
		sd_tensor *out = cs[ci].beta != 0 ? rnd(nl + 2, so) : nans(nl + 2, so);
		float *want = ref_buf(N_(out));
		memcpy(want, out->data, sd_tensor_nbytes(out));
		ref_matmul(want, F(a), F(b), batch, M, Nn, K, cs[ci].ta, cs[ci].tb, cs[ci].shared, cs[ci].alpha,
		           cs[ci].beta);
		CHECK_OK(sd_matmul(out, a, b, cs[ci].ta, cs[ci].tb, cs[ci].alpha, cs[ci].beta));
		printf("  case %zu: batch %lld, M %lld N %lld K %lld ta %d tb %d shared_b %d:\n", ci, (long long)batch,
		       (long long)M, (long long)Nn, (long long)K, cs[ci].ta, cs[ci].tb, cs[ci].shared);
		CHECK_CLOSE(F(out), want, N_(out), 1e-5);
		free(want);
		FREE(a, b, out);
	}
	/* K = 0 with beta 0: zeros, whatever out held */
	sd_tensor *a = rnd(DIMS(3, 0)), *b = rnd(DIMS(0, 4)), *out = nans(DIMS(3, 4));
	CHECK_OK(sd_matmul(out, a, b, 0, 0, 1.0f, 0.0f));
	int zero = 1;
	for (int i = 0; i < 12; i++) zero &= F(out)[i] == 0.0f;
	CHECK(zero);
	FREE(a, b, out);
}

/* ==== linear ==== */

static void check_linear(int nd, const int64_t *xs, int64_t O, int bias, int nan_out)
{
	int64_t I = xs[nd - 1], rows = 1, os[SD_MAX_DIMS];
	for (int i = 0; i < nd - 1; i++) rows *= xs[i], os[i] = xs[i];
	os[nd - 1] = O;
	sd_tensor *x = rnd(nd, xs), *w = rnd(DIMS(O, I)), *b = bias ? rnd(DIMS(O)) : NULL;
	sd_tensor *out = nan_out ? nans(nd, os) : zeros(nd, os);
	float *want = ref_buf(rows * O);
	ref_linear(want, F(x), F(w), b ? F(b) : NULL, rows, I, O);
	CHECK_OK(sd_linear(out, x, w, b));
	printf("  rows %lld, %lld -> %lld, bias %d, out %s before:\n", (long long)rows, (long long)I, (long long)O,
	       bias, nan_out ? "NaN" : "zero");
	CHECK_CLOSE(F(out), want, rows * O, 1e-5);
	int64_t nan = 0;
	for (int64_t i = 0; i < rows * O; i++) nan += isnan(F(out)[i]);
	if (nan) printf("  %lld of %lld outputs are NaN\n", (long long)nan, (long long)(rows * O));
	free(want);
	FREE(x, w, b, out);
}

TEST(linear)
{
	check_linear(DIMS(2, 3, 5), 7, 1, 0);
	check_linear(DIMS(2, 3, 5), 7, 0, 1);
	check_linear(DIMS(1, 1), 1, 1, 0);
	check_linear(DIMS(4), 3, 0, 1); /* 1-D x */
	check_linear(DIMS(4), 3, 1, 0);
	check_linear(DIMS(3, 17), 33, 1, 0);
	check_linear(DIMS(2, 77, 64), 96, 1, 0);
}

/* sd.h: `out` may come from an arena (any old contents); with a bias, sd_linear must not read it. */
TEST(linear_bias_does_not_read_out)
{
	check_linear(DIMS(2, 3, 5), 7, 1, 1);
	check_linear(DIMS(1, 5), 7, 1, 1); /* one row: the same-shape path of the add slot */
}

/* ==== conv2d ==== */

static void check_conv(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t kh, int64_t kw, int stride,
                       int pt, int pb, int pl, int pr, int bias, double rtol)
{
	int64_t Ho = (H + pt + pb - kh) / stride + 1, Wo = (W + pl + pr - kw) / stride + 1;
	sd_tensor *x = rnd(DIMS(N, C, H, W)), *w = rnd(DIMS(O, C, kh, kw)), *b = bias ? rnd(DIMS(O)) : NULL;
	sd_tensor *out = nans(DIMS(N, O, Ho, Wo));
	float *want = ref_buf(N_(out));
	ref_conv2d(want, F(x), F(w), b ? F(b) : NULL, N, C, H, W, O, kh, kw, stride, pt, pb, pl, pr);
	CHECK_OK(sd_conv2d(out, x, w, b, stride, pt, pb, pl, pr));
	printf("  x [%lld,%lld,%lld,%lld] w [%lld,%lld,%lld,%lld] stride %d pad (%d,%d,%d,%d) bias %d -> %lldx%lld:\n",
	       (long long)N, (long long)C, (long long)H, (long long)W, (long long)O, (long long)C, (long long)kh,
	       (long long)kw, stride, pt, pb, pl, pr, bias, (long long)Ho, (long long)Wo);
	CHECK_CLOSE(F(out), want, N_(out), rtol);
	free(want);
	FREE(x, w, b, out);
}

static void conv_cases(void)
{
	/* 1×1 stride 1 unpadded: the direct GEMM path */
	check_conv(2, 5, 7, 3, 4, 1, 1, 1, 0, 0, 0, 0, 1, 1e-5);
	check_conv(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1e-5);
	check_conv(3, 16, 9, 11, 8, 1, 1, 1, 0, 0, 0, 0, 0, 1e-5);
	/* 1×1 through im2col: strided, or padded */
	check_conv(2, 3, 5, 5, 2, 1, 1, 2, 0, 0, 0, 0, 1, 1e-5);
	check_conv(1, 3, 4, 3, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1e-5);
	/* 3×3 pad 1 stride 1 */
	check_conv(2, 3, 9, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1e-5);
	check_conv(1, 7, 13, 1, 3, 3, 3, 1, 1, 1, 1, 1, 0, 1e-5);
	check_conv(1, 1, 1, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1e-5); /* one pixel: only the centre tap */
	check_conv(2, 32, 16, 16, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1e-5);
	/* 3×3 stride 2 with the VAE's asymmetric (0,1,0,1) pad, even and odd sizes */
	check_conv(1, 4, 8, 8, 3, 3, 3, 2, 0, 1, 0, 1, 1, 1e-5);
	check_conv(2, 4, 9, 7, 3, 3, 3, 2, 0, 1, 0, 1, 1, 1e-5);
	check_conv(1, 2, 5, 6, 3, 3, 3, 2, 1, 1, 1, 1, 0, 1e-5);
	/* arbitrary asymmetric pads, unpadded, and non-square kernels */
	check_conv(2, 3, 6, 5, 4, 2, 3, 1, 2, 0, 1, 3, 1, 1e-5);
	check_conv(1, 3, 6, 5, 2, 3, 2, 1, 0, 0, 0, 0, 1, 1e-5);
	check_conv(1, 2, 3, 9, 2, 3, 1, 1, 0, 2, 1, 0, 0, 1e-5);
	check_conv(1, 2, 4, 4, 2, 4, 4, 3, 0, 3, 2, 1, 1, 1e-5);
}

TEST(conv2d)
{
	conv_cases();
	/* K·P > 8M floats, stride 2 (always im2col): several im2col tiles per image (K = 576, P = 175² =
	 * 30625: tiles of 14563 columns that start and end mid-row), and two images */
	check_conv(2, 64, 350, 350, 3, 3, 3, 2, 0, 1, 0, 1, 1, 1e-5);
	/* the same size at stride 1 */
	check_conv(2, 64, 175, 175, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1e-5);
}

/* lib/cpu/kernels.c takes stride-1 convolutions off im2col unless $SD_CONV_IM2COL is set: the small
 * cases again, forced through im2col (harmless where the variable means nothing) */
TEST(conv2d_im2col)
{
	setenv("SD_CONV_IM2COL", "1", 1);
	conv_cases();
	check_conv(1, 64, 175, 175, 2, 3, 3, 1, 1, 1, 1, 1, 0, 1e-5); /* stride 1, three tiles */
	unsetenv("SD_CONV_IM2COL");
}

/* ==== group norm ==== */

static void check_group_norm(int nd, const int64_t *xs, int groups, int affine, float eps, int silu, int inplace)
{
	int64_t N = xs[0], C = xs[1], S = 1;
	for (int i = 2; i < nd; i++) S *= xs[i];
	sd_tensor *x = rnd(nd, xs), *g = affine ? rnd(DIMS(C)) : NULL, *b = affine ? rnd(DIMS(C)) : NULL;
	sd_tensor *out = inplace ? x : nans(nd, xs);
	float *want = ref_buf(N_(x));
	ref_group_norm(want, F(x), g ? F(g) : NULL, b ? F(b) : NULL, N, C, S, groups, eps, silu);
	CHECK_OK(sd_group_norm(out, x, groups, g, b, eps, silu));
	printf("  N %lld C %lld S %lld groups %d affine %d eps %g silu %d inplace %d:\n", (long long)N, (long long)C,
	       (long long)S, groups, affine, eps, silu, inplace);
	CHECK_CLOSE(F(out), want, N_(x), 1e-5);
	free(want);
	if (!inplace) sd_tensor_free(out);
	FREE(x, g, b);
}

TEST(group_norm)
{
	for (int silu = 0; silu < 2; silu++) {
		check_group_norm(DIMS(2, 6, 5, 3), 3, 1, 1e-5f, silu, 0);
		check_group_norm(DIMS(2, 6, 5, 3), 3, 0, 1e-6f, silu, 0);
		check_group_norm(DIMS(3, 8), 2, 1, 1e-5f, silu, 0);             /* (N, C): S = 1 */
		check_group_norm(DIMS(1, 32, 7, 9), 32, 1, 1e-6f, silu, 0);     /* one channel per group */
		check_group_norm(DIMS(1, 64, 16, 16), 32, 1, 1e-6f, silu, 0);
		check_group_norm(DIMS(2, 5, 3), 1, 1, 1e-5f, silu, 0);          /* one group: LayerNorm over (C, L) */
		check_group_norm(DIMS(1, 4, 1, 1), 4, 1, 1e-5f, silu, 0);       /* one value per group: = beta */
		check_group_norm(DIMS(2, 6, 5, 3), 3, 1, 1e-5f, silu, 1);
		check_group_norm(DIMS(1, 64, 16, 16), 32, 1, 1e-6f, silu, 1);
	}
}

/* ==== layer norm ==== */

static void check_layer_norm(int nd, const int64_t *xs, int affine, float eps, int inplace)
{
	int64_t D = xs[nd - 1], rows = 1;
	for (int i = 0; i < nd - 1; i++) rows *= xs[i];
	sd_tensor *x = rnd(nd, xs), *g = affine ? rnd(DIMS(D)) : NULL, *b = affine ? rnd(DIMS(D)) : NULL;
	sd_tensor *out = inplace ? x : nans(nd, xs);
	float *want = ref_buf(N_(x));
	ref_layer_norm(want, F(x), g ? F(g) : NULL, b ? F(b) : NULL, rows, D, eps);
	CHECK_OK(sd_layer_norm(out, x, g, b, eps));
	printf("  rows %lld D %lld affine %d eps %g inplace %d:\n", (long long)rows, (long long)D, affine, eps, inplace);
	CHECK_CLOSE(F(out), want, N_(x), 1e-5);
	free(want);
	if (!inplace) sd_tensor_free(out);
	FREE(x, g, b);
}

TEST(layer_norm)
{
	check_layer_norm(DIMS(3, 5, 7), 1, 1e-5f, 0);
	check_layer_norm(DIMS(3, 5, 7), 0, 1e-5f, 0);
	check_layer_norm(DIMS(1, 1), 1, 1e-5f, 0); /* D = 1: = beta */
	check_layer_norm(DIMS(4, 33), 1, 1e-6f, 0);
	check_layer_norm(DIMS(2, 77, 768), 1, 1e-5f, 0);
	check_layer_norm(DIMS(9), 1, 1e-5f, 0);    /* 1-D */
	check_layer_norm(DIMS(3, 5, 7), 1, 1e-5f, 1);
	check_layer_norm(DIMS(2, 77, 768), 0, 1e-5f, 1);
}

/* ==== activations ==== */

static const char *act_name[] = {"silu", "gelu", "gelu_tanh", "quick_gelu"};

TEST(act)
{
	int64_t sizes[] = {1, 7, 1000, 4099};
	for (int a = 0; a < SD_ACT_COUNT; a++)
		for (size_t si = 0; si < 4; si++)
			for (int mode = 0; mode < 3; mode++) { /* 0: out-of-place, 1: in place, 2: wide range ×8 */
				int64_t n = sizes[si];
				sd_tensor *x = rnd(DIMS(n)), *out = mode == 1 ? x : nans(DIMS(n));
				if (mode == 2)
					for (int64_t i = 0; i < n; i++) F(x)[i] *= 8;
				float *want = ref_buf(n);
				for (int64_t i = 0; i < n; i++) want[i] = (float)d_act(F(x)[i], (enum sd_act)a);
				CHECK_OK(sd_act(out, x, (enum sd_act)a));
				printf("  %s n %lld %s:\n", act_name[a], (long long)n,
				       mode == 0 ? "" : mode == 1 ? "in place" : "x in [-8, 8]");
				CHECK_CLOSE(F(out), want, n, 1e-5);
				free(want);
				if (out != x) sd_tensor_free(out);
				sd_tensor_free(x);
			}
	/* a 4-D shape (any shape is elementwise) */
	sd_tensor *x = rnd(DIMS(2, 3, 4, 5)), *out = nans(DIMS(2, 3, 4, 5));
	float *want = ref_buf(120);
	for (int i = 0; i < 120; i++) want[i] = (float)d_gelu(F(x)[i]);
	CHECK_OK(sd_act(out, x, SD_ACT_GELU));
	CHECK_CLOSE(F(out), want, 120, 1e-5);
	CHECK_ERR(sd_act(out, x, SD_ACT_COUNT), "sd_act", "unknown activation");
	free(want);
	FREE(x, out);
}

/* ==== GEGLU ==== */

static void check_geglu(int nd, const int64_t *xs)
{
	int64_t os[SD_MAX_DIMS], rows = 1, F2 = xs[nd - 1], Fh = F2 / 2;
	for (int i = 0; i < nd; i++) os[i] = xs[i];
	for (int i = 0; i < nd - 1; i++) rows *= xs[i];
	os[nd - 1] = Fh;
	sd_tensor *x = rnd(nd, xs), *out = nans(nd, os);
	float *want = ref_buf(rows * Fh);
	/* hidden, gate = x.chunk(2, dim=-1); hidden * gelu(gate) */
	for (int64_t r = 0; r < rows; r++)
		for (int64_t i = 0; i < Fh; i++)
			want[r * Fh + i] = (float)(F(x)[r * F2 + i] * d_gelu(F(x)[r * F2 + Fh + i]));
	CHECK_OK(sd_geglu(out, x));
	printf("  rows %lld F %lld:\n", (long long)rows, (long long)Fh);
	CHECK_CLOSE(F(out), want, rows * Fh, 1e-5);
	free(want);
	FREE(x, out);
}

TEST(geglu)
{
	check_geglu(DIMS(2, 3, 10));
	check_geglu(DIMS(1, 2));
	check_geglu(DIMS(2));
	check_geglu(DIMS(7, 64));
	check_geglu(DIMS(2, 77, 2560));
}

/* ==== add / scale / mul ==== */

/* out = alpha·a + beta·b[(i / S) % m] */
static void check_add(int na, const int64_t *as, int nb, const int64_t *bs, int64_t S, float alpha, float beta,
                      int inplace)
{
	sd_tensor *a = rnd(na, as), *b = rnd(nb, bs), *out = inplace ? a : nans(na, as);
	int64_t n = N_(a), m = N_(b);
	float *want = ref_buf(n);
	for (int64_t i = 0; i < n; i++) want[i] = (float)((double)alpha * F(a)[i] + (double)beta * F(b)[(i / S) % m]);
	CHECK_OK(sd_add(out, a, b, alpha, beta));
	char s1[96], s2[96];
	printf("  a %s b %s alpha %g beta %g inplace %d:\n", sd_shape_str(na, as, s1, sizeof s1),
	       sd_shape_str(nb, bs, s2, sizeof s2), alpha, beta, inplace);
	CHECK_CLOSE(F(out), want, n, 1e-5);
	free(want);
	if (!inplace) sd_tensor_free(out);
	FREE(a, b);
}

TEST(add)
{
	for (int inplace = 0; inplace < 2; inplace++) {
		/* same shape, plain and with alpha/beta */
		check_add(DIMS(2, 3, 4, 5), DIMS(2, 3, 4, 5), 1, 1.0f, 1.0f, inplace);
		check_add(DIMS(2, 3, 4, 5), DIMS(2, 3, 4, 5), 1, 0.5f, -2.0f, inplace);
		check_add(DIMS(1), DIMS(1), 1, 1.0f, 1.0f, inplace);
		check_add(DIMS(1), DIMS(1), 1, -0.25f, 3.0f, inplace);
		/* b = a's trailing dimensions (CLIP's position embeddings) */
		check_add(DIMS(2, 77, 8), DIMS(77, 8), 1, 1.0f, 1.0f, inplace);
		check_add(DIMS(2, 3, 4), DIMS(4), 1, 1.0f, 0.5f, inplace);
		check_add(DIMS(3, 1, 5), DIMS(1, 5), 1, 2.0f, 1.0f, inplace);
		/* b (N, C) onto a (N, C, *): the time embedding into a ResNet block */
		check_add(DIMS(2, 3, 4, 5), DIMS(2, 3), 20, 1.0f, 1.0f, inplace);
		check_add(DIMS(2, 3, 7), DIMS(2, 3), 7, 0.5f, -1.5f, inplace);
		check_add(DIMS(1, 5, 1, 1), DIMS(1, 5), 1, 1.0f, 1.0f, inplace);
	}
	/* not broadcastable */
	sd_tensor *a = rnd(DIMS(2, 3, 4)), *b = rnd(DIMS(3, 2)), *b2 = rnd(DIMS(3, 4, 1)), *out = nans(DIMS(2, 3, 4));
	CHECK_ERR(sd_add(out, a, b, 1, 1), "sd_add", "not broadcastable");
	CHECK_ERR(sd_add(out, a, b2, 1, 1), "sd_add", "not broadcastable");
	FREE(a, b, b2, out);
}

TEST(scale)
{
	int64_t sizes[] = {1, 6, 1001};
	for (int k = 0; k < 3; k++)
		for (int inplace = 0; inplace < 2; inplace++) {
			sd_tensor *x = rnd(DIMS(sizes[k])), *out = inplace ? x : nans(DIMS(sizes[k]));
			float *want = ref_buf(sizes[k]);
			for (int64_t i = 0; i < sizes[k]; i++) want[i] = (float)(F(x)[i] * (double)-0.37f);
			CHECK_OK(sd_scale(out, x, -0.37f));
			printf("  n %lld inplace %d:\n", (long long)sizes[k], inplace);
			CHECK_CLOSE(F(out), want, sizes[k], 1e-5);
			free(want);
			if (!inplace) sd_tensor_free(out);
			sd_tensor_free(x);
		}
	/* sd.h: "every violation is an error naming the op" */
	sd_tensor *x = rnd(DIMS(2, 3)), *out = nans(DIMS(3, 2));
	CHECK_ERR(sd_scale(out, x, 2.0f), "sd_scale", "shape");
	FREE(x, out);
}

TEST(mul)
{
	int64_t sizes[][3] = {{1, 1, 1}, {2, 3, 5}, {7, 1, 129}};
	for (int k = 0; k < 3; k++)
		for (int inplace = 0; inplace < 2; inplace++) {
			sd_tensor *a = rnd(3, sizes[k]), *b = rnd(3, sizes[k]), *out = inplace ? a : nans(3, sizes[k]);
			int64_t n = N_(a);
			float *want = ref_buf(n);
			for (int64_t i = 0; i < n; i++) want[i] = (float)((double)F(a)[i] * F(b)[i]);
			CHECK_OK(sd_mul(out, a, b));
			printf("  n %lld inplace %d:\n", (long long)n, inplace);
			CHECK_CLOSE(F(out), want, n, 1e-5);
			free(want);
			if (!inplace) sd_tensor_free(out);
			FREE(a, b);
		}
	sd_tensor *a = rnd(DIMS(2, 3)), *b = rnd(DIMS(3, 2)), *out = nans(DIMS(2, 3));
	CHECK_ERR(sd_mul(out, a, b), "sd_mul", "must match");
	FREE(a, b, out);
}

/* ==== softmax ==== */

static void check_softmax(int nd, const int64_t *xs, float mag, int inplace)
{
	int64_t D = xs[nd - 1];
	sd_tensor *x = rnd(nd, xs), *out = inplace ? x : nans(nd, xs);
	for (int64_t i = 0; i < N_(x); i++) F(x)[i] *= mag;
	float *want = ref_buf(N_(x));
	ref_softmax(want, F(x), N_(x) / D, D);
	CHECK_OK(sd_softmax(out, x));
	printf("  rows %lld D %lld |x| <= %g inplace %d:\n", (long long)(N_(x) / D), (long long)D, mag, inplace);
	CHECK_CLOSE(F(out), want, N_(x), 1e-5);
	free(want);
	if (!inplace) sd_tensor_free(out);
	sd_tensor_free(x);
}

TEST(softmax)
{
	for (int inplace = 0; inplace < 2; inplace++) {
		check_softmax(DIMS(3, 7), 1, inplace);
		check_softmax(DIMS(1, 1), 1, inplace); /* = 1 */
		check_softmax(DIMS(5), 1, inplace);
		check_softmax(DIMS(2, 3, 1000), 1, inplace);
		check_softmax(DIMS(4, 33), 200, inplace); /* needs the max subtracted: exp(200) overflows f32 */
	}
}

/* ==== attention ==== */

static void check_attention(int64_t N, int64_t H, int64_t Lq, int64_t Lk, int64_t d, int64_t dv, int causal,
                            int with_probs, double rtol)
{
	sd_tensor *q = rnd(DIMS(N, Lq, H * d)), *k = rnd(DIMS(N, Lk, H * d)), *v = rnd(DIMS(N, Lk, H * dv));
	sd_tensor *out = nans(DIMS(N, Lq, H * dv)), *probs = with_probs ? nans(DIMS(N, H, Lq, Lk)) : NULL;
	float *want = ref_buf(N_(out)), *wantp = with_probs ? ref_buf(N_(probs)) : NULL;
	float scale = 1.0f / sqrtf((float)d);
	ref_attention(want, wantp, F(q), F(k), F(v), N, H, Lq, Lk, d, dv, scale, causal);
	CHECK_OK(sd_attention(out, q, k, v, (int)H, scale, causal, probs));
	printf("  N %lld H %lld Lq %lld Lk %lld d %lld dv %lld causal %d probs %d:\n", (long long)N, (long long)H,
	       (long long)Lq, (long long)Lk, (long long)d, (long long)dv, causal, with_probs);
	CHECK_CLOSE(F(out), want, N_(out), rtol);
	if (with_probs) CHECK_CLOSE(F(probs), wantp, N_(probs), rtol);
	free(want);
	free(wantp);
	FREE(q, k, v, out, probs);
}

TEST(attention)
{
	for (int p = 0; p < 2; p++) {
		check_attention(2, 3, 5, 7, 4, 6, 0, p, 1e-5);  /* Lq != Lk, dv != d */
		check_attention(2, 3, 6, 6, 4, 4, 1, p, 1e-5);  /* causal */
		check_attention(1, 2, 5, 9, 3, 2, 1, p, 1e-5);  /* causal, Lq < Lk */
		check_attention(1, 2, 9, 5, 3, 2, 1, p, 1e-5);  /* causal, Lq > Lk: the last rows see every key */
		check_attention(1, 1, 1, 1, 1, 1, 0, p, 1e-5);  /* one of everything: out = v */
		check_attention(3, 1, 1, 4, 5, 1, 1, p, 1e-5);
		check_attention(2, 8, 77, 77, 8, 8, 1, p, 1e-5); /* CLIP-like */
		check_attention(1, 5, 64, 77, 8, 8, 0, p, 1e-5); /* cross-attention-like */
	}
	/* Lq·Lk·H above the 8M-float score scratch: several row blocks (1997 + 103 rows) */
	check_attention(1, 2, 2100, 2100, 8, 8, 0, 0, 1e-4);
	/* two images, causal across blocks (1471 + 29 rows), Lq != Lk, dv != d */
	check_attention(2, 3, 1500, 1900, 4, 5, 1, 0, 1e-4);
	/* heads must divide the features */
	sd_tensor *q = rnd(DIMS(1, 3, 10)), *k = rnd(DIMS(1, 4, 10)), *v = rnd(DIMS(1, 4, 10)), *o = nans(DIMS(1, 3, 10));
	CHECK_ERR(sd_attention(o, q, k, v, 3, 1.0f, 0, NULL), "sd_attention", "heads");
	FREE(q, k, v, o);
}

/* ==== layout, upsample, concat, embedding ==== */

static void check_layout(int64_t N, int64_t C, int64_t H, int64_t W)
{
	sd_tensor *x = rnd(DIMS(N, C, H, W)), *nlc = nans(DIMS(N, H * W, C)), *back = nans(DIMS(N, C, H, W));
	float *want = ref_buf(N_(x));
	for (int64_t n = 0; n < N; n++)
		for (int64_t c = 0; c < C; c++)
			for (int64_t p = 0; p < H * W; p++) want[(n * H * W + p) * C + c] = F(x)[(n * C + c) * H * W + p];
	CHECK_OK(sd_nchw_to_nlc(nlc, x));
	printf("  [%lld,%lld,%lld,%lld] -> nlc -> nchw:\n", (long long)N, (long long)C, (long long)H, (long long)W);
	CHECK_CLOSE(F(nlc), want, N_(x), 0);
	CHECK_OK(sd_nlc_to_nchw(back, nlc));
	CHECK_CLOSE(F(back), F(x), N_(x), 0);
	/* nlc_to_nchw on its own, from a random (N, L, C) */
	sd_tensor *y = rnd(DIMS(N, H * W, C)), *yo = nans(DIMS(N, C, H, W));
	for (int64_t n = 0; n < N; n++)
		for (int64_t c = 0; c < C; c++)
			for (int64_t p = 0; p < H * W; p++) want[(n * C + c) * H * W + p] = F(y)[(n * H * W + p) * C + c];
	CHECK_OK(sd_nlc_to_nchw(yo, y));
	CHECK_CLOSE(F(yo), want, N_(x), 0);
	free(want);
	FREE(x, nlc, back, y, yo);
}

TEST(layout)
{
	check_layout(2, 3, 4, 5);
	check_layout(1, 1, 1, 1);
	check_layout(1, 33, 7, 5); /* crosses the 32×32 transpose tiles */
	check_layout(2, 70, 9, 11);
	check_layout(1, 320, 8, 8);
	check_layout(3, 1, 5, 1);
}

static void check_upsample(int64_t N, int64_t C, int64_t H, int64_t W)
{
	sd_tensor *x = rnd(DIMS(N, C, H, W)), *out = nans(DIMS(N, C, 2 * H, 2 * W));
	float *want = ref_buf(N_(out));
	/* F.interpolate(scale_factor=2, mode="nearest"): out[y][x] = in[y/2][x/2] */
	for (int64_t p = 0; p < N * C; p++)
		for (int64_t y = 0; y < 2 * H; y++)
			for (int64_t xx = 0; xx < 2 * W; xx++)
				want[(p * 2 * H + y) * 2 * W + xx] = F(x)[(p * H + y / 2) * W + xx / 2];
	CHECK_OK(sd_upsample2x(out, x));
	printf("  [%lld,%lld,%lld,%lld]:\n", (long long)N, (long long)C, (long long)H, (long long)W);
	CHECK_CLOSE(F(out), want, N_(out), 0);
	free(want);
	FREE(x, out);
}

TEST(upsample2x)
{
	check_upsample(2, 3, 4, 5);
	check_upsample(1, 1, 1, 1);
	check_upsample(1, 4, 7, 1);
	check_upsample(2, 8, 16, 16);
}

static void check_concat(int nd, const int64_t *as, int64_t Cb)
{
	int64_t bs[SD_MAX_DIMS], os[SD_MAX_DIMS], S = 1;
	for (int i = 0; i < nd; i++) bs[i] = os[i] = as[i];
	for (int i = 2; i < nd; i++) S *= as[i];
	bs[1] = Cb;
	os[1] = as[1] + Cb;
	sd_tensor *a = rnd(nd, as), *b = rnd(nd, bs), *out = nans(nd, os);
	float *want = ref_buf(N_(out));
	int64_t Ca = as[1], Co = Ca + Cb;
	for (int64_t n = 0; n < as[0]; n++)
		for (int64_t c = 0; c < Co; c++)
			for (int64_t s = 0; s < S; s++)
				want[(n * Co + c) * S + s] = c < Ca ? F(a)[(n * Ca + c) * S + s] : F(b)[(n * Cb + c - Ca) * S + s];
	CHECK_OK(sd_concat1(out, a, b));
	char s1[96];
	printf("  a %s ++ Cb %lld:\n", sd_shape_str(nd, as, s1, sizeof s1), (long long)Cb);
	CHECK_CLOSE(F(out), want, N_(out), 0);
	free(want);
	FREE(a, b, out);
}

TEST(concat1)
{
	check_concat(DIMS(2, 3, 4, 5), 1);
	check_concat(DIMS(1, 1, 1, 1), 1);
	check_concat(DIMS(3, 2), 5);
	check_concat(DIMS(2, 4, 3), 0);  /* empty b */
	check_concat(DIMS(2, 0, 3), 4);  /* empty a */
	check_concat(DIMS(2, 320, 8, 8), 640);
}

TEST(embedding)
{
	int64_t V = 11, D = 6;
	sd_tensor *table = rnd(DIMS(V, D));
	int64_t idshapes[][2] = {{2, 3}, {1, 1}, {1, 77}};
	for (int k = 0; k < 3; k++) {
		sd_tensor *ids = sd_tensor_new(SD_DTYPE_I32, 2, idshapes[k]), *out = nans(DIMS(idshapes[k][0], idshapes[k][1], D));
		int64_t n = N_(ids);
		int32_t *id = ids->data;
		for (int64_t i = 0; i < n; i++) id[i] = (int32_t)(xorshift() % (uint64_t)V);
		if (n > 1) id[0] = 0, id[n - 1] = (int32_t)V - 1;
		float *want = ref_buf(n * D);
		for (int64_t i = 0; i < n; i++)
			for (int64_t j = 0; j < D; j++) want[i * D + j] = F(table)[id[i] * D + j];
		CHECK_OK(sd_embedding(out, ids, table));
		printf("  ids [%lld,%lld]:\n", (long long)idshapes[k][0], (long long)idshapes[k][1]);
		CHECK_CLOSE(F(out), want, n * D, 0);
		/* out of range, either side */
		id[n - 1] = (int32_t)V;
		CHECK_ERR(sd_embedding(out, ids, table), "sd_embedding", "outside");
		id[n - 1] = -1;
		CHECK_ERR(sd_embedding(out, ids, table), "sd_embedding", "outside");
		free(want);
		FREE(ids, out);
	}
	/* a table of one row, 1-D ids */
	sd_tensor *t1 = rnd(DIMS(1, 4)), *ids = sd_tensor_new(SD_DTYPE_I32, DIMS(3)), *out = nans(DIMS(3, 4));
	CHECK_OK(sd_embedding(out, ids, t1));
	for (int i = 0; i < 3; i++) CHECK_CLOSE(F(out) + 4 * i, F(t1), 4, 0);
	/* f32 ids are refused */
	sd_tensor *fids = zeros(DIMS(3));
	CHECK_ERR(sd_embedding(out, fids, t1), "sd_embedding", "i32");
	FREE(table, t1, ids, out, fids);
}

/* ==== shape errors: a wrong `out` (or input) is -1 and a message naming the op ==== */

TEST(shape_errors)
{
	sd_tensor *x4 = rnd(DIMS(2, 4, 3, 5)), *w = rnd(DIMS(7, 5)), *b7 = rnd(DIMS(7)), *cw = rnd(DIMS(6, 4, 3, 3));
	sd_tensor *o = nans(DIMS(2, 4, 3, 6)), *o2 = nans(DIMS(2, 6, 3, 4)), *o3 = nans(DIMS(2, 4, 3, 5, 1));
	sd_tensor *g4 = rnd(DIMS(4)), *g5 = rnd(DIMS(5)), *g3 = rnd(DIMS(3));
	CHECK_ERR(sd_matmul(o, x4, w, 0, 1, 1, 0), "sd_matmul", NULL);
	CHECK_ERR(sd_linear(o, x4, w, b7), "sd_linear", "out has shape");
	CHECK_ERR(sd_linear(o, x4, cw, NULL), "sd_linear", "w");
	CHECK_ERR(sd_linear(o, x4, w, g4), "sd_linear", "b");
	CHECK_ERR(sd_conv2d(o2, x4, cw, NULL, 1, 1, 1, 1, 1), "sd_conv2d", "out has shape"); /* wants [2,6,3,5] */
	CHECK_ERR(sd_conv2d(o2, x4, cw, NULL, 2, 0, 1, 0, 1), "sd_conv2d", "out has shape"); /* wants [2,6,2,3] */
	CHECK_ERR(sd_conv2d(o2, o2, cw, NULL, 1, 1, 1, 1, 1), "sd_conv2d", "w");              /* x has 6 channels, w 4 */
	CHECK_ERR(sd_conv2d(o2, x4, cw, g4, 1, 1, 1, 1, 1), "sd_conv2d", "b");
	CHECK_ERR(sd_conv2d(o2, x4, cw, NULL, 0, 1, 1, 1, 1), "sd_conv2d", "stride");
	CHECK_ERR(sd_group_norm(o, x4, 2, NULL, NULL, 1e-5f, 0), "sd_group_norm", "out has shape");
	CHECK_ERR(sd_group_norm(o3, x4, 2, NULL, NULL, 1e-5f, 1), "sd_group_norm", "out has shape");
	CHECK_ERR(sd_group_norm(x4, x4, 3, NULL, NULL, 1e-5f, 0), "sd_group_norm", "groups");
	CHECK_ERR(sd_group_norm(x4, x4, 2, g5, NULL, 1e-5f, 0), "sd_group_norm", "gamma");
	CHECK_ERR(sd_layer_norm(o, x4, NULL, NULL, 1e-5f), "sd_layer_norm", "out has shape");
	CHECK_ERR(sd_layer_norm(x4, x4, g4, NULL, 1e-5f), "sd_layer_norm", "gamma");
	CHECK_ERR(sd_layer_norm(x4, x4, NULL, g3, 1e-5f), "sd_layer_norm", "beta");
	CHECK_ERR(sd_act(o, x4, SD_ACT_SILU), "sd_act", "out has shape");
	CHECK_ERR(sd_act(o3, x4, SD_ACT_GELU), "sd_act", "out has shape");
	CHECK_ERR(sd_geglu(o, o), "sd_geglu", "out has shape");   /* o is (…, 6): wants (…, 3) */
	CHECK_ERR(sd_geglu(o, x4), "sd_geglu", "even");           /* x4's last dim is 5 */
	CHECK_ERR(sd_add(o, x4, x4, 1, 1), "sd_add", "out has shape");
	CHECK_ERR(sd_mul(o, x4, x4), "sd_mul", "out has shape");
	CHECK_ERR(sd_softmax(o, x4), "sd_softmax", "out has shape");
	CHECK_ERR(sd_nchw_to_nlc(o, x4), "sd_nchw_to_nlc", "out has shape");
	sd_tensor *nlc = rnd(DIMS(2, 15, 4)), *nlc_bad = nans(DIMS(2, 4, 15)), *nchw_bad = nans(DIMS(2, 4, 4, 4));
	CHECK_ERR(sd_nchw_to_nlc(nlc_bad, x4), "sd_nchw_to_nlc", "out has shape");
	CHECK_ERR(sd_nlc_to_nchw(nchw_bad, nlc), "sd_nlc_to_nchw", "out");
	CHECK_ERR(sd_nlc_to_nchw(o, nlc), "sd_nlc_to_nchw", "out");
	CHECK_ERR(sd_upsample2x(o, x4), "sd_upsample2x", "out has shape");
	CHECK_ERR(sd_upsample2x(x4, x4), "sd_upsample2x", "out has shape");
	CHECK_ERR(sd_concat1(o, x4, x4), "sd_concat1", "out has shape");
	CHECK_ERR(sd_concat1(o2, x4, o), "sd_concat1", "must match");
	sd_tensor *q = rnd(DIMS(2, 3, 8)), *k = rnd(DIMS(2, 5, 8)), *v = rnd(DIMS(2, 5, 6));
	sd_tensor *ao = nans(DIMS(2, 3, 6)), *ao_bad = nans(DIMS(2, 3, 8)), *pr_bad = nans(DIMS(2, 2, 3, 4));
	CHECK_ERR(sd_attention(ao_bad, q, k, v, 2, 0.5f, 0, NULL), "sd_attention", "out has shape");
	CHECK_ERR(sd_attention(ao, q, k, v, 2, 0.5f, 0, pr_bad), "sd_attention", "shape");
	CHECK_ERR(sd_attention(ao, q, q, v, 2, 0.5f, 0, NULL), "sd_attention", "v"); /* v's L is not k's */
	CHECK_ERR(sd_attention(ao, q, v, v, 2, 0.5f, 0, NULL), "sd_attention", "k"); /* k's features are not q's */
	sd_tensor *table = rnd(DIMS(5, 3)), *ids = sd_tensor_new(SD_DTYPE_I32, DIMS(2, 2)), *eo = nans(DIMS(2, 2, 4));
	CHECK_ERR(sd_embedding(eo, ids, table), "sd_embedding", "out has shape");
	/* a non-f32 tensor is named */
	sd_tensor *i4 = sd_tensor_new(SD_DTYPE_I32, DIMS(2, 4, 3, 5));
	CHECK_ERR(sd_act(x4, i4, SD_ACT_SILU), "sd_act", "expected f32");
	CHECK_ERR(sd_group_norm(i4, x4, 2, NULL, NULL, 1e-5f, 0), "sd_group_norm", "expected f32");
	FREE(x4, w, b7, cw, o, o2, o3, g4, g5, g3, nlc, nlc_bad, nchw_bad, q, k, v, ao, ao_bad, pr_bad, table, ids, eo, i4);
}

/* ==== CUDA against CPU ==== */

static char cuda_ran[512], cuda_missing[512];

static sd_tensor *gpu(const sd_tensor *t)
{
	return t ? sd_tensor_to_device(t, SD_DEVICE_CUDA) : NULL;
}

/* rc/dev_out from the CUDA call, want = the CPU op's result */
static void cuda_compare(const char *label, const char *op, int rc, const sd_tensor *dev_out, const sd_tensor *want,
                         double rtol)
{
	char *list = rc == 0 ? cuda_ran : cuda_missing;
	size_t used = strlen(list);
	snprintf(list + used, 512 - used, "%s%s", used ? ", " : "", label);
	if (rc != 0) {
		const char *m = sd_errmsg();
		if (!strstr(m, "not implemented on cuda") || !strstr(m, op)) {
			printf("  %s on cuda: unexpected error '%s'\n", label, m);
			test_failed_++;
		}
		return;
	}
	sd_tensor *got = sd_tensor_to_device(dev_out, SD_DEVICE_CPU);
	CHECK(got != NULL && sd_tensor_same_shape(got, want));
	if (got) {
		printf("  %s cuda vs cpu:\n", label);
		CHECK_CLOSE(F(got), F(want), N_(want), rtol);
	}
	sd_tensor_free(got);
}

/* the output both devices start from (NaN) */
#define OUTS(...) sd_tensor *co = nans(DIMS(__VA_ARGS__)), *go = gpu(co)

TEST(ops_cuda_vs_cpu)
{
	if (!sd_cuda_available()) SKIP("no GPU: %s", sd_errmsg());
	cuda_ran[0] = cuda_missing[0] = 0;
	sd_tensor *x = rnd(DIMS(2, 8, 9, 7)), *gx = gpu(x);
	{ /* matmul */
		sd_tensor *a = rnd(DIMS(3, 33, 65)), *b = rnd(DIMS(65, 17)), *ga = gpu(a), *gb = gpu(b);
		OUTS(3, 33, 17);
		CHECK_OK(sd_matmul(co, a, b, 0, 0, 1.0f, 0.0f));
		cuda_compare("matmul", "sd_matmul", sd_matmul(go, ga, gb, 0, 0, 1.0f, 0.0f), go, co, 1e-5);
		FREE(a, b, ga, gb, co, go);
	}
	for (int bias = 0; bias < 2; bias++) { /* linear */
		sd_tensor *w = rnd(DIMS(5, 7)), *b = bias ? rnd(DIMS(5)) : NULL, *gw = gpu(w), *gb = gpu(b);
		OUTS(2, 8, 9, 5);
		CHECK_OK(sd_linear(co, x, w, b));
		cuda_compare(bias ? "linear+bias" : "linear", "sd_linear", sd_linear(go, gx, gw, gb), go, co, 1e-5);
		FREE(w, b, gw, gb, co, go);
	}
	{ /* conv2d: 3×3 pad 1, and stride 2 with (0,1,0,1) */
		sd_tensor *w = rnd(DIMS(5, 8, 3, 3)), *b = rnd(DIMS(5)), *gw = gpu(w), *gb = gpu(b);
		OUTS(2, 5, 9, 7);
		CHECK_OK(sd_conv2d(co, x, w, b, 1, 1, 1, 1, 1));
		cuda_compare("conv2d", "sd_conv2d", sd_conv2d(go, gx, gw, gb, 1, 1, 1, 1, 1), go, co, 1e-4);
		sd_tensor *co2 = nans(DIMS(2, 5, 4, 3)), *go2 = gpu(co2);
		CHECK_OK(sd_conv2d(co2, x, w, b, 2, 0, 1, 0, 1));
		cuda_compare("conv2d/s2", "sd_conv2d", sd_conv2d(go2, gx, gw, gb, 2, 0, 1, 0, 1), go2, co2, 1e-4);
		FREE(w, b, gw, gb, co, go, co2, go2);
	}
	for (int silu = 0; silu < 2; silu++) { /* group norm */
		sd_tensor *g = rnd(DIMS(8)), *b = rnd(DIMS(8)), *gg = gpu(g), *gb = gpu(b);
		OUTS(2, 8, 9, 7);
		CHECK_OK(sd_group_norm(co, x, 4, g, b, 1e-6f, silu));
		cuda_compare(silu ? "group_norm+silu" : "group_norm", "sd_group_norm",
		             sd_group_norm(go, gx, 4, gg, gb, 1e-6f, silu), go, co, 1e-5);
		FREE(g, b, gg, gb, co, go);
	}
	{ /* layer norm */
		sd_tensor *g = rnd(DIMS(7)), *b = rnd(DIMS(7)), *gg = gpu(g), *gb = gpu(b);
		OUTS(2, 8, 9, 7);
		CHECK_OK(sd_layer_norm(co, x, g, b, 1e-5f));
		cuda_compare("layer_norm", "sd_layer_norm", sd_layer_norm(go, gx, gg, gb, 1e-5f), go, co, 1e-5);
		FREE(g, b, gg, gb, co, go);
	}
	for (int a = 0; a < SD_ACT_COUNT; a++) { /* activations */
		OUTS(2, 8, 9, 7);
		CHECK_OK(sd_act(co, x, (enum sd_act)a));
		char label[32];
		snprintf(label, sizeof label, "act/%s", act_name[a]);
		cuda_compare(label, "sd_act", sd_act(go, gx, (enum sd_act)a), go, co, 1e-5);
		FREE(co, go);
	}
	{ /* geglu */
		sd_tensor *gx2 = rnd(DIMS(3, 5, 12)), *ggx2 = gpu(gx2);
		OUTS(3, 5, 6);
		CHECK_OK(sd_geglu(co, gx2));
		cuda_compare("geglu", "sd_geglu", sd_geglu(go, ggx2), go, co, 1e-5);
		FREE(gx2, ggx2, co, go);
	}
	{ /* add (the three forms), scale, mul */
		sd_tensor *b1 = rnd(DIMS(2, 8, 9, 7)), *b2 = rnd(DIMS(9, 7)), *b3 = rnd(DIMS(2, 8));
		sd_tensor *bs[3] = {b1, b2, b3};
		const char *labels[3] = {"add", "add/trailing", "add/(N,C)"};
		for (int i = 0; i < 3; i++) {
			sd_tensor *gb = gpu(bs[i]);
			OUTS(2, 8, 9, 7);
			CHECK_OK(sd_add(co, x, bs[i], 0.5f, -2.0f));
			cuda_compare(labels[i], "sd_add", sd_add(go, gx, gb, 0.5f, -2.0f), go, co, 1e-5);
			FREE(gb, co, go);
		}
		OUTS(2, 8, 9, 7);
		CHECK_OK(sd_scale(co, x, 0.3f));
		cuda_compare("scale", "sd_", sd_scale(go, gx, 0.3f), go, co, 1e-5);
		sd_tensor *gb1 = gpu(b1);
		CHECK_OK(sd_mul(co, x, b1));
		cuda_compare("mul", "sd_mul", sd_mul(go, gx, gb1), go, co, 1e-5);
		FREE(b1, b2, b3, gb1, co, go);
	}
	{ /* softmax */
		OUTS(2, 8, 9, 7);
		CHECK_OK(sd_softmax(co, x));
		cuda_compare("softmax", "sd_softmax", sd_softmax(go, gx), go, co, 1e-5);
		FREE(co, go);
	}
	for (int causal = 0; causal < 2; causal++) { /* attention */
		sd_tensor *q = rnd(DIMS(2, 13, 12)), *k = rnd(DIMS(2, 17, 12)), *v = rnd(DIMS(2, 17, 9));
		sd_tensor *gq = gpu(q), *gk = gpu(k), *gv = gpu(v);
		sd_tensor *cp = nans(DIMS(2, 3, 13, 17)), *gp = gpu(cp);
		OUTS(2, 13, 9);
		CHECK_OK(sd_attention(co, q, k, v, 3, 0.5f, causal, cp));
		int rc = sd_attention(go, gq, gk, gv, 3, 0.5f, causal, gp);
		cuda_compare(causal ? "attention/causal" : "attention", "sd_attention", rc, go, co, 1e-4);
		if (rc == 0) cuda_compare("attention/probs", "sd_attention", rc, gp, cp, 1e-4);
		FREE(q, k, v, gq, gk, gv, cp, gp, co, go);
	}
	{ /* layout, upsample, concat */
		OUTS(2, 63, 8);
		CHECK_OK(sd_nchw_to_nlc(co, x));
		cuda_compare("nchw_to_nlc", "sd_nchw_to_nlc", sd_nchw_to_nlc(go, gx), go, co, 0);
		sd_tensor *y = rnd(DIMS(2, 63, 8)), *gy = gpu(y), *c2 = nans(DIMS(2, 8, 7, 9)), *g2 = gpu(c2);
		CHECK_OK(sd_nlc_to_nchw(c2, y));
		cuda_compare("nlc_to_nchw", "sd_nlc_to_nchw", sd_nlc_to_nchw(g2, gy), g2, c2, 0);
		sd_tensor *c3 = nans(DIMS(2, 8, 18, 14)), *g3 = gpu(c3);
		CHECK_OK(sd_upsample2x(c3, x));
		cuda_compare("upsample2x", "sd_upsample2x", sd_upsample2x(g3, gx), g3, c3, 0);
		sd_tensor *z = rnd(DIMS(2, 3, 9, 7)), *gz = gpu(z), *c4 = nans(DIMS(2, 11, 9, 7)), *g4 = gpu(c4);
		CHECK_OK(sd_concat1(c4, x, z));
		cuda_compare("concat1", "sd_concat1", sd_concat1(g4, gx, gz), g4, c4, 0);
		FREE(co, go, y, gy, c2, g2, c3, g3, z, gz, c4, g4);
	}
	{ /* embedding */
		sd_tensor *table = rnd(DIMS(10, 6)), *ids = sd_tensor_new(SD_DTYPE_I32, DIMS(2, 5));
		for (int i = 0; i < 10; i++) ((int32_t *)ids->data)[i] = (i * 7) % 10;
		sd_tensor *gt = gpu(table), *gi = gpu(ids);
		OUTS(2, 5, 6);
		CHECK_OK(sd_embedding(co, ids, table));
		cuda_compare("embedding", "sd_embedding", sd_embedding(go, gi, gt), go, co, 0);
		FREE(table, ids, gt, gi, co, go);
	}
	printf("  ran on cuda: %s\n", cuda_ran[0] ? cuda_ran : "(none)");
	printf("  not implemented on cuda: %s\n", cuda_missing[0] ? cuda_missing : "(none)");
	FREE(x, gx);
}

/* Weights kept as stored (sd_weights_load_stored): an f16 or bf16 weight in sd_linear, sd_conv2d (3x3, the
 * packed path, and 1x1), sd_embedding and sd_add's b gives exactly the numbers of that weight widened to
 * f32 first (bit for bit: the widening is exact and the f32 path is then the same). */
TEST(stored_dtype_weights)
{
	const enum sd_dtype dts[2] = {SD_DTYPE_F16, SD_DTYPE_BF16};
	for (int k = 0; k < 2; k++) {
		sd_tensor *x = rnd(DIMS(3, 40)), *w32 = rnd(DIMS(24, 40)), *b = rnd(DIMS(24));
		sd_tensor *wh = sd_tensor_convert(w32, dts[k]), *ww = sd_tensor_convert(wh, SD_DTYPE_F32);
		sd_tensor *o1 = nans(DIMS(3, 24)), *o2 = nans(DIMS(3, 24));
		CHECK_OK(sd_linear(o1, x, wh, b));
		CHECK_OK(sd_linear(o2, x, ww, b));
		CHECK(!memcmp(o1->data, o2->data, sd_tensor_nbytes(o1)));
		FREE(x, w32, b, wh, ww, o1, o2);
		for (int ks = 1; ks <= 3; ks += 2) {
			sd_tensor *xi = rnd(DIMS(2, 5, 9, 7)), *c32 = rnd(DIMS(6, 5, ks, ks)), *cb = rnd(DIMS(6));
			sd_tensor *ch = sd_tensor_convert(c32, dts[k]), *cw = sd_tensor_convert(ch, SD_DTYPE_F32);
			cw->owns = 1; /* an owned f32 weight: the cached packing */
			sd_tensor *p1 = nans(DIMS(2, 6, 9, 7)), *p2 = nans(DIMS(2, 6, 9, 7));
			CHECK_OK(sd_conv2d(p1, xi, ch, cb, 1, ks / 2, ks / 2, ks / 2, ks / 2));
			CHECK_OK(sd_conv2d(p2, xi, cw, cb, 1, ks / 2, ks / 2, ks / 2, ks / 2));
			CHECK(!memcmp(p1->data, p2->data, sd_tensor_nbytes(p1)));
			FREE(xi, c32, cb, ch, cw, p1, p2);
		}
		sd_tensor *t32 = rnd(DIMS(10, 6)), *ids = sd_tensor_new(SD_DTYPE_I32, DIMS(2, 5));
		for (int i = 0; i < 10; i++) ((int32_t *)ids->data)[i] = (i * 7) % 10;
		sd_tensor *th = sd_tensor_convert(t32, dts[k]), *tw = sd_tensor_convert(th, SD_DTYPE_F32);
		sd_tensor *e1 = nans(DIMS(2, 5, 6)), *e2 = nans(DIMS(2, 5, 6));
		CHECK_OK(sd_embedding(e1, ids, th));
		CHECK_OK(sd_embedding(e2, ids, tw));
		CHECK(!memcmp(e1->data, e2->data, sd_tensor_nbytes(e1)));
		((int32_t *)ids->data)[3] = 10;
		CHECK(sd_embedding(e1, ids, th) != 0 && strstr(sd_errmsg(), "outside [0, 10)"));
		sd_tensor *a = rnd(DIMS(2, 10, 6)), *s1 = nans(DIMS(2, 10, 6)), *s2 = nans(DIMS(2, 10, 6));
		CHECK_OK(sd_add(s1, a, th, 1.0f, 1.0f));
		CHECK_OK(sd_add(s2, a, tw, 1.0f, 1.0f));
		CHECK(!memcmp(s1->data, s2->data, sd_tensor_nbytes(s1)));
		/* widened in place: same values, f32, owned */
		CHECK_OK(sd_tensor_widen(th));
		CHECK(th->dtype == SD_DTYPE_F32 && !memcmp(th->data, tw->data, sd_tensor_nbytes(tw)));
		FREE(t32, ids, th, tw, e1, e2, a, s1, s2);
	}
	/* other ops keep asking for f32 */
	sd_tensor *h = sd_tensor_new(SD_DTYPE_F16, DIMS(4)), *o = nans(DIMS(4));
	CHECK(sd_scale(o, h, 2.0f) != 0 && strstr(sd_errmsg(), "expected f32"));
	FREE(h, o);
}

int main(void)
{
	RUN(matmul);
	RUN(linear);
	RUN(linear_bias_does_not_read_out);
	RUN(conv2d);
	RUN(conv2d_im2col);
	RUN(group_norm);
	RUN(layer_norm);
	RUN(act);
	RUN(geglu);
	RUN(add);
	RUN(scale);
	RUN(mul);
	RUN(softmax);
	RUN(attention);
	RUN(layout);
	RUN(upsample2x);
	RUN(concat1);
	RUN(embedding);
	RUN(stored_dtype_weights);
	RUN(shape_errors);
	RUN(ops_cuda_vs_cpu);
	return test_summary();
}
