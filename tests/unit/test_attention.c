/*
 * test_attention.c - the fused attention kernel (lib/cpu/attention.c, what sd_attention runs when no
 * probabilities are kept) against a double-precision loop written from F.scaled_dot_product_attention,
 * and against sd_attention's GEMM path ($SD_ATTENTION=gemm).  Both kernel sets are checked: the one the
 * CPU picks (AVX-512 where it has it) and the AVX2 one ($SD_ATTENTION=avx2).  Shapes cover every d from 1
 * to 160, dv ≠ d, the edges of the kernels' tiles (16 or 48 queries, panels of 6 or 8 keys, blocks of 128
 * keys), causal masks with Lq < Lk, = and >, several images and heads, scores whose maximum moves from
 * block to block, any sign of scale, and one output bit for bit the same on 1 and 2 threads.
 *
 * A sweep prints only its failures and then its largest error; outputs start as NaN, so that a lane the
 * kernel forgets to write shows.
 */
#include <stdint.h>
#include <stdlib.h>
#include "sd.h"
#include "test.h"

/* ==== helpers ==== */

static uint64_t rng = 0x9e3779b97f4a7c15ull;
/* uniform in [-1, 1] */
static float urand(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (float)((double)(rng >> 11) / 4503599627370496.0 - 1.0);
}

#define F(t) ((float *)(t)->data)

static sd_tensor *tensor3(int64_t a, int64_t b, int64_t c, float fillv, int random)
{
	sd_tensor *t = sd_tensor_newv(SD_DTYPE_F32, 3, a, b, c);
	for (int64_t i = 0; i < sd_tensor_numel(t); i++) F(t)[i] = random ? urand() : fillv;
	return t;
}

/*
 * F.scaled_dot_product_attention(q', k', v', is_causal=causal, scale=scale) with
 * q' = q.view(N, Lq, H, d).transpose(1, 2) (k', v' likewise), transposed back to (N, Lq, H·dv), in
 * double; causal hides key j from query i < j (top-left), as test_ops.c's reference does.
 */
static void ref_attention(double *out, const float *q, const float *k, const float *v, int64_t N, int64_t H,
                          int64_t Lq, int64_t Lk, int64_t d, int64_t dv, double scale, int causal)
{
	double *s = malloc((size_t)Lk * sizeof(double)), *acc = malloc((size_t)(dv + 1) * sizeof(double));
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
					if (s[j] == 0) continue;
					const float *vj = v + ((n * Lk + j) * H + h) * dv;
					for (int64_t e = 0; e < dv; e++) acc[e] += s[j] / sum * vj[e];
				}
				for (int64_t e = 0; e < dv; e++) out[((n * Lq + i) * H + h) * dv + e] = acc[e];
			}
	free(s);
	free(acc);
}

/* max |got − want| / max |want| (1 when got has a NaN) */
static double rel_err(const float *got, const double *want, int64_t n)
{
	double md = 0, mr = 0;
	for (int64_t i = 0; i < n; i++) {
		if (isnan(got[i])) return 1;
		md = fmax(md, fabs(got[i] - want[i]));
		mr = fmax(mr, fabs(want[i]));
	}
	return md / (mr > 1e-30 ? mr : 1e-30);
}

/* $SD_ATTENTION: "fused" = the fused kernel with the kernels the CPU picks, "avx2" = with the AVX2 ones */
static const char *const paths[] = {"fused", "avx2"};
#define NPATHS (int)(sizeof paths / sizeof paths[0])

static struct worst {
	double err;
	char what[160];
} worst;

static void worst_reset(void) { worst.err = 0, worst.what[0] = 0; }

static void worst_print(const char *sweep, int cases, double rtol)
{
	printf("  %s: %d cases, largest rel error %.3g (tol %.0e) at %s\n", sweep, cases, worst.err, rtol, worst.what);
}

/* Random q, k, v (each ·mag) through every fused path against the double reference; k's rows grow by
 * kgrow per key when kgrow > 0 (the row maximum then moves in every key block).  Returns 1 when all pass. */
static int check(int64_t N, int64_t H, int64_t Lq, int64_t Lk, int64_t d, int64_t dv, int causal, float scale,
                 float mag, float kgrow, double rtol)
{
	sd_tensor *q = tensor3(N, Lq, H * d, 0, 1), *k = tensor3(N, Lk, H * d, 0, 1), *v = tensor3(N, Lk, H * dv, 0, 1);
	for (int64_t i = 0; i < sd_tensor_numel(q); i++) F(q)[i] *= mag;
	for (int64_t i = 0; i < sd_tensor_numel(k); i++) F(k)[i] *= mag * (kgrow > 0 ? 1 + kgrow * (i / (H * d) % Lk) : 1);
	int64_t n = N * Lq * H * dv;
	double *want = malloc((size_t)n * sizeof(double));
	ref_attention(want, F(q), F(k), F(v), N, H, Lq, Lk, d, dv, scale, causal);
	int ok = 1;
	for (int p = 0; p < NPATHS; p++) {
		sd_tensor *out = tensor3(N, Lq, H * dv, NAN, 0);
		setenv("SD_ATTENTION", paths[p], 1);
		int rc = sd_attention(out, q, k, v, (int)H, scale, causal, NULL);
		double e = rc ? 1 : rel_err(F(out), want, n);
		char what[160];
		snprintf(what, sizeof what, "N %lld H %lld Lq %lld Lk %lld d %lld dv %lld causal %d scale %g (%s)",
		         (long long)N, (long long)H, (long long)Lq, (long long)Lk, (long long)d, (long long)dv, causal,
		         scale, paths[p]);
		if (rc) printf("  %s: sd_attention failed: %s\n", what, sd_errmsg());
		if (e > worst.err || !(e <= rtol)) worst.err = e, snprintf(worst.what, sizeof worst.what, "%s", what);
		if (!(e <= rtol)) {
			printf("  %s: rel error %.3g > %.0e FAILED\n", what, e, rtol);
			test_failed_++;
			ok = 0;
		}
		sd_tensor_free(out);
	}
	unsetenv("SD_ATTENTION");
	free(want);
	sd_tensor_free(q), sd_tensor_free(k), sd_tensor_free(v);
	return ok;
}

/* ==== tests ==== */

TEST(every_d)
{
	worst_reset();
	int cases = 0;
	for (int64_t d = 1; d <= 160; d++, cases++) /* dv = d, and dv ≠ d every third d; causal every other */
		check(1, 2, 13, 29, d, d % 3 ? d : d + 5 - d % 7, (int)(d & 1), 1.0f / sqrtf((float)d), 1, 0, 1e-5);
	worst_print("d = 1..160", cases, 1e-5);
}

TEST(tile_edges)
{
	static const int64_t lqs[] = {1, 2, 7, 15, 16, 17, 47, 48, 49, 95, 97, 161};
	static const int64_t lks[] = {1, 5, 6, 7, 8, 9, 13, 127, 128, 129, 255, 257, 300};
	worst_reset();
	int cases = 0;
	for (size_t a = 0; a < sizeof lqs / sizeof *lqs; a++)
		for (size_t b = 0; b < sizeof lks / sizeof *lks; b++, cases++)
			check(1 + (int64_t)(a + b) % 2, 1 + (int64_t)(a * 3 + b) % 3, lqs[a], lks[b], 8 + (int64_t)a, 6 + (int64_t)b,
			      (int)((a + b) % 2), 0.3f, 1, 0, 1e-5);
	worst_print("Lq × Lk over tile edges", cases, 1e-5);
}

TEST(shapes)
{
	struct { int64_t N, H, Lq, Lk, d, dv; int causal; } s[] = {
		{2, 3, 5, 7, 4, 6, 0},         /* Lq != Lk, dv != d */
		{1, 8, 77, 77, 64, 64, 1},     /* CLIP (12 heads there) */
		{2, 12, 77, 77, 64, 64, 1},
		{3, 1, 1, 4, 5, 1, 1},
		{2, 8, 200, 77, 40, 40, 0},    /* cross-attention */
		{2, 8, 100, 77, 80, 80, 0},
		{1, 8, 64, 77, 160, 160, 0},
		{2, 8, 64, 64, 160, 160, 0},   /* UNet 8×8 self-attention */
		{1, 8, 256, 256, 40, 40, 0},
		{1, 5, 300, 300, 24, 24, 1},   /* causal over several key blocks */
		{1, 2, 400, 150, 16, 20, 1},   /* causal, Lq > Lk: the last rows see every key */
		{1, 2, 150, 400, 16, 20, 1},   /* causal, Lq < Lk */
		{1, 1, 130, 600, 512, 512, 0}, /* VAE-like: single head, d = 512, k and v over 1 MB */
		{1, 1, 100, 300, 200, 7, 0},
		{1, 4, 33, 70, 3, 161, 0},
	};
	worst_reset();
	for (size_t i = 0; i < sizeof s / sizeof *s; i++)
		check(s[i].N, s[i].H, s[i].Lq, s[i].Lk, s[i].d, s[i].dv, s[i].causal, 1.0f / sqrtf((float)s[i].d), 1, 0,
		      1e-5);
	worst_print("SD-like and odd shapes", (int)(sizeof s / sizeof *s), 1e-5);
}

/* Large scores, a maximum that moves from key block to key block, and scales of any sign (the GEMM path
 * takes the max of x·scale, not scale·max x, for scale ≤ 0). */
TEST(online_softmax)
{
	worst_reset();
	check(1, 2, 50, 700, 16, 16, 0, 1.0f, 3, 0, 1e-5);       /* scores up to ±144 */
	check(1, 2, 50, 700, 16, 16, 0, 0.25f, 1, 0.02f, 1e-5);  /* the max grows along the keys */
	check(1, 2, 300, 700, 16, 16, 1, 0.25f, 1, 0.02f, 1e-5); /* ... under a causal mask */
	check(1, 2, 50, 300, 16, 16, 0, -0.7f, 2, 0.01f, 1e-5);  /* negative scale: the max shrinks along keys */
	check(2, 3, 40, 50, 8, 8, 1, 0.0f, 1, 0, 1e-5);          /* scale 0: a plain (masked) mean of v */
	worst_print("online softmax", 5, 1e-5);
}

/* The fused kernel against sd_attention's GEMM path on shapes too large for the double loop. */
TEST(fused_vs_gemm)
{
	struct { int64_t N, H, Lq, Lk, d; int causal; } s[] = {
		{1, 8, 1024, 1024, 40, 0}, {2, 8, 1024, 77, 80, 0}, {1, 8, 256, 256, 160, 0}, {1, 1, 1024, 1024, 512, 0},
		{1, 3, 1500, 1900, 20, 1},
	};
	for (size_t i = 0; i < sizeof s / sizeof *s; i++) {
		int64_t N = s[i].N, H = s[i].H, Lq = s[i].Lq, Lk = s[i].Lk, d = s[i].d;
		sd_tensor *q = tensor3(N, Lq, H * d, 0, 1), *k = tensor3(N, Lk, H * d, 0, 1), *v = tensor3(N, Lk, H * d, 0, 1);
		sd_tensor *want = tensor3(N, Lq, H * d, NAN, 0), *got = tensor3(N, Lq, H * d, NAN, 0);
		float scale = 1.0f / sqrtf((float)d);
		setenv("SD_ATTENTION", "gemm", 1);
		CHECK_OK(sd_attention(want, q, k, v, (int)H, scale, s[i].causal, NULL));
		for (int p = 0; p < NPATHS; p++) {
			setenv("SD_ATTENTION", paths[p], 1);
			CHECK_OK(sd_attention(got, q, k, v, (int)H, scale, s[i].causal, NULL));
			printf("  N %lld H %lld Lq %lld Lk %lld d %lld causal %d (%s):\n", (long long)N, (long long)H,
			       (long long)Lq, (long long)Lk, (long long)d, s[i].causal, paths[p]);
			CHECK_CLOSE(F(got), F(want), (long)sd_tensor_numel(got), 1e-5);
		}
		unsetenv("SD_ATTENTION");
		sd_tensor_free(q), sd_tensor_free(k), sd_tensor_free(v), sd_tensor_free(want), sd_tensor_free(got);
	}
}

/* A task's sums run in one order whichever thread takes it: 1 and 2 threads give the same bits. */
TEST(threads)
{
	int64_t N = 2, H = 4, L = 333, d = 40;
	sd_tensor *q = tensor3(N, L, H * d, 0, 1), *k = tensor3(N, L, H * d, 0, 1), *v = tensor3(N, L, H * d, 0, 1);
	sd_tensor *o1 = tensor3(N, L, H * d, NAN, 0), *o2 = tensor3(N, L, H * d, NAN, 0);
	int t0 = sd_threads();
	setenv("SD_ATTENTION", "fused", 1);
	for (int causal = 0; causal < 2; causal++) {
		sd_set_threads(1);
		CHECK_OK(sd_attention(o1, q, k, v, (int)H, 0.158f, causal, NULL));
		sd_set_threads(2);
		CHECK_OK(sd_attention(o2, q, k, v, (int)H, 0.158f, causal, NULL));
		CHECK(memcmp(o1->data, o2->data, sd_tensor_nbytes(o1)) == 0);
	}
	sd_set_threads(t0);
	unsetenv("SD_ATTENTION");
	sd_tensor_free(q), sd_tensor_free(k), sd_tensor_free(v), sd_tensor_free(o1), sd_tensor_free(o2);
}

/* Lk = 0 gives zeros (no keys), without reading out. */
TEST(no_keys)
{
	sd_tensor *q = tensor3(2, 5, 6, 0, 1), *k = tensor3(2, 0, 6, 0, 1), *v = tensor3(2, 0, 4, 0, 1);
	sd_tensor *o = tensor3(2, 5, 4, NAN, 0);
	CHECK_OK(sd_attention(o, q, k, v, 2, 0.5f, 0, NULL));
	int zero = 1;
	for (int64_t i = 0; i < sd_tensor_numel(o); i++) zero &= F(o)[i] == 0.0f;
	CHECK(zero);
	sd_tensor_free(q), sd_tensor_free(k), sd_tensor_free(v), sd_tensor_free(o);
}

int main(void)
{
	printf("  fused kernels here: %s\n", __builtin_cpu_supports("avx512f") ? "avx512 and avx2" : "avx2 (twice)");
	RUN(every_d);
	RUN(tile_edges);
	RUN(shapes);
	RUN(online_softmax);
	RUN(fused_vs_gemm);
	RUN(threads);
	RUN(no_keys);
	return test_summary();
}
