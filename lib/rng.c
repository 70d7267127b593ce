/*
 * rng.c - torch's CPU random numbers, so that "same seed -> same image as diffusers" holds.
 *
 * Mirrors PyTorch's CPUGeneratorImpl (at::mt19937 seeded with the low 32 bits of the seed, random() and
 * random64()), the transformations of ATen/core/TransformationHelper.h and the normal/uniform/random
 * kernels of aten/src/ATen/native/cpu/DistributionTemplates.h, as built for the AVX2 CPU capability:
 *   - randn of a contiguous float tensor with numel >= 16: uniforms for every element, then Box-Muller
 *     per block of 16 (pairs j, j+8), the last 16 redrawn and redone when numel % 16 != 0;  the AVX2
 *     build evaluates log/sin/cos with avx_mathfun's cephes polynomials (log256_ps, sincos256_ps), which
 *     this file evaluates lane by lane with the same float operations in the same order and with
 *     explicit fmaf() where torch's compiler fused a multiply-add, so the result is bit-exact (and
 *     does not depend on this file's own -ffp-contract: no remaining product feeds an addition whose
 *     rounding a contraction could change);
 *   - everything else (numel < 16, float64): at::normal_distribution<double>, which caches the second
 *     value of each Box-Muller pair in the generator.
 * The generator's state is small and plain (lib/sd.h, struct sd_rng): (seed, draws, cache) rebuild it.
 */
#include <math.h>
#include <string.h>
#include "sd.h"

#define MT_N 624
#define MT_M 397

/* ==== mt19937 ==== */

/* Fill mt[] from the low 32 bits of seed (Matsumoto & Nishimura's init_genrand). */
void sd_rng_seed(sd_rng *r, uint64_t seed)
{
	r->seed = seed;
	r->mt[0] = (uint32_t)seed;
	for (int i = 1; i < MT_N; i++)
		r->mt[i] = 1812433253u * (r->mt[i - 1] ^ (r->mt[i - 1] >> 30)) + (uint32_t)i;
	r->idx = MT_N;
	r->draws = 0;
	r->has_cached = 0;
	r->cached = 0;
}

/* Generate the next 624 words of state in place (split at the wrap-arounds, no modulo). */
static void twist(sd_rng *r)
{
	uint32_t *mt = r->mt;
#define MT_MIX(a, b, c) ((c) ^ ((((a) & 0x80000000u) | ((b) & 0x7fffffffu)) >> 1) ^ (((b) & 1u) ? 0x9908b0dfu : 0u))
	int i = 0;
	for (; i < MT_N - MT_M; i++) mt[i] = MT_MIX(mt[i], mt[i + 1], mt[i + MT_M]);
	for (; i < MT_N - 1; i++) mt[i] = MT_MIX(mt[i], mt[i + 1], mt[i + MT_M - MT_N]);
	mt[MT_N - 1] = MT_MIX(mt[MT_N - 1], mt[0], mt[MT_M - 1]);
#undef MT_MIX
	r->idx = 0;
}

uint32_t sd_rng_u32(sd_rng *r)
{
	if (r->idx >= MT_N) twist(r);
	uint32_t y = r->mt[r->idx++];
	y ^= y >> 11;
	y ^= (y << 7) & 0x9d2c5680u;
	y ^= (y << 15) & 0xefc60000u;
	y ^= y >> 18;
	r->draws++;
	return y;
}

uint64_t sd_rng_u64(sd_rng *r)
{
	uint64_t hi = sd_rng_u32(r);
	return hi << 32 | sd_rng_u32(r);
}

/* Skip n words: whole blocks by twisting alone (no tempering), the rest by moving idx. */
void sd_rng_skip(sd_rng *r, uint64_t n)
{
	while (n > 0) {
		if (r->idx >= MT_N) twist(r);
		uint64_t k = (uint64_t)(MT_N - r->idx);
		if (k > n) k = n;
		r->idx += (int)k;
		r->draws += k;
		n -= k;
	}
}

void sd_rng_restore(sd_rng *r, uint64_t seed, uint64_t draws, int has_cached, double cached)
{
	sd_rng_seed(r, seed);
	sd_rng_skip(r, draws);
	r->has_cached = has_cached != 0;
	r->cached = has_cached ? cached : 0;
}

/* ==== uniforms and the double normal ==== */

/* uniform_real_distribution<float>(0, 1): 24 random bits. */
static float uniform_f32(sd_rng *r)
{
	return (float)(sd_rng_u32(r) & 0xffffffu) * (1.0f / 16777216.0f);
}

/* uniform_real_distribution<double>(0, 1): 53 bits of random64(). */
static double uniform_f64(sd_rng *r)
{
	return (double)(sd_rng_u64(r) & ((UINT64_C(1) << 53) - 1)) * (1.0 / 9007199254740992.0);
}

/* at::normal_distribution<double>(0, 1): the cached value when there is one, else a new Box-Muller pair
 * whose sine half is cached for the next call. */
static double normal_f64(sd_rng *r)
{
	if (r->has_cached) {
		r->has_cached = 0;
		return r->cached;
	}
	double u1 = uniform_f64(r);
	double u2 = uniform_f64(r);
	double radius = sqrt(-2.0 * log1p(-u2));
	double theta = 2.0 * M_PI * u1;
	r->cached = radius * sin(theta);
	r->has_cached = 1;
	return radius * cos(theta);
}

/* ==== avx_mathfun's float log and sincos, one lane at a time ==== */

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* log256_ps for x in (0, 1] (the only inputs Box-Muller gives it): split x = m·2^e with m in [0.5, 1),
 * fold m below sqrt(1/2) up, then cephes' degree-8 polynomial.  The operations are avx_mathfun.h's in
 * its order, and the fmaf() calls are where GCC contracted its _mm256_mul_ps/_mm256_add_ps pairs into
 * FMAs when torch's AVX2 objects were built (-mavx2 -mfma): with exactly these fused, the fixtures
 * match bit for bit (plain multiply-add: 99.0%; float32 libm: 84%).  fmaf is exact on any CPU. */
static float cephes_logf(float x)
{
	if (x < u2f(0x00800000u)) x = u2f(0x00800000u); /* cut off denormals */
	int32_t ex = (int32_t)(f2u(x) >> 23) - 0x7f;
	x = u2f((f2u(x) & ~0x7f800000u) | f2u(0.5f));
	float e = (float)ex + 1.0f;
	float tmp = 0.0f;
	if (x < 0.707106781186547524f) {
		tmp = x;
		e = e - 1.0f;
	}
	x = x - 1.0f;
	x = x + tmp;
	float z = x * x;
	float y = 7.0376836292E-2f;
	y = fmaf(y, x, -1.1514610310E-1f);
	y = fmaf(y, x, 1.1676998740E-1f);
	y = fmaf(y, x, -1.2420140846E-1f);
	y = fmaf(y, x, 1.4249322787E-1f);
	y = fmaf(y, x, -1.6668057665E-1f);
	y = fmaf(y, x, 2.0000714765E-1f);
	y = fmaf(y, x, -2.4999993993E-1f);
	y = fmaf(y, x, 3.3333331174E-1f);
	y = y * x;
	y = fmaf(y, z, e * -2.12194440e-4f);
	y = fmaf(-z, 0.5f, y);
	x = x + y;
	x = fmaf(e, 0.693359375f, x);
	return x;
}

/* sincos256_ps: reduce by multiples of pi/4 in three parts (Cody-Waite), then the cephes sine and
 * cosine polynomials on [-pi/4, pi/4] and the octant's signs.  Operation order and FMAs as above. */
static void cephes_sincosf(float x, float *s, float *c)
{
	uint32_t sign_sin = f2u(x) & 0x80000000u;
	x = u2f(f2u(x) & 0x7fffffffu);
	int32_t j = (int32_t)(x * 1.27323954473516f); /* 4/pi, truncated like cvttps */
	j = (j + 1) & ~1;
	float y = (float)j;
	uint32_t swap_sin = (uint32_t)(j & 4) << 29;
	int poly = (j & 2) == 0; /* 1: sine from the sine polynomial */
	x = fmaf(y, -0.78515625f, x);
	x = fmaf(y, -2.4187564849853515625e-4f, x);
	x = fmaf(y, -3.77489497744594108e-8f, x);
	uint32_t sign_cos = (uint32_t)(~(j - 2) & 4) << 29;
	sign_sin ^= swap_sin;

	float z = x * x;
	float yc = 2.443315711809948E-005f;
	yc = fmaf(yc, z, -1.388731625493765E-003f);
	yc = fmaf(yc, z, 4.166664568298827E-002f);
	yc = yc * z;
	yc = fmaf(yc, z, -(z * 0.5f));
	yc = yc + 1.0f;

	float ys = -1.9515295891E-4f;
	ys = fmaf(ys, z, 8.3321608736E-3f);
	ys = fmaf(ys, z, -1.6666654611E-1f);
	ys = ys * z;
	ys = fmaf(ys, x, x);

	/* the vector code selects by masking and adding a zero: keep that (it turns -0 into +0) */
	float sel_s = poly ? ys : yc, sel_c = poly ? yc : ys;
	*s = u2f(f2u(sel_s + 0.0f) ^ sign_sin);
	*c = u2f(f2u(sel_c + 0.0f) ^ sign_cos);
}

/* ==== Box-Muller over blocks of 16 ==== */

/* normal_fill_16_AVX2: x[0..16) holds uniforms in [0, 1); pairs (j, j+8) become r·cos, r·sin. */
static void normal16_f32(float *x)
{
	const float two_pi = (float)(2.0 * M_PI);
	for (int j = 0; j < 8; j++) {
		float u1 = 1.0f - x[j], u2 = x[j + 8];
		float radius = sqrtf(-2.0f * cephes_logf(u1));
		float s, c;
		cephes_sincosf(two_pi * u2, &s, &c);
		x[j] = radius * c + 0.0f;   /* fmadd(n, std = 1, mean = 0) */
		x[j + 8] = radius * s + 0.0f;
	}
}

/* normal_fill_16<double>: the scalar template with std::log/cos/sin. */
static void normal16_f64(double *x)
{
	for (int j = 0; j < 8; j++) {
		double u1 = 1.0 - x[j], u2 = x[j + 8];
		double radius = sqrt(-2.0 * log(u1));
		double theta = 2.0 * M_PI * u2;
		x[j] = radius * cos(theta);
		x[j + 8] = radius * sin(theta);
	}
}

/* ==== torch.randn / rand / randint ==== */

void sd_rng_randn(sd_rng *r, float *out, int64_t n)
{
	if (n < 16) {
		for (int64_t i = 0; i < n; i++) out[i] = (float)normal_f64(r);
		return;
	}
	for (int64_t i = 0; i < n; i++) out[i] = uniform_f32(r);
	for (int64_t i = 0; i + 16 <= n; i += 16) normal16_f32(out + i);
	if (n % 16) {
		float *t = out + n - 16;
		for (int i = 0; i < 16; i++) t[i] = uniform_f32(r);
		normal16_f32(t);
	}
}

void sd_rng_randn_f64(sd_rng *r, double *out, int64_t n)
{
	if (n < 16) {
		for (int64_t i = 0; i < n; i++) out[i] = normal_f64(r);
		return;
	}
	for (int64_t i = 0; i < n; i++) out[i] = uniform_f64(r);
	for (int64_t i = 0; i + 16 <= n; i += 16) normal16_f64(out + i);
	if (n % 16) {
		double *t = out + n - 16;
		for (int i = 0; i < 16; i++) t[i] = uniform_f64(r);
		normal16_f64(t);
	}
}

void sd_rng_rand(sd_rng *r, float *out, int64_t n)
{
	for (int64_t i = 0; i < n; i++) out[i] = uniform_f32(r);
}

/* random_from_to: one word per element, 64 bits only when the range needs them. */
int sd_rng_randint(sd_rng *r, int64_t lo, int64_t hi, int64_t *out, int64_t n)
{
	if (hi <= lo)
		return sd_seterr("randint: empty range [%lld, %lld)", (long long)lo, (long long)hi);
	uint64_t range = (uint64_t)hi - (uint64_t)lo;
	for (int64_t i = 0; i < n; i++) {
		uint64_t w = range >= (UINT64_C(1) << 32) ? sd_rng_u64(r) : sd_rng_u32(r);
		out[i] = (int64_t)((uint64_t)lo + w % range);
	}
	return 0;
}
