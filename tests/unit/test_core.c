/*
 * test_core.c - libsd core: dtype conversion (f16/bf16 against the CPU's own F16C conversion and
 * torch's round-to-nearest-even), shapes, tensors, the arena, errors, and sd_matmul against a
 * double-precision loop on the CPU and, when a GPU is present, CUDA against CPU.
 */
#include <immintrin.h>
#include <stdint.h>
#include "sd.h"
#include "test.h"

static uint64_t rng_state = 88172645463325252ull;
static uint32_t xrand(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (uint32_t)(rng_state >> 11);
}
static float frand(void) { return (float)(xrand() / 2147483648.0 - 1.0); }

TEST(f16_all_halves_roundtrip)
{
	long bad = 0;
	for (uint32_t h = 0; h < 65536; h++) {
		float f = sd_f16_to_f32((uint16_t)h), hw = _cvtsh_ss((uint16_t)h);
		uint32_t a, b;
		memcpy(&a, &f, 4);
		memcpy(&b, &hw, 4);
		if (a != b && !(isnan(f) && isnan(hw))) bad++;
		if (!isnan(f) && sd_f32_to_f16(f) != h) bad++;
	}
	printf("  f16 -> f32 -> f16 mismatches: %ld of 65536\n", bad);
	CHECK(bad == 0);
}

TEST(f32_to_f16_rounding_matches_f16c)
{
	long bad = 0, n = 2000000;
	for (long i = 0; i < n; i++) {
		uint32_t x = xrand() << 1 ^ xrand();
		float f;
		memcpy(&f, &x, 4);
		if (isnan(f)) continue;
		uint16_t mine = sd_f32_to_f16(f), hw = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
		if (mine != hw) bad++;
	}
	/* the hard cases: exact ties, subnormal boundaries, overflow edge */
	float edge[] = {65504.f, 65519.99f, 65520.f, 6.1035156e-05f, 5.9604645e-08f, 2.9802322e-08f,
	                2.9802326e-08f, 1.0009766f, 1.0004883f, 1.0014648f, -0.0f, 1e-10f};
	for (size_t i = 0; i < sizeof edge / sizeof *edge; i++)
		if (sd_f32_to_f16(edge[i]) != _cvtss_sh(edge[i], _MM_FROUND_TO_NEAREST_INT)) bad++;
	printf("  f32 -> f16 mismatches against F16C: %ld of %ld\n", bad, n);
	CHECK(bad == 0);
}

TEST(bf16_round_to_nearest_even)
{
	CHECK(sd_f32_to_bf16(1.0f) == 0x3f80);
	CHECK(sd_bf16_to_f32(0x3f80) == 1.0f);
	/* 1 + 2^-8 is a tie between 0x3f80 and 0x3f81: even wins; slightly above rounds up */
	CHECK(sd_f32_to_bf16(1.00390625f) == 0x3f80);
	CHECK(sd_f32_to_bf16(1.01171875f) == 0x3f82);
	CHECK(sd_f32_to_bf16(nextafterf(1.00390625f, 2.0f)) == 0x3f81);
	CHECK(isnan(sd_bf16_to_f32(sd_f32_to_bf16(NAN))));
	long bad = 0;
	for (uint32_t h = 0; h < 65536; h++) {
		float f = sd_bf16_to_f32((uint16_t)h);
		if (!isnan(f) && sd_f32_to_bf16(f) != h) bad++;
	}
	CHECK(bad == 0);
}

TEST(dtype_names)
{
	enum sd_dtype t;
	for (int i = 0; i < SD_DTYPE_COUNT; i++) {
		const char *n = sd_dtype_name((enum sd_dtype)i);
		CHECK(sd_dtype_parse(n, strlen(n), &t) == 0 && t == (enum sd_dtype)i);
	}
	CHECK(sd_dtype_parse("f13", 3, &t) == -1);
	CHECK(strstr(sd_errmsg(), "unknown dtype 'f13'") != NULL);
	CHECK(sd_dtype_parse("f32x", 3, &t) == 0 && t == SD_DTYPE_F32); /* length-bounded */
	CHECK(sd_dtype_size(SD_DTYPE_BF16) == 2 && sd_dtype_size(SD_DTYPE_I64) == 8);
}

TEST(shapes_and_overflow)
{
	int64_t n, s1[] = {1, 4, 64, 64}, s2[] = {(int64_t)1 << 40, (int64_t)1 << 30}, s3[] = {3, -1};
	CHECK(sd_shape_numel(4, s1, &n) == 0 && n == 16384);
	CHECK(sd_shape_numel(2, s2, &n) == -1 && strstr(sd_errmsg(), "overflow"));
	CHECK(sd_shape_numel(2, s3, &n) == -1 && strstr(sd_errmsg(), "negative"));
	CHECK(sd_shape_numel(9, s1, &n) == -1);
	CHECK(sd_shape_numel(0, s1, &n) == 0 && n == 1);
	CHECK(sd_tensor_new(SD_DTYPE_F32, 2, s2) == NULL);
	char buf[64];
	CHECK(!strcmp(sd_shape_str(4, s1, buf, sizeof buf), "[1,4,64,64]"));
}

TEST(tensors_and_conversion)
{
	sd_tensor *t = sd_tensor_newv(SD_DTYPE_F32, 3, (int64_t)2, (int64_t)3, (int64_t)4);
	CHECK(t && sd_tensor_numel(t) == 24 && sd_tensor_nbytes(t) == 96 && t->owns);
	CHECK(((uintptr_t)t->data & 63) == 0);
	float *f = t->data;
	for (int i = 0; i < 24; i++) CHECK(f[i] == 0.0f);
	for (int i = 0; i < 24; i++) f[i] = (float)i * 0.5f - 3.0f;
	sd_tensor *h = sd_tensor_convert(t, SD_DTYPE_F16), *b = sd_tensor_convert(t, SD_DTYPE_BF16);
	sd_tensor *i32 = sd_tensor_convert(t, SD_DTYPE_I32), *d = sd_tensor_convert(t, SD_DTYPE_F64);
	sd_tensor *back = sd_tensor_convert(h, SD_DTYPE_F32), *back2 = sd_tensor_convert(b, SD_DTYPE_F32);
	CHECK(h && b && i32 && d && back && back2);
	CHECK_CLOSE((float *)back->data, f, 24, 0);
	CHECK_CLOSE((float *)back2->data, f, 24, 0);
	CHECK(((int32_t *)i32->data)[1] == -2 && ((int32_t *)i32->data)[23] == 8);
	CHECK(((double *)d->data)[5] == -0.5);
	sd_tensor *c = sd_tensor_to_device(t, SD_DEVICE_CPU);
	CHECK(c && memcmp(c->data, t->data, 96) == 0);
	sd_tensor *w = sd_tensor_wrap(SD_DTYPE_F32, 3, t->shape, t->data);
	CHECK(w && !w->owns);
	sd_tensor_free(w);
	sd_tensor_free(NULL);
	sd_tensor *all[] = {t, h, b, i32, d, back, back2, c};
	for (size_t k = 0; k < sizeof all / sizeof *all; k++) sd_tensor_free(all[k]);
}

TEST(arena)
{
	sd_arena *a = sd_arena_new(SD_DEVICE_CPU, 1024);
	CHECK(a != NULL);
	void *p1 = sd_arena_alloc(a, 10), *p2 = sd_arena_alloc(a, 10);
	CHECK(((uintptr_t)p1 & 63) == 0 && ((uintptr_t)p2 & 63) == 0 && p1 != p2);
	void *big = sd_arena_alloc(a, 5000); /* larger than a block: its own block */
	CHECK(big != NULL);
	memset(big, 1, 5000);
	int64_t shape[] = {2, 8};
	sd_tensor *t = sd_arena_tensor(a, SD_DTYPE_F32, 2, shape);
	CHECK(t && !t->owns && sd_tensor_numel(t) == 16);
	size_t peak = sd_arena_peak(a);
	CHECK(peak >= 5000 + 128);
	sd_arena_reset(a);
	CHECK(sd_arena_used(a) == 0);
	void *again = sd_arena_alloc(a, 6000); /* fits in the merged block after reset */
	CHECK(again != NULL);
	sd_arena_free(a);
	sd_arena_free(NULL);
}

TEST(errors)
{
	CHECK(sd_seterr("inner %d", 7) == -1);
	CHECK(!strcmp(sd_errmsg(), "inner 7"));
	sd_preerr("outer");
	CHECK(!strcmp(sd_errmsg(), "outer: inner 7"));
	/* a message made from the one before it (issue 18: the old text was overwritten while read) */
	sd_seterr("image of 40000x40000 pixels");
	sd_seterr("%s: %s", "bomb.tar.gz/big.ppm", sd_errmsg());
	CHECK(!strcmp(sd_errmsg(), "bomb.tar.gz/big.ppm: image of 40000x40000 pixels"));
	sd_preerr("%s", sd_errmsg()); /* the prefix itself read from the message */
	CHECK(!strcmp(sd_errmsg(), "bomb.tar.gz/big.ppm: image of 40000x40000 pixels: "
	                           "bomb.tar.gz/big.ppm: image of 40000x40000 pixels"));
	/* a cut message says so */
	char big[3000];
	memset(big, 'x', sizeof big - 1);
	big[sizeof big - 1] = 0;
	sd_seterr("%s", big);
	CHECK(strlen(sd_errmsg()) == 1023 && !strcmp(sd_errmsg() + 1020, "..."));
	sd_seterr("%s: %s", "pre", sd_errmsg());
	CHECK(!strncmp(sd_errmsg(), "pre: xxx", 8) && strlen(sd_errmsg()) == 1023);
}

/* C = alpha op(A) op(B) + beta C in double, for checking */
static void ref_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                     const float *B, float beta, float *C)
{
	for (int64_t i = 0; i < M; i++)
		for (int64_t j = 0; j < N; j++) {
			double s = 0;
			for (int64_t k = 0; k < K; k++)
				s += (double)(ta ? A[k * M + i] : A[i * K + k]) * (tb ? B[j * K + k] : B[k * N + j]);
			C[i * N + j] = (float)(alpha * s + (beta ? beta * C[i * N + j] : 0));
		}
}

static sd_tensor *rand_tensor(int ndim, const int64_t *shape)
{
	sd_tensor *t = sd_tensor_new(SD_DTYPE_F32, ndim, shape);
	float *p = t->data;
	for (int64_t i = 0; i < sd_tensor_numel(t); i++) p[i] = frand();
	return t;
}

/* Every transpose combination, batched, with a shared 2-D B, and with beta accumulation. */
static void check_matmul(enum sd_device dev)
{
	const int64_t Bt = 3, M = 37, N = 29, K = 53;
	for (int ta = 0; ta < 2; ta++)
		for (int tb = 0; tb < 2; tb++)
			for (int shared = 0; shared < 2; shared++) {
				int64_t sa[] = {Bt, ta ? K : M, ta ? M : K}, sb3[] = {Bt, tb ? N : K, tb ? K : N};
				int64_t so[] = {Bt, M, N};
				sd_tensor *a = rand_tensor(3, sa), *b = rand_tensor(shared ? 2 : 3, shared ? sb3 + 1 : sb3);
				sd_tensor *c = rand_tensor(3, so), *want = sd_tensor_to_device(c, SD_DEVICE_CPU);
				for (int64_t i = 0; i < Bt; i++)
					ref_gemm(ta, tb, M, N, K, 0.5f, (float *)a->data + i * M * K,
					         (float *)b->data + (shared ? 0 : i * K * N), 0.25f, (float *)want->data + i * M * N);
				sd_tensor *da = sd_tensor_to_device(a, dev), *db = sd_tensor_to_device(b, dev);
				sd_tensor *dc = sd_tensor_to_device(c, dev);
				CHECK_OK(sd_matmul(dc, da, db, ta, tb, 0.5f, 0.25f));
				sd_tensor *got = sd_tensor_to_device(dc, SD_DEVICE_CPU);
				printf("  %s ta=%d tb=%d shared_b=%d:\n", sd_device_name(dev), ta, tb, shared);
				CHECK_CLOSE((float *)got->data, (float *)want->data, Bt * M * N, 1e-5);
				sd_tensor *all[] = {a, b, c, want, da, db, dc, got};
				for (size_t k = 0; k < 8; k++) sd_tensor_free(all[k]);
			}
}

TEST(matmul_cpu)
{
	check_matmul(SD_DEVICE_CPU);
}

TEST(matmul_shape_errors)
{
	sd_tensor *a = sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)3, (int64_t)4);
	sd_tensor *b = sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)5, (int64_t)6);
	sd_tensor *c = sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)3, (int64_t)6);
	sd_tensor *i = sd_tensor_newv(SD_DTYPE_I32, 2, (int64_t)4, (int64_t)6);
	CHECK(sd_matmul(c, a, b, 0, 0, 1, 0) == -1 && strstr(sd_errmsg(), "shapes do not fit"));
	CHECK(sd_matmul(c, a, i, 0, 0, 1, 0) == -1 && strstr(sd_errmsg(), "expected f32"));
	sd_tensor_free(a), sd_tensor_free(b), sd_tensor_free(c), sd_tensor_free(i);
}

TEST(matmul_cuda_vs_cpu)
{
	if (!sd_cuda_available()) SKIP("no GPU: %s", sd_errmsg());
	check_matmul(SD_DEVICE_CUDA);
	/* a device tensor round trip and a device arena */
	sd_tensor *t = sd_tensor_newv(SD_DTYPE_F32, 1, (int64_t)1000);
	for (int k = 0; k < 1000; k++) ((float *)t->data)[k] = (float)k;
	sd_tensor *d = sd_tensor_to_device(t, SD_DEVICE_CUDA), *h = sd_tensor_to_device(d, SD_DEVICE_CPU);
	CHECK(d && h && d->device == SD_DEVICE_CUDA && memcmp(h->data, t->data, 4000) == 0);
	sd_arena *a = sd_arena_new(SD_DEVICE_CUDA, 0);
	CHECK(a && sd_arena_alloc(a, 1 << 20));
	sd_arena_free(a);
	/* mixing devices is an error, not a crash */
	sd_tensor *m = sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)10, (int64_t)100);
	sd_tensor *dm = sd_tensor_to_device(m, SD_DEVICE_CUDA);
	sd_tensor *o = sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)10, (int64_t)10);
	CHECK(sd_matmul(o, m, dm, 0, 1, 1, 0) == -1 && strstr(sd_errmsg(), "different devices"));
	sd_tensor *all[] = {t, d, h, m, dm, o};
	for (size_t k = 0; k < 6; k++) sd_tensor_free(all[k]);
}

TEST(threads_env)
{
	int n = sd_threads();
	CHECK(n >= 1);
	const char *s = getenv("SD_THREADS");
	if (s && atoi(s) > 0) CHECK(n == atoi(s));
}

int main(void)
{
	RUN(f16_all_halves_roundtrip);
	RUN(f32_to_f16_rounding_matches_f16c);
	RUN(bf16_round_to_nearest_even);
	RUN(dtype_names);
	RUN(shapes_and_overflow);
	RUN(tensors_and_conversion);
	RUN(arena);
	RUN(errors);
	RUN(matmul_cpu);
	RUN(matmul_shape_errors);
	RUN(matmul_cuda_vs_cpu);
	RUN(threads_env);
	return test_summary();
}
