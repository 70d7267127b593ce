/*
 * cpu/attention.c - the CPU backend's fused attention slot: softmax(scale · q kᵀ) v per head with an
 * online softmax over blocks of keys (after FlashAttention, Dao et al. 2022), so the Lq × Lk scores never
 * leave L1 and are never stored whole.  sd_attention (lib/ops.c) calls it when no `probs` are asked for;
 * the GEMM path there stays the reference it is tested against (tests/unit/test_attention.c).
 *
 * Every vector runs along queries: q is packed per head in blocks of BQ queries transposed, qt (d, BQ),
 * and for each block of keys
 *   scores   sᵀ (keys, BQ) = scale · K_blk · qt      a tile of R keys × BQ lanes in registers, d the loop
 *   softmax  lane-wise: the running max m, sum l and the rescale exp(m_old − m_new) are vectors, with no
 *            horizontal reductions; pᵀ = exp(sᵀ − m) in place
 *   output   oᵀ (dv, BQ) = oᵀ · rescale + V_blkᵀ · pᵀ   a tile of E output features × BQ lanes in registers
 * and out = oᵀ / l transposed back at the end.  d and dv are plain loop counts (no vector tails); only the
 * last query block has idle lanes.  K is packed per head in panels of R keys ([c][r]: the score kernel
 * broadcasts from one stream) and V per head with rows padded to a multiple of E; the packing, once per
 * call, is O(L·C) against O(L²·C) of work.  A task is one (image, head, group of query blocks), run on
 * one thread in a fixed order, so the result does not depend on the thread count.  The causal mask
 * skips key blocks wholly above the diagonal and masks the diagonal ones (probability exactly 0).
 *
 * Kernels: AVX-512 (BQ = 48 as 3 vectors, R = E = 8: 24 accumulators of 32 registers) when the CPU has
 * it, else AVX2 + FMA (the build's baseline: BQ = 16, R = E = 6: 12 of 16).  $SD_ATTENTION=avx2 forces
 * the AVX2 kernels (for the tests and benchmarks).  Everything accumulates in fp32; exp gives the bits of
 * simd.h's exp8, the GEMM path's softmax's.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include "cpu.h"
#include "simd.h"

#define A512 __attribute__((target("avx512f")))

/* Keys per block: the block's scores (KEYS × BQ floats, 24 KB with AVX-512) stay in L1 between the three
 * passes over them. */
#define KEYS 128

/* Run in parallel from this many multiply-adds: below it a parallel region costs more than it saves. */
#define PAR_MACS ((double)(1 << 21))

/* One instruction set's kernels and the tile they are built for. */
struct kset {
	int bq; /* queries per task: the lanes of every vector row */
	int r;  /* keys per K panel: rows of a score tile */
	int e;  /* output features per tile; dv is padded to a multiple of it */
	/* s (⌈bk/r⌉·r, bq) = scale · (panels kp (⌈bk/r⌉, d, r)) · qt (d, bq); mx (bq) = max over the first bk
	 * rows of s */
	void (*scores)(float *s, float *mx, const float *qt, const float *kp, int64_t bk, int64_t d, float scale);
	/* m, l (bq): running max and sum, updated with the block max mx; s (bk, bq) ← exp(s − m_new) and
	 * alpha (bq) = exp(m_old − m_new), the factor for what was summed before */
	void (*softmax)(float *s, float *m, float *l, float *alpha, const float *mx, int64_t bk);
	/* ot (dvp, bq) = ot · alpha + vpᵀ · p for vp (bk, dvp), p (bk, bq) */
	void (*pv)(float *ot, const float *p, const float *alpha, const float *vp, int64_t bk, int64_t dvp);
};

/* ==== AVX-512 kernels: 3 vectors of 16 queries ==== */

enum { Q5 = 3, BQ5 = 48, R5 = 8, E5 = 8 };

/* simd.h's exp16 for x ≤ 0 (all the softmax needs): the same bits with 4 instructions fewer, as no
 * upper clamp is needed and scalef makes p·2ⁿ in one correctly rounded step, as the integer path does. */
A512 static inline __m512 exp16_neg(__m512 x)
{
	x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
	__m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
	                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
	__m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
	r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
	__m512 p = _mm512_set1_ps(1.9875691500e-4f);
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
	p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
	p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
	return _mm512_scalef_ps(p, n);
}

A512 static void scores512(float *s, float *mx, const float *qt, const float *kp, int64_t bk, int64_t d, float scale)
{
	const __m512 vs = _mm512_set1_ps(scale);
	__m512 m[Q5];
	for (int v = 0; v < Q5; v++) m[v] = _mm512_set1_ps(-INFINITY);
	for (int64_t j = 0; j < bk; j += R5, kp += R5 * d, s += R5 * BQ5) {
		__m512 acc[R5][Q5];
		#pragma GCC unroll 8
		for (int r = 0; r < R5; r++)
			for (int v = 0; v < Q5; v++) acc[r][v] = _mm512_setzero_ps();
		const float *qc = qt, *kc = kp;
		for (int64_t c = 0; c < d; c++, qc += BQ5, kc += R5) {
			__m512 q0 = _mm512_load_ps(qc), q1 = _mm512_load_ps(qc + 16), q2 = _mm512_load_ps(qc + 32);
			#pragma GCC unroll 8
			for (int r = 0; r < R5; r++) {
				__m512 b = _mm512_set1_ps(kc[r]);
				acc[r][0] = _mm512_fmadd_ps(b, q0, acc[r][0]);
				acc[r][1] = _mm512_fmadd_ps(b, q1, acc[r][1]);
				acc[r][2] = _mm512_fmadd_ps(b, q2, acc[r][2]);
			}
		}
		int64_t rows = bk - j < R5 ? bk - j : R5;
		#pragma GCC unroll 8
		for (int r = 0; r < R5; r++)
			for (int v = 0; v < Q5; v++) {
				__m512 x = _mm512_mul_ps(acc[r][v], vs);
				_mm512_store_ps(s + r * BQ5 + 16 * v, x);
				if (r < rows) m[v] = _mm512_max_ps(m[v], x);
			}
	}
	for (int v = 0; v < Q5; v++) _mm512_store_ps(mx + 16 * v, m[v]);
}

A512 static void softmax512(float *s, float *m, float *l, float *alpha, const float *mx, int64_t bk)
{
	__m512 mn[Q5], a[Q5], sum[Q5];
	for (int v = 0; v < Q5; v++) {
		__m512 mo = _mm512_load_ps(m + 16 * v);
		mn[v] = _mm512_max_ps(mo, _mm512_load_ps(mx + 16 * v));
		a[v] = exp16_neg(_mm512_sub_ps(mo, mn[v]));
		sum[v] = _mm512_setzero_ps();
		_mm512_store_ps(m + 16 * v, mn[v]);
		_mm512_store_ps(alpha + 16 * v, a[v]);
	}
	for (int64_t j = 0; j < bk; j++, s += BQ5)
		for (int v = 0; v < Q5; v++) {
			__m512 p = exp16_neg(_mm512_sub_ps(_mm512_load_ps(s + 16 * v), mn[v]));
			_mm512_store_ps(s + 16 * v, p);
			sum[v] = _mm512_add_ps(sum[v], p);
		}
	for (int v = 0; v < Q5; v++)
		_mm512_store_ps(l + 16 * v, _mm512_fmadd_ps(_mm512_load_ps(l + 16 * v), a[v], sum[v]));
}

A512 static void pv512(float *ot, const float *p, const float *alpha, const float *vp, int64_t bk, int64_t dvp)
{
	const __m512 a0 = _mm512_load_ps(alpha), a1 = _mm512_load_ps(alpha + 16), a2 = _mm512_load_ps(alpha + 32);
	for (int64_t e = 0; e < dvp; e += E5) {
		float *o = ot + e * BQ5;
		__m512 acc[E5][Q5];
		#pragma GCC unroll 8
		for (int r = 0; r < E5; r++) {
			acc[r][0] = _mm512_mul_ps(_mm512_load_ps(o + r * BQ5), a0);
			acc[r][1] = _mm512_mul_ps(_mm512_load_ps(o + r * BQ5 + 16), a1);
			acc[r][2] = _mm512_mul_ps(_mm512_load_ps(o + r * BQ5 + 32), a2);
		}
		const float *pj = p, *vj = vp + e;
		for (int64_t j = 0; j < bk; j++, pj += BQ5, vj += dvp) {
			__m512 p0 = _mm512_load_ps(pj), p1 = _mm512_load_ps(pj + 16), p2 = _mm512_load_ps(pj + 32);
			#pragma GCC unroll 8
			for (int r = 0; r < E5; r++) {
				__m512 b = _mm512_set1_ps(vj[r]);
				acc[r][0] = _mm512_fmadd_ps(b, p0, acc[r][0]);
				acc[r][1] = _mm512_fmadd_ps(b, p1, acc[r][1]);
				acc[r][2] = _mm512_fmadd_ps(b, p2, acc[r][2]);
			}
		}
		#pragma GCC unroll 8
		for (int r = 0; r < E5; r++)
			for (int v = 0; v < Q5; v++) _mm512_store_ps(o + r * BQ5 + 16 * v, acc[r][v]);
	}
}

static const struct kset avx512 = {BQ5, R5, E5, scores512, softmax512, pv512};

/* ==== AVX2 kernels: 2 vectors of 8 queries ==== */

enum { Q2 = 2, BQ2 = 16, R2 = 6, E2 = 6 };

static void scores256(float *s, float *mx, const float *qt, const float *kp, int64_t bk, int64_t d, float scale)
{
	const __m256 vs = _mm256_set1_ps(scale);
	__m256 m[Q2];
	for (int v = 0; v < Q2; v++) m[v] = _mm256_set1_ps(-INFINITY);
	for (int64_t j = 0; j < bk; j += R2, kp += R2 * d, s += R2 * BQ2) {
		__m256 acc[R2][Q2];
		#pragma GCC unroll 6
		for (int r = 0; r < R2; r++)
			for (int v = 0; v < Q2; v++) acc[r][v] = _mm256_setzero_ps();
		const float *qc = qt, *kc = kp;
		for (int64_t c = 0; c < d; c++, qc += BQ2, kc += R2) {
			__m256 q0 = _mm256_load_ps(qc), q1 = _mm256_load_ps(qc + 8);
			#pragma GCC unroll 6
			for (int r = 0; r < R2; r++) {
				__m256 b = _mm256_broadcast_ss(kc + r);
				acc[r][0] = _mm256_fmadd_ps(b, q0, acc[r][0]);
				acc[r][1] = _mm256_fmadd_ps(b, q1, acc[r][1]);
			}
		}
		int64_t rows = bk - j < R2 ? bk - j : R2;
		#pragma GCC unroll 6
		for (int r = 0; r < R2; r++)
			for (int v = 0; v < Q2; v++) {
				__m256 x = _mm256_mul_ps(acc[r][v], vs);
				_mm256_store_ps(s + r * BQ2 + 8 * v, x);
				if (r < rows) m[v] = _mm256_max_ps(m[v], x);
			}
	}
	for (int v = 0; v < Q2; v++) _mm256_store_ps(mx + 8 * v, m[v]);
}

static void softmax256(float *s, float *m, float *l, float *alpha, const float *mx, int64_t bk)
{
	__m256 mn[Q2], a[Q2], sum[Q2];
	for (int v = 0; v < Q2; v++) {
		__m256 mo = _mm256_load_ps(m + 8 * v);
		mn[v] = _mm256_max_ps(mo, _mm256_load_ps(mx + 8 * v));
		a[v] = exp8(_mm256_sub_ps(mo, mn[v]));
		sum[v] = _mm256_setzero_ps();
		_mm256_store_ps(m + 8 * v, mn[v]);
		_mm256_store_ps(alpha + 8 * v, a[v]);
	}
	for (int64_t j = 0; j < bk; j++, s += BQ2)
		for (int v = 0; v < Q2; v++) {
			__m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(s + 8 * v), mn[v]));
			_mm256_store_ps(s + 8 * v, p);
			sum[v] = _mm256_add_ps(sum[v], p);
		}
	for (int v = 0; v < Q2; v++)
		_mm256_store_ps(l + 8 * v, _mm256_fmadd_ps(_mm256_load_ps(l + 8 * v), a[v], sum[v]));
}

static void pv256(float *ot, const float *p, const float *alpha, const float *vp, int64_t bk, int64_t dvp)
{
	const __m256 a0 = _mm256_load_ps(alpha), a1 = _mm256_load_ps(alpha + 8);
	for (int64_t e = 0; e < dvp; e += E2) {
		float *o = ot + e * BQ2;
		__m256 acc[E2][Q2];
		#pragma GCC unroll 6
		for (int r = 0; r < E2; r++) {
			acc[r][0] = _mm256_mul_ps(_mm256_load_ps(o + r * BQ2), a0);
			acc[r][1] = _mm256_mul_ps(_mm256_load_ps(o + r * BQ2 + 8), a1);
		}
		const float *pj = p, *vj = vp + e;
		for (int64_t j = 0; j < bk; j++, pj += BQ2, vj += dvp) {
			__m256 p0 = _mm256_load_ps(pj), p1 = _mm256_load_ps(pj + 8);
			#pragma GCC unroll 6
			for (int r = 0; r < E2; r++) {
				__m256 b = _mm256_broadcast_ss(vj + r);
				acc[r][0] = _mm256_fmadd_ps(b, p0, acc[r][0]);
				acc[r][1] = _mm256_fmadd_ps(b, p1, acc[r][1]);
			}
		}
		#pragma GCC unroll 6
		for (int r = 0; r < E2; r++)
			for (int v = 0; v < Q2; v++) _mm256_store_ps(o + r * BQ2 + 8 * v, acc[r][v]);
	}
}

static const struct kset avx2 = {BQ2, R2, E2, scores256, softmax256, pv256};

/* ==== the driver ==== */

static const struct kset *kernels(void)
{
	const char *s = getenv("SD_ATTENTION");
	if (s && strcmp(s, "avx2") == 0) return &avx2;
	return __builtin_cpu_supports("avx512f") ? &avx512 : &avx2;
}

static int64_t up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* On the diagonal of a causal mask: rows jj of s (bk, bq) are keys j0 + jj, lanes queries i0 + lane, and
 * key j is hidden from query i < j.  Before the softmax (after = 0) the hidden scores become −∞ and mx the
 * max of the rest; after it their probabilities become exactly 0 (exp's clamp leaves 2⁻¹²⁶ otherwise). */
static void mask_diagonal(float *s, float *mx, int64_t bk, int64_t bq, int64_t off, int after)
{
	for (int64_t jj = 0; jj < bk; jj++) {
		int64_t hide = jj + off < bq ? jj + off : bq; /* lanes < hide see key j0 + jj only after i ≥ j */
		for (int64_t lane = 0; lane < hide; lane++) s[jj * bq + lane] = after ? 0.0f : -INFINITY;
	}
	if (after) return;
	for (int64_t lane = 0; lane < bq; lane++) mx[lane] = -INFINITY;
	for (int64_t jj = 0; jj < bk; jj++)
		for (int64_t lane = 0; lane < bq; lane++) mx[lane] = s[jj * bq + lane] > mx[lane] ? s[jj * bq + lane] : mx[lane];
}

/*
 * out (N,Lq,H·dv) = softmax(scale · q kᵀ, causal) v for q (N,Lq,H·d), k (N,Lk,H·d), v (N,Lk,H·dv), heads
 * as in sd_attention.  Scratch (sd_cpu_scratch slot 1 of the calling thread): q, k and v packed, about
 * their size, plus a few tiles per thread.  Fails only when that memory cannot be had.
 */
int sd_cpu_attention(float *out, const float *q, const float *k, const float *v, int64_t N, int64_t Lq, int64_t Lk,
                     int64_t H, int64_t d, int64_t dv, float scale, int causal)
{
	if (N <= 0 || Lq <= 0 || H <= 0 || dv <= 0) return 0;
	if (Lk <= 0) return sd_cpu_memset0(out, (size_t)(N * Lq * H * dv) * sizeof(float));
	const struct kset *ks = kernels();
	const int64_t BQ = ks->bq, R = ks->r;
	const int64_t bkmax = KEYS / R * R;                        /* keys per block: whole panels */
	const int64_t np = (Lk + R - 1) / R, dvp = up(dv, ks->e); /* panels per head, padded dv */
	const int64_t nqb = (Lq + BQ - 1) / BQ;                    /* query blocks per head */
	const int par = (double)N * H * Lq * Lk * (double)(d + dv) >= PAR_MACS;
	const int T = par ? omp_get_max_threads() : 1;
	/* A task runs G query blocks against each key block in turn: one is enough while a head's k and v
	 * stay in L2 (1 MB), more when they do not (the VAE's d = 512), so that they are read once per G
	 * blocks, but not so many that a thread goes idle */
	const int64_t st_n = (dvp + 4) * BQ; /* a query block's state: ot, m, l, alpha, mx */
	int64_t G = Lk * (d + dvp) * 4 <= ((int64_t)1 << 20) ? 1 : ((int64_t)768 << 10) / ((d * BQ + st_n) * 4);
	while (G > 1 && N * H * ((nqb + G - 1) / G) < 4 * T) G--;
	if (G > nqb) G = nqb;
	if (G < 1) G = 1;
	const int64_t ngroups = (nqb + G - 1) / G, tasks = N * H * ngroups;
	/* 64-byte aligned pieces: qp (N·H, nqb, d, BQ), kp (N·H, np, d, R), vp (N·H, Lk, dvp), then per thread
	 * s (bkmax, BQ) and G query blocks' state */
	const int64_t qp_n = N * H * nqb * d * BQ, kp_n = up(N * H * np * R * d, 16), vp_n = up(N * H * Lk * dvp, 16);
	const int64_t s_n = bkmax * BQ, per = s_n + G * st_n;
	float *qp = sd_cpu_scratch(1, (size_t)(qp_n + kp_n + vp_n + T * per) * sizeof(float));
	if (!qp) return -1;
	float *kp = qp + qp_n, *vp = kp + kp_n, *tiles = vp + vp_n;

	#pragma omp parallel if(par) num_threads(T)
	{
		/* Packing reads q, k and v a whole row (every head) at a time, in memory order. */
		#pragma omp for schedule(static) nowait
		for (int64_t t = 0; t < N * nqb; t++) { /* t = n·nqb + query block */
			int64_t n = t / nqb, i0 = t % nqb * BQ;
			for (int64_t lane = 0; lane < BQ; lane++) {
				const float *src = q + (n * Lq + i0 + lane) * H * d;
				for (int64_t h = 0; h < H; h++) {
					float *dst = qp + ((n * H + h) * nqb + t % nqb) * d * BQ + lane;
					if (i0 + lane >= Lq) /* idle lanes past Lq: queries of 0 */
						for (int64_t c = 0; c < d; c++) dst[c * BQ] = 0.0f;
					else
						for (int64_t c = 0; c < d; c++) dst[c * BQ] = src[h * d + c];
				}
			}
		}
		#pragma omp for schedule(static) nowait
		for (int64_t t = 0; t < N * np; t++) { /* t = n·np + panel */
			int64_t n = t / np, j0 = t % np * R;
			for (int64_t r = 0; r < R; r++) {
				const float *src = k + (n * Lk + j0 + r) * H * d;
				for (int64_t h = 0; h < H; h++) {
					float *dst = kp + ((n * H + h) * np + t % np) * R * d + r;
					if (j0 + r >= Lk) /* the last panel's missing keys: scores of 0, never used */
						for (int64_t c = 0; c < d; c++) dst[c * R] = 0.0f;
					else
						for (int64_t c = 0; c < d; c++) dst[c * R] = src[h * d + c];
				}
			}
		}
		#pragma omp for schedule(static)
		for (int64_t t = 0; t < N * Lk; t++) { /* t = n·Lk + j */
			int64_t n = t / Lk, j = t % Lk;
			for (int64_t h = 0; h < H; h++) {
				float *dst = vp + ((n * H + h) * Lk + j) * dvp;
				memcpy(dst, v + (t * H + h) * dv, (size_t)dv * sizeof(float));
				for (int64_t e = dv; e < dvp; e++) dst[e] = 0.0f;
			}
		}
		/* round-robin over (n, h, group of query blocks): a thread keeps to one head's k and v (in its
		 * L2) for a while, and a causal mask's short and long blocks spread over the threads */
		#pragma omp for schedule(static, 1)
		for (int64_t t = 0; t < tasks; t++) {
			float *s = tiles + omp_get_thread_num() * per, *st = s + s_n;
			int64_t n = t / (H * ngroups), h = t / ngroups % H, b0 = t % ngroups * G;
			int64_t nb = nqb - b0 < G ? nqb - b0 : G, last = (b0 + nb) * BQ < Lq ? (b0 + nb) * BQ : Lq;
			const float *qh = qp + (n * H + h) * nqb * d * BQ, *kh = kp + (n * H + h) * np * R * d;
			const float *vh = vp + (n * H + h) * Lk * dvp;
			for (int64_t b = 0; b < nb; b++) {
				float *ot = st + b * st_n, *m = ot + dvp * BQ, *l = m + BQ;
				memset(ot, 0, (size_t)(dvp * BQ) * sizeof(float));
				for (int64_t lane = 0; lane < BQ; lane++) m[lane] = -INFINITY, l[lane] = 0.0f;
			}
			int64_t jend = causal && last < Lk ? last : Lk; /* later keys are hidden from every query */
			for (int64_t j0 = 0; j0 < jend; j0 += bkmax) {
				if (j0 + bkmax >= jend) /* the output rows (strided, likely out of cache) come to L2 meanwhile */
					for (int64_t i = b0 * BQ; i < last; i++) {
						const char *o = (const char *)(out + ((n * Lq + i) * H + h) * dv);
						for (int64_t x = 0; x < dv * 4 + 63; x += 64) _mm_prefetch(o + x, _MM_HINT_T1);
					}
				for (int64_t b = 0; b < nb; b++) {
					float *ot = st + b * st_n, *m = ot + dvp * BQ, *l = m + BQ, *alpha = l + BQ, *mx = alpha + BQ;
					int64_t i0 = (b0 + b) * BQ, nq = Lq - i0 < BQ ? Lq - i0 : BQ;
					int64_t kend = causal && i0 + nq < Lk ? i0 + nq : Lk;
					if (j0 >= kend) continue;
					int64_t bk = kend - j0 < bkmax ? kend - j0 : bkmax;
					int diag = causal && j0 + bk - 1 > i0;
					ks->scores(s, mx, qh + (b0 + b) * d * BQ, kh + j0 * d, bk, d, scale);
					if (diag) mask_diagonal(s, mx, bk, BQ, j0 - i0, 0);
					ks->softmax(s, m, l, alpha, mx, bk);
					if (diag) mask_diagonal(s, mx, bk, BQ, j0 - i0, 1);
					ks->pv(ot, s, alpha, vh + j0 * dvp, bk, dvp);
				}
			}
			for (int64_t b = 0; b < nb; b++) {
				const float *ot = st + b * st_n, *l = ot + dvp * BQ + BQ;
				int64_t i0 = (b0 + b) * BQ, nq = Lq - i0 < BQ ? Lq - i0 : BQ;
				for (int64_t lane = 0; lane < nq; lane++) {
					float inv = 1.0f / l[lane], *dst = out + ((n * Lq + i0 + lane) * H + h) * dv;
					for (int64_t e = 0; e < dv; e++) dst[e] = ot[e * BQ + lane] * inv;
				}
			}
		}
	}
	return 0;
}
