/*
 * cpu/backward.c - the CPU backend's training slots (lib/backend.h, "training"): the backward of the
 * ops that are not GEMM-shaped, the loss, dropout masks and the Adam update.  The derivatives are those
 * of the forwards in cpu/kernels.c (torch's definitions); statistics and row sums accumulate in double.
 * Slots with `acc` overwrite (0) or add to (1) the input gradient; parameter gradients always add.
 */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "../backend.h"
#include "cpu.h"

#define PAR(work) ((work) >= ((int64_t)1 << 15))

static inline float put(float old, float v, int acc)
{
	return acc ? old + v : v;
}

static inline float sigmoidf_(float v)
{
	return 1.0f / (1.0f + expf(-v));
}

/* d silu(y)/dy = σ(y)·(1 + y·(1 − σ(y))) */
static inline float dsilu(float y)
{
	float s = sigmoidf_(y);
	return s * (1.0f + y * (1.0f - s));
}

/* d gelu(x)/dx for the erf form: Φ(x) + x·φ(x) */
static inline float dgelu_erf(float x)
{
	return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * expf(-0.5f * x * x);
}

static inline float gelu_erf(float x)
{
	return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

/* ==== convolution: input gradient ==== */

#define COL_TILE_BYTES ((size_t)32 << 20)

/*
 * Stride 1 with pads below the kernel size: dx is the convolution of dy with the weight transposed to
 * (C, O, kh, kw) and flipped in both spatial axes, padded by k−1−pad: the forward conv slot does it.
 * Otherwise (stride 2): per image and tile of output pixels, col (C·kh·kw, n) = wᵀ · dy, scattered back
 * onto the input positions each column entry came from (col2im).
 */
int sd_cpu_conv2d_backward_input(float *dx, const float *dy, const float *w, int64_t N, int64_t C, int64_t H,
                                 int64_t W, int64_t O, int kh, int kw, int stride, int pt, int pl, int64_t Ho,
                                 int64_t Wo, int acc)
{
	int64_t K = C * kh * kw, P = Ho * Wo, taps = (int64_t)kh * kw;
	if (N == 0 || C == 0 || H == 0 || W == 0) return 0;
	if (O == 0 || P == 0) {
		if (!acc) memset(dx, 0, (size_t)(N * C * H * W) * sizeof(float));
		return 0;
	}
	int64_t pb = (Ho - 1) + kh - H - pt, pr = (Wo - 1) + kw - W - pl; /* what the forward's pads reached */
	if (stride == 1 && pt <= kh - 1 && pl <= kw - 1 && pb >= 0 && pb <= kh - 1 && pr >= 0 && pr <= kw - 1) {
		float *wt = sd_cpu_scratch(4, (size_t)(K * O) * sizeof(float));
		if (!wt) return -1;
		#pragma omp parallel for schedule(static) if(PAR(K * O))
		for (int64_t c = 0; c < C; c++)
			for (int64_t o = 0; o < O; o++)
				for (int64_t t = 0; t < taps; t++)
					wt[(c * O + o) * taps + (taps - 1 - t)] = w[(o * C + c) * taps + t];
		float *dst = dx;
		if (acc && !(dst = sd_cpu_scratch(5, (size_t)(N * C * H * W) * sizeof(float)))) return -1;
		if (sd_cpu_backend.conv2d(dst, dy, wt, NULL, NULL, N, O, Ho, Wo, C, kh, kw, 1, kh - 1 - pt, kw - 1 - pl, H,
		                          W))
			return -1;
		if (acc) {
			int64_t n = N * C * H * W;
			#pragma omp parallel for simd schedule(static) if(PAR(n))
			for (int64_t i = 0; i < n; i++) dx[i] += dst[i];
		}
		return 0;
	}
	int64_t tile = (int64_t)(COL_TILE_BYTES / sizeof(float)) / K;
	if (tile < 64) tile = 64;
	if (tile > P) tile = P;
	float *col = sd_cpu_scratch(4, (size_t)(K * tile) * sizeof(float));
	if (!col) return -1;
	if (!acc) memset(dx, 0, (size_t)(N * C * H * W) * sizeof(float));
	for (int64_t n = 0; n < N; n++)
		for (int64_t p0 = 0; p0 < P; p0 += tile) {
			int64_t nc = P - p0 < tile ? P - p0 : tile;
			cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)K, (int)nc, (int)O, 1.0f, w, (int)K,
			            dy + n * O * P + p0, (int)P, 0.0f, col, (int)nc);
			/* one channel per thread: its taps all land in its own plane */
			#pragma omp parallel for schedule(static) if(PAR(K * nc))
			for (int64_t c = 0; c < C; c++) {
				float *xc = dx + (n * C + c) * H * W;
				for (int64_t t = 0; t < taps; t++) {
					int64_t ky = t / kw, kx = t % kw;
					const float *src = col + (c * taps + t) * nc;
					for (int64_t p = 0; p < nc; p++) {
						int64_t oy = (p0 + p) / Wo, ox = (p0 + p) % Wo;
						int64_t iy = oy * stride - pt + ky, ix = ox * stride - pl + kx;
						if (iy >= 0 && iy < H && ix >= 0 && ix < W) xc[iy * W + ix] += src[p];
					}
				}
			}
		}
	return 0;
}

/* ==== normalisation ==== */

/*
 * GroupNorm: with x̂ = (x − μ)·rstd over a group of n = (C/groups)·S values, y = x̂·γ + β and z = silu(y)
 * when fused, gy = dz·silu'(y) (or dz), gx̂ = gy·γ:
 *   dx = rstd · (gx̂ − mean(gx̂) − x̂ · mean(gx̂ · x̂)),   dγ += Σ gy·x̂,   dβ += Σ gy.
 * μ and rstd are recomputed exactly as the forward computes them.
 */
int sd_cpu_group_norm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                               const float *gamma, const float *beta, int64_t N, int64_t C, int64_t S, int groups,
                               float eps, int silu, int acc)
{
	int64_t cg = C / groups;
	double *pg = NULL, *pb = NULL; /* per (n, c) partial sums for dγ, dβ */
	if (dgamma || dbeta) {
		pg = calloc((size_t)(2 * N * C), sizeof(double));
		if (!pg) return sd_seterr("out of memory");
		pb = pg + N * C;
	}
	#pragma omp parallel for collapse(2) schedule(static) if(PAR(N * C * S))
	for (int64_t n = 0; n < N; n++)
		for (int g = 0; g < groups; g++) {
			const float *xs = x + (n * C + g * cg) * S, *gs = dy + (n * C + g * cg) * S;
			float *ds = dx + (n * C + g * cg) * S;
			int64_t cnt = cg * S;
			double sum = 0, var = 0;
			for (int64_t i = 0; i < cnt; i++) sum += xs[i];
			double mean = sum / (double)cnt;
			for (int64_t i = 0; i < cnt; i++) {
				double d = xs[i] - mean;
				var += d * d;
			}
			var /= (double)cnt;
			float rstd = (float)(1.0 / sqrt(var + eps)), m = (float)mean;
			double s1 = 0, s2 = 0;
			for (int64_t c = 0; c < cg; c++) {
				int64_t ch = g * cg + c;
				float ga = gamma ? gamma[ch] : 1.0f, be = beta ? beta[ch] : 0.0f, a = rstd * ga, bb = be - m * a;
				double cg_ = 0, cb_ = 0;
				for (int64_t i = 0; i < S; i++) {
					float xv = xs[c * S + i], gy = gs[c * S + i];
					if (silu) gy *= dsilu(xv * a + bb);
					float xh = (xv - m) * rstd;
					s1 += (double)gy * ga;
					s2 += (double)gy * ga * xh;
					cg_ += (double)gy * xh;
					cb_ += gy;
				}
				if (pg) {
					pg[n * C + ch] = cg_;
					pb[n * C + ch] = cb_;
				}
			}
			float m1 = (float)(s1 / (double)cnt), m2 = (float)(s2 / (double)cnt);
			for (int64_t c = 0; c < cg; c++) {
				int64_t ch = g * cg + c;
				float ga = gamma ? gamma[ch] : 1.0f, be = beta ? beta[ch] : 0.0f, a = rstd * ga, bb = be - m * a;
				for (int64_t i = 0; i < S; i++) {
					int64_t k = c * S + i;
					float xv = xs[k], gy = gs[k];
					if (silu) gy *= dsilu(xv * a + bb);
					float xh = (xv - m) * rstd;
					ds[k] = put(ds[k], rstd * (gy * ga - m1 - xh * m2), acc);
				}
			}
		}
	if (pg) {
		for (int64_t c = 0; c < C; c++) {
			double sg = 0, sb = 0;
			for (int64_t n = 0; n < N; n++) {
				sg += pg[n * C + c];
				sb += pb[n * C + c];
			}
			if (dgamma) dgamma[c] += (float)sg;
			if (dbeta) dbeta[c] += (float)sb;
		}
		free(pg);
	}
	return 0;
}

/* LayerNorm over rows of D: the same formula per row; dγ, dβ summed over the rows. */
int sd_cpu_layer_norm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                               const float *gamma, int64_t rows, int64_t D, float eps, int acc)
{
	float *stat = NULL; /* (mean, rstd) per row, kept for dγ */
	if ((dgamma || dbeta) && !(stat = malloc((size_t)(2 * rows) * sizeof(float)))) return sd_seterr("out of memory");
	#pragma omp parallel for schedule(static) if(PAR(rows * D))
	for (int64_t r = 0; r < rows; r++) {
		const float *xr = x + r * D, *gr = dy + r * D;
		float *dr = dx + r * D;
		double sum = 0, var = 0;
		for (int64_t i = 0; i < D; i++) sum += xr[i];
		double mean = sum / (double)D;
		for (int64_t i = 0; i < D; i++) {
			double d = xr[i] - mean;
			var += d * d;
		}
		float rstd = (float)(1.0 / sqrt(var / (double)D + eps)), m = (float)mean;
		if (stat) {
			stat[2 * r] = m;
			stat[2 * r + 1] = rstd;
		}
		double s1 = 0, s2 = 0;
		for (int64_t i = 0; i < D; i++) {
			float gxh = gr[i] * (gamma ? gamma[i] : 1.0f), xh = (xr[i] - m) * rstd;
			s1 += gxh;
			s2 += (double)gxh * xh;
		}
		float m1 = (float)(s1 / (double)D), m2 = (float)(s2 / (double)D);
		for (int64_t i = 0; i < D; i++) {
			float gxh = gr[i] * (gamma ? gamma[i] : 1.0f), xh = (xr[i] - m) * rstd;
			dr[i] = put(dr[i], rstd * (gxh - m1 - xh * m2), acc);
		}
	}
	if (stat) {
		#pragma omp parallel for schedule(static) if(PAR(rows * D))
		for (int64_t i = 0; i < D; i++) {
			double sg = 0, sb = 0;
			for (int64_t r = 0; r < rows; r++) {
				float g = dy[r * D + i];
				sg += (double)g * ((x[r * D + i] - stat[2 * r]) * stat[2 * r + 1]);
				sb += g;
			}
			if (dgamma) dgamma[i] += (float)sg;
			if (dbeta) dbeta[i] += (float)sb;
		}
		free(stat);
	}
	return 0;
}

/* ==== elementwise ==== */

static inline float dact(float v, enum sd_act act)
{
	switch (act) {
	case SD_ACT_SILU:
		return dsilu(v);
	case SD_ACT_GELU:
		return dgelu_erf(v);
	case SD_ACT_GELU_TANH: {
		const float c = 0.7978845608028654f, k = 0.044715f;
		float t = tanhf(c * (v + k * v * v * v));
		return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * c * (1.0f + 3.0f * k * v * v);
	}
	case SD_ACT_QUICK_GELU: {
		float s = sigmoidf_(1.702f * v);
		return s + 1.702f * v * s * (1.0f - s);
	}
	default:
		return NAN;
	}
}

int sd_cpu_act_backward(float *dx, const float *dy, const float *x, int64_t n, enum sd_act act, int acc)
{
	if ((unsigned)act >= SD_ACT_COUNT) return sd_seterr("unknown activation %d", (int)act);
	#pragma omp parallel for schedule(static) if(PAR(n))
	for (int64_t i = 0; i < n; i++) dx[i] = put(dx[i], dy[i] * dact(x[i], act), acc);
	return 0;
}

/* out = a·gelu(g): da = dy·gelu(g), dg = dy·a·gelu'(g) */
int sd_cpu_geglu_backward(float *dx, const float *dy, const float *x, int64_t rows, int64_t F, int acc)
{
	#pragma omp parallel for schedule(static) if(PAR(rows * F))
	for (int64_t r = 0; r < rows; r++) {
		const float *a = x + r * 2 * F, *g = a + F, *d = dy + r * F;
		float *da = dx + r * 2 * F, *dg = da + F;
		for (int64_t i = 0; i < F; i++) {
			da[i] = put(da[i], d[i] * gelu_erf(g[i]), acc);
			dg[i] = put(dg[i], d[i] * a[i] * dgelu_erf(g[i]), acc);
		}
	}
	return 0;
}

int sd_cpu_softmax_backward(float *dx, const float *dy, const float *y, int64_t rows, int64_t cols, int64_t ld,
                            float scale, int acc)
{
	#pragma omp parallel for schedule(static) if(PAR(rows * cols))
	for (int64_t r = 0; r < rows; r++) {
		const float *g = dy + r * ld, *p = y + r * ld;
		float *d = dx + r * ld;
		double dot = 0;
		for (int64_t j = 0; j < cols; j++) dot += (double)g[j] * p[j];
		float dt = (float)dot;
		for (int64_t j = 0; j < cols; j++) d[j] = put(d[j], scale * p[j] * (g[j] - dt), acc);
	}
	return 0;
}

int sd_cpu_upsample2x_backward(float *dx, const float *dy, int64_t P, int64_t H, int64_t W, int acc)
{
	#pragma omp parallel for collapse(2) schedule(static) if(PAR(P * H * W * 4))
	for (int64_t p = 0; p < P; p++)
		for (int64_t y = 0; y < H; y++) {
			const float *s0 = dy + (p * 2 * H + 2 * y) * 2 * W, *s1 = s0 + 2 * W;
			float *d = dx + (p * H + y) * W;
			for (int64_t i = 0; i < W; i++)
				d[i] = put(d[i], (s0[2 * i] + s0[2 * i + 1]) + (s1[2 * i] + s1[2 * i + 1]), acc);
		}
	return 0;
}

int sd_cpu_reduce(float *out, const float *x, int64_t A, int64_t m, int64_t S, float alpha, int acc)
{
	#pragma omp parallel for schedule(static) if(PAR(A * m * S))
	for (int64_t j = 0; j < m; j++) {
		double s = 0;
		for (int64_t a = 0; a < A; a++) {
			const float *xs = x + (a * m + j) * S;
			for (int64_t k = 0; k < S; k++) s += xs[k];
		}
		out[j] = put(out[j], alpha * (float)s, acc);
	}
	return 0;
}

/* z = μ + σ·ε, σ = exp(½·lv), lv = clamp(logvar, −30, 20): dμ = dz, dlogvar = dz·ε·½σ inside the clamp
 * range (torch's clamp passes the gradient where min ≤ x ≤ max), 0 outside. */
int sd_cpu_gaussian_sample_backward(float *dmom, const float *dz, const float *mom, const float *eps, int64_t N,
                                    int64_t C, int64_t S, int acc)
{
	#pragma omp parallel for collapse(2) schedule(static) if(PAR(N * C * S))
	for (int64_t n = 0; n < N; n++)
		for (int64_t c = 0; c < C; c++) {
			const float *g = dz + (n * C + c) * S, *e = eps + (n * C + c) * S;
			const float *lv = mom + (n * 2 * C + C + c) * S;
			float *dm = dmom + (n * 2 * C + c) * S, *dl = dmom + (n * 2 * C + C + c) * S;
			for (int64_t i = 0; i < S; i++) {
				float l = lv[i], inside = l >= -30.0f && l <= 20.0f;
				float sd = expf(0.5f * fminf(fmaxf(l, -30.0f), 20.0f));
				dm[i] = put(dm[i], g[i], acc);
				dl[i] = put(dl[i], inside ? g[i] * e[i] * 0.5f * sd : 0.0f, acc);
			}
		}
	return 0;
}

/* ==== loss ==== */

int sd_cpu_mse_loss(double *loss, float *dpred, const float *pred, const float *target, const float *w, int64_t N,
                    int64_t per, float gscale)
{
	double total = 0, numel = (double)N * (double)per;
	for (int64_t n = 0; n < N; n++) {
		double wn = w ? w[n] : 1.0, s = 0;
		float k = (float)(2.0 * gscale * wn / numel);
		const float *p = pred + n * per, *t = target + n * per;
		float *d = dpred ? dpred + n * per : NULL;
		#pragma omp parallel for reduction(+ : s) schedule(static) if(PAR(per))
		for (int64_t i = 0; i < per; i++) {
			float e = p[i] - t[i];
			s += (double)e * e;
			if (d) d[i] = k * e;
		}
		total += wn * s;
	}
	if (loss) *loss = numel > 0 ? total / numel : NAN;
	return 0;
}

/* ==== dropout ==== */

static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* The uniform of element i: splitmix64's finaliser over a key made from (seed, stream), 24 bits as
 * torch.rand keeps them.  Counter-based: any element, any order, any device gives the same value. */
int sd_cpu_dropout_mask(float *mask, int64_t n, float p, uint64_t seed, uint64_t stream)
{
	uint64_t key = mix64(seed + 0x9e3779b97f4a7c15ull * (mix64(stream) | 1));
	float keep = (float)(1.0 - (double)p), val = 1.0f / keep;
	#pragma omp parallel for schedule(static) if(PAR(n))
	for (int64_t i = 0; i < n; i++) {
		float u = (float)(mix64(key + 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1)) >> 40) * (1.0f / 16777216.0f);
		mask[i] = u < keep ? val : 0.0f;
	}
	return 0;
}

/* ==== optimizer ==== */

/*
 * torch.optim's single-tensor Adam/AdamW, operation by operation as its CPU kernels round them:
 * exp_avg.mul_(β1).add_(g, alpha=1−β1) and the L2 term g.add(p, alpha=wd) are fused multiply-adds
 * (torch's add kernel is vec::fmadd(other, alpha, self)), exp_avg_sq.mul_(β2).addcmul_(g, g, value=1−β2)
 * rounds value·g and fuses the rest; sqrt, div, add_(eps) and addcdiv_ are separate float operations.
 * Checked bit for bit against torch's numbers (tests/unit/test_backward.c, adamw_golden).
 */
int sd_cpu_adam_step(float *p, const float *g, float *m, float *v, int64_t n, const struct sd_adam_coef *k)
{
	const struct sd_adam_coef c = *k;
	#pragma omp parallel for schedule(static) if(PAR(n * 8))
	for (int64_t i = 0; i < n; i++) {
		float pv = p[i], gv = g[i];
		if (c.decay != 1.0f) pv = pv * c.decay;
		if (c.wd != 0.0f) gv = fmaf(pv, c.wd, gv);
		float mv = fmaf(gv, c.c1, m[i] * c.b1);
		float vv = fmaf(c.c2 * gv, gv, v[i] * c.b2);
		float denom = sqrtf(vv) / c.bc2_sqrt + c.eps;
		m[i] = mv;
		v[i] = vv;
		p[i] = pv + (c.neg_step * mv) / denom;
	}
	return 0;
}

int sd_cpu_sumsq(double *out, const float *x, int64_t n)
{
	double s = 0;
	#pragma omp parallel for reduction(+ : s) schedule(static) if(PAR(n))
	for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
	*out = s;
	return 0;
}
