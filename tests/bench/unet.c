/*
 * bench/unet.c - seconds per UNet step at the full Stable Diffusion 1.5 shape (block_out_channels
 * [320,640,1280,1280], layers_per_block 2, 8 heads, cross_attention_dim 768, CrossAttnDownBlock2D×3 +
 * DownBlock2D, UpBlock2D + CrossAttnUpBlock2D×3; 859.5 M parameters) with random weights made in memory,
 * at batch 2 (one classifier-free-guidance step: uncond + cond) for 256² and 512² images (32² and 64²
 * latents).  Each size runs in its own child process so that its peak RSS (getrusage ru_maxrss: weights
 * included) is its own.  One warm-up step, then the best of the timed steps, and the CPU seconds (all
 * threads) of the cheapest one: on a busy shared machine cpu/threads is the better estimate of the
 * step alone.  With -v (or
 * $SD_BENCH_BLOCKS=1) also the time of each top-level block of the last step, from the module hook.
 *
 *   build/bench/unet [-v] [SIZE…]     sizes in pixels, multiples of 8 (default 256 512); SD_THREADS threads
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "sd.h"

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

/* CPU seconds of the whole process (every thread): on a shared machine, cpu/threads estimates what
 * the step would take alone (with OMP_WAIT_POLICY=PASSIVE, so that idle threads do not spin). */
static double cpu(void)
{
	struct timespec t;
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Multiply-adds of one forward at latent side s and batch N (convs, linears, attention products). */
static double macs(const sd_unet_config *c, int s0, int N, int Lc)
{
	double m = 0, s = s0;
	int nb = c->nblocks;
#define CONV(ci, co, k, side) (m += (double)(ci) * (co) * (k) * (k) * (side) * (side))
#define RES(ci, co, side) do { CONV(ci, co, 3, side); CONV(co, co, 3, side); if ((ci) != (co)) CONV(ci, co, 1, side); } while (0)
#define TR(ch, cross, side) do { double L_ = (side) * (side), C_ = (ch);                                        \
		m += 2 * L_ * C_ * C_;                           /* proj_in, proj_out */                         \
		m += 4 * L_ * C_ * C_ + 2 * L_ * L_ * C_;        /* self-attention */                             \
		m += 2 * L_ * C_ * C_ + 2 * Lc * (cross) * C_ + 2 * L_ * Lc * C_; /* cross-attention */          \
		m += 12 * L_ * C_ * C_;                          /* GEGLU feed-forward */                         \
	} while (0)
	int ch = c->block_out[0];
	CONV(c->in_channels, ch, 3, s);
	for (int b = 0; b < nb; b++) {
		for (int l = 0; l < c->layers[b]; l++) {
			RES(ch, c->block_out[b], s);
			ch = c->block_out[b];
			if (c->down_attn[b]) TR(ch, c->cross_dim[b], s);
		}
		if (b < nb - 1) s /= 2, CONV(ch, ch, 3, s);
	}
	RES(ch, ch, s);
	TR(ch, c->cross_dim[nb - 1], s);
	RES(ch, ch, s);
	for (int b = 0; b < nb; b++) {
		int k = nb - 1 - b, oc = c->block_out[k], in = c->block_out[k > 0 ? k - 1 : 0], nl = c->layers[k] + 1;
		for (int l = 0; l < nl; l++) {
			int skip = l == nl - 1 ? in : oc;
			RES(ch + skip, oc, s);
			ch = oc;
			if (c->up_attn[b]) TR(ch, c->cross_dim[k], s);
		}
		if (b < nb - 1) s *= 2, CONV(ch, ch, 3, s);
	}
	CONV(ch, c->out_channels, 3, s);
	return m * N;
}

/* The per-block profile: the time between consecutive top-level hook calls. */
struct prof {
	double t0, last;
	int n;
	char name[32][40];
	double dt[32];
};

static void on_module(void *ctx, const char *module, const sd_tensor *out)
{
	struct prof *p = ctx;
	if (strstr(module, "res_samples") || p->n == 32) return;
	double t = now();
	snprintf(p->name[p->n], sizeof p->name[0], "%s", module);
	p->dt[p->n++] = t - p->last;
	p->last = t;
}

static int run(int px, int verbose)
{
	sd_unet_config c = {.in_channels = 4, .out_channels = 4, .nblocks = 4, .block_out = {320, 640, 1280, 1280},
	                    .down_attn = {1, 1, 1, 0}, .up_attn = {0, 1, 1, 1}, .mid_attn = 1,
	                    .heads = {8, 8, 8, 8}, .cross_dim = {768, 768, 768, 768}, .flip_sin_to_cos = 1};
	double tb = now();
	sd_unet *u = sd_unet_new_random(&c, SD_DEVICE_CPU, 1);
	if (!u) {
		fprintf(stderr, "bench/unet: %s\n", sd_errmsg());
		return 1;
	}
	double build = now() - tb;
	const int N = 2, lat = px / 8, Lc = 77;
	sd_tensor *x = sd_tensor_newv(SD_DTYPE_F32, 4, N, 4, lat, lat), *eps = sd_tensor_newv(SD_DTYPE_F32, 4, N, 4, lat, lat);
	sd_tensor *ctx = sd_tensor_newv(SD_DTYPE_F32, 3, N, Lc, 768);
	uint64_t s = 42;
	sd_tensor *ins[2] = {x, ctx};
	for (int k = 0; k < 2; k++) {
		float *p = ins[k]->data;
		for (int64_t i = 0; i < sd_tensor_numel(ins[k]); i++) { /* unit-scale inputs */
			s = s * 6364136223846793005ull + 1442695040888963407ull;
			p[i] = (float)((s >> 40) * (2.0 / 16777216.0) - 1.0);
		}
	}
	float t[2] = {981, 981};
	sd_arena *a = sd_arena_new(SD_DEVICE_CPU, 0);
	int steps = px <= 256 ? 3 : 2;
	double best = 1e30, warm = 0, best_cpu = 1e30;
	struct prof prof = {0};
	for (int i = 0; i <= steps; i++) {
		int last = i == steps;
		if (last && verbose) {
			sd_unet_set_hook(u, on_module, &prof);
			prof.t0 = prof.last = now();
		}
		sd_arena_reset(a);
		double t0 = now(), c0 = cpu();
		if (sd_unet_forward(u, a, eps, x, t, 2, ctx)) {
			fprintf(stderr, "bench/unet: %s\n", sd_errmsg());
			return 1;
		}
		double dt = now() - t0, dc = cpu() - c0;
		if (i == 0) warm = dt;
		else if (!(last && verbose)) {
			if (dt < best) best = dt;
			if (dc < best_cpu) best_cpu = dc;
		}
		if (last && verbose) sd_unet_set_hook(u, NULL, NULL);
	}
	float *e = eps->data;
	int finite = 1;
	for (int64_t i = 0; i < sd_tensor_numel(eps); i++) finite &= e[i] == e[i] && e[i] - e[i] == 0;
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	double rss = ru.ru_maxrss / 1024.0, act = sd_unet_peak_bytes(u) / 1048576.0, gmac = macs(sd_unet_get_config(u), lat, N, Lc) / 1e9;
	printf("| unet step b2 | %4dx%-4d | %2d | %7.2f | %7.2f | %7.2f | %6.0f | %7.1f | %7.0f | %7.0f |%s\n", px, px,
	       sd_threads(), best, best_cpu, warm, gmac, 2 * gmac / best, rss, act, finite ? "" : " (non-finite output!)");
	if (verbose) {
		fprintf(stderr, "  %dx%d: built the random UNet in %.1f s; last step by block:\n", px, px, build);
		for (int i = 0; i < prof.n; i++) fprintf(stderr, "    %-16s %7.3f s\n", prof.name[i], prof.dt[i]);
	}
	fflush(stdout);
	sd_arena_free(a);
	sd_tensor_free(x);
	sd_tensor_free(eps);
	sd_tensor_free(ctx);
	sd_unet_free(u);
	return finite ? 0 : 1;
}

int main(int argc, char **argv)
{
	int verbose = getenv("SD_BENCH_BLOCKS") && *getenv("SD_BENCH_BLOCKS") == '1', sizes[8], ns = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "-v")) {
			verbose = 1;
			continue;
		}
		char *end;
		long px = strtol(argv[i], &end, 10);
		if (*end || px < 64 || px > 4096 || px % 8 || ns == 8) {
			fprintf(stderr, "usage: %s [-v] [SIZE…]  (SIZE a multiple of 8 in [64, 4096]; default 256 512)\n", argv[0]);
			return 2;
		}
		sizes[ns++] = (int)px;
	}
	if (!ns) sizes[ns++] = 256, sizes[ns++] = 512;
	printf("| bench        | size      | th | s/step  | cpu s   | warm-up |  GMAC  | GFLOP/s | RSS MiB | act MiB |\n");
	printf("|--------------|-----------|----|---------|---------|---------|--------|---------|---------|---------|\n");
	fflush(stdout);
	int fail = 0;
	for (int i = 0; i < ns; i++) {
		pid_t pid = fork();
		if (pid == 0) _exit(run(sizes[i], verbose));
		int st;
		if (pid < 0 || waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) fail = 1;
	}
	return fail;
}
