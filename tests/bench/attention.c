/*
 * bench/attention.c - time sd_attention on the shapes Stable Diffusion 1.5 gives it: the GEMM path
 * ($SD_ATTENTION=gemm: sgemm QKᵀ, a softmax over whole score rows, sgemm PV), the fused kernel
 * (lib/cpu/attention.c; $SD_ATTENTION=fused: AVX-512 where the CPU has it, =avx2: its AVX2 kernels), and
 * what sd_attention picks by itself (auto), on random q, k, v in [−1, 1].  Each time is the best of
 * several runs after one warm-up (the machine may be shared); GFLOP/s counts 2·(d + dv) per unmasked
 * (query, key) pair and head.  The last column is the largest difference fused − GEMM relative to the
 * largest |out|.
 *
 *   build/bench/attention [SECONDS]   SECONDS of timed runs per shape and path at most (default 2);
 *                                     SD_THREADS sets the threads (OMP_WAIT_POLICY=PASSIVE advised)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "sd.h"

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

struct shape {
	const char *what;
	int64_t N, H, Lq, Lk, d;
	int causal;
};

/* 512² image, batch 2 under classifier-free guidance (the VAE decodes one image) */
static const struct shape shapes[] = {
	{"unet self 64x64", 2, 8, 4096, 4096, 40, 0},
	{"unet self 64x64 N=1", 1, 8, 4096, 4096, 40, 0},
	{"unet self 32x32", 2, 8, 1024, 1024, 80, 0},
	{"unet self 16x16", 2, 8, 256, 256, 160, 0},
	{"unet self 8x8", 2, 8, 64, 64, 160, 0},
	{"unet cross 64x64", 2, 8, 4096, 77, 40, 0},
	{"unet cross 32x32", 2, 8, 1024, 77, 80, 0},
	{"unet cross 16x16", 2, 8, 256, 77, 160, 0},
	{"unet cross 8x8", 2, 8, 64, 77, 160, 0},
	{"vae mid 64x64", 1, 1, 4096, 4096, 512, 0},
	{"vae mid 32x32", 1, 1, 1024, 1024, 512, 0},
	{"clip causal", 2, 12, 77, 77, 64, 1},
};

static void fill(sd_tensor *t, uint64_t s)
{
	float *p = t->data;
	for (int64_t i = 0; i < sd_tensor_numel(t); i++) {
		s = s * 6364136223846793005ull + 1442695040888963407ull;
		p[i] = (float)((s >> 40) * (2.0 / 16777216.0) - 1.0);
	}
}

/* best seconds of one call over runs that add up to about `budget` seconds (3 at least, 50 at most) */
static double best(const char *how, sd_tensor *out, const sd_tensor *q, const sd_tensor *k, const sd_tensor *v,
                   const struct shape *s, double budget)
{
	setenv("SD_ATTENTION", how, 1);
	float scale = 1.0f / sqrtf((float)s->d);
	if (sd_attention(out, q, k, v, (int)s->H, scale, s->causal, NULL)) return -1;
	double b = INFINITY, spent = 0;
	for (int i = 0; i < 50 && (i < 3 || spent < budget); i++) {
		double t0 = now();
		sd_attention(out, q, k, v, (int)s->H, scale, s->causal, NULL);
		double t = now() - t0;
		spent += t;
		if (t < b) b = t;
	}
	return b;
}

int main(int argc, char **argv)
{
	double budget = argc > 1 ? strtod(argv[1], NULL) : 2.0;
	if (!(budget > 0)) {
		fprintf(stderr, "usage: %s [SECONDS]\n", argv[0]);
		return 2;
	}
	printf("threads %d\n", sd_threads());
	printf("| shape                  |  N |  H |   Lq |   Lk |   d |  gemm s  |  fused s |  avx2 s  |  auto s  | gemm GF/s | fused GF/s | avx2 GF/s | auto/gemm | rel diff |\n");
	printf("|------------------------|----|----|------|------|-----|----------|----------|----------|----------|-----------|------------|-----------|-----------|----------|\n");
	for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
		const struct shape *s = &shapes[i];
		sd_tensor *q = sd_tensor_newv(SD_DTYPE_F32, 3, s->N, s->Lq, s->H * s->d);
		sd_tensor *k = sd_tensor_newv(SD_DTYPE_F32, 3, s->N, s->Lk, s->H * s->d);
		sd_tensor *v = sd_tensor_newv(SD_DTYPE_F32, 3, s->N, s->Lk, s->H * s->d);
		sd_tensor *o1 = sd_tensor_newv(SD_DTYPE_F32, 3, s->N, s->Lq, s->H * s->d);
		sd_tensor *o2 = sd_tensor_newv(SD_DTYPE_F32, 3, s->N, s->Lq, s->H * s->d);
		if (!q || !k || !v || !o1 || !o2) {
			fprintf(stderr, "bench/attention: %s\n", sd_errmsg());
			return 1;
		}
		fill(q, 1), fill(k, 2), fill(v, 3);
		double told = best("gemm", o1, q, k, v, s, budget);
		double tav2 = best("avx2", o2, q, k, v, s, budget);
		double tauto = best("", o2, q, k, v, s, budget);
		double tnew = best("fused", o2, q, k, v, s, budget);
		if (told < 0 || tnew < 0 || tav2 < 0 || tauto < 0) {
			fprintf(stderr, "bench/attention: %s\n", sd_errmsg());
			return 1;
		}
		double pairs = 0; /* unmasked (query, key) pairs */
		for (int64_t r = 0; r < s->Lq; r++) pairs += s->causal && r + 1 < s->Lk ? r + 1 : s->Lk;
		double gf = 2.0 * s->N * s->H * pairs * (2 * s->d) / 1e9, maxd = 0, maxr = 0;
		const float *a = o1->data, *b = o2->data;
		for (int64_t j = 0; j < sd_tensor_numel(o1); j++) {
			maxd = fmax(maxd, fabs((double)a[j] - b[j]));
			maxr = fmax(maxr, fabs((double)a[j]));
		}
		printf("| %-22s | %2lld | %2lld | %4lld | %4lld | %3lld | %8.5f | %8.5f | %8.5f | %8.5f | %9.1f | %10.1f | %9.1f | %8.2fx | %8.1e |\n",
		       s->what, (long long)s->N, (long long)s->H, (long long)s->Lq, (long long)s->Lk, (long long)s->d, told,
		       tnew, tav2, tauto, gf / told, gf / tnew, gf / tav2, told / tauto, maxd / (maxr > 0 ? maxr : 1));
		fflush(stdout);
		sd_tensor_free(q), sd_tensor_free(k), sd_tensor_free(v), sd_tensor_free(o1), sd_tensor_free(o2);
	}
	return 0;
}
