/*
 * bench/vae.c - time the VAE at the full Stable Diffusion 1.5 shape (block_out_channels
 * [128,256,512,512], layers_per_block 2, 4 latent channels; 83.7 M parameters) with random weights made
 * in memory: a 512×512 decode (64×64 latent) and encode, each in its own child process so that its
 * peak RSS is its own.  One table row per run: seconds, seconds per megapixel, peak RSS (whole
 * process: weights included) and peak activation memory, per megapixel too.
 *
 *   build/bench/vae [SIZE]      SIZE in pixels, a multiple of 8 (default 512); SD_THREADS sets threads
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

/* Multiply-adds of a conv/linear layer summed over the model: decode and encode at size px. */
static double macs(const sd_vae_config *c, int px, int decode)
{
	double m = 0;
	int nb = c->nblocks, L = c->layers_per_block;
	double s = px; /* current side */
#define CONV(ci, co, k, side) (m += (double)(ci) * (co) * (k) * (k) * (side) * (side))
#define RES(ci, co, side) (CONV(ci, co, 3, side), CONV(co, co, 3, side), (ci) != (co) ? (void)CONV(ci, co, 1, side) : (void)0)
#define ATTN(ch, side) (m += 4.0 * (ch) * (ch) * (side) * (side) + 2.0 * (ch) * (side) * (side) * (side) * (side))
	if (!decode) {
		int ch = c->block_out[0];
		CONV(c->in_channels, ch, 3, s);
		for (int b = 0; b < nb; b++) {
			for (int l = 0; l < L; l++) RES(ch, c->block_out[b], s), ch = c->block_out[b];
			if (b < nb - 1) s /= 2, CONV(ch, ch, 3, s);
		}
		RES(ch, ch, s), ATTN(ch, s), RES(ch, ch, s);
		CONV(ch, 2 * c->latent_channels, 3, s);
		CONV(2 * c->latent_channels, 2 * c->latent_channels, 1, s);
	} else {
		s = px >> (nb - 1);
		int ch = c->block_out[nb - 1];
		CONV(c->latent_channels, c->latent_channels, 1, s);
		CONV(c->latent_channels, ch, 3, s);
		RES(ch, ch, s), ATTN(ch, s), RES(ch, ch, s);
		for (int b = 0; b < nb; b++) {
			int oc = c->block_out[nb - 1 - b];
			for (int l = 0; l < L + 1; l++) RES(ch, oc, s), ch = oc;
			if (b < nb - 1) s *= 2, CONV(ch, ch, 3, s);
		}
		CONV(ch, c->out_channels, 3, s);
	}
	return m;
}

static int run(const char *what, int px)
{
	sd_vae_config c = {.in_channels = 3, .out_channels = 3, .latent_channels = 4, .nblocks = 4,
	                   .block_out = {128, 256, 512, 512}, .layers_per_block = 2, .groups = 32, .eps = 1e-6f,
	                   .scaling_factor = 0.18215f, .quant_conv = 1, .post_quant_conv = 1, .mid_attention = 1};
	sd_vae *v = sd_vae_new_random(&c, SD_DEVICE_CPU, 1);
	if (!v) {
		fprintf(stderr, "bench/vae: %s\n", sd_errmsg());
		return 1;
	}
	int decode = !strcmp(what, "decode"), lat = px / 8;
	sd_tensor *in = decode ? sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, lat, lat) : sd_tensor_newv(SD_DTYPE_F32, 4, 1, 3, px, px);
	sd_tensor *out = decode ? sd_tensor_newv(SD_DTYPE_F32, 4, 1, 3, px, px) : sd_tensor_newv(SD_DTYPE_F32, 4, 1, 8, lat, lat);
	float *p = in->data;
	uint64_t s = 42;
	for (int64_t i = 0; i < sd_tensor_numel(in); i++) { /* latents of unit scale; pixels in [-1, 1] */
		s = s * 6364136223846793005ull + 1442695040888963407ull;
		p[i] = (float)((s >> 40) * (2.0 / 16777216.0) - 1.0);
	}
	sd_vae_tiling untiled = {-1, 0};
	double t0 = now();
	int rc = decode ? sd_vae_decode(v, out, in, &untiled) : sd_vae_encode(v, out, in, &untiled);
	double t = now() - t0;
	if (rc) {
		fprintf(stderr, "bench/vae: %s\n", sd_errmsg());
		return 1;
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	double mp = (double)px * px / 1e6, rss = ru.ru_maxrss / 1024.0, act = sd_vae_peak_bytes(v) / 1048576.0;
	double gmac = macs(&c, px, decode) / 1e9;
	printf("| vae %-6s | %4dx%-4d | %2d | %7.2f | %7.2f | %6.0f | %6.1f | %7.0f | %7.0f | %7.0f | %7.0f |\n", what, px, px,
	       sd_threads(), t, t / mp, gmac, 2 * gmac / t, rss, rss / mp, act, act / mp);
	fflush(stdout);
	sd_tensor_free(in);
	sd_tensor_free(out);
	sd_vae_free(v);
	return 0;
}

int main(int argc, char **argv)
{
	int px = argc > 1 ? atoi(argv[1]) : 512;
	if (px < 64 || px % 8) {
		fprintf(stderr, "usage: %s [SIZE]  (SIZE a multiple of 8, at least 64)\n", argv[0]);
		return 2;
	}
	printf("| bench      | size      | th | seconds |  s/MP   |  GMAC  | GFLOP/s | RSS MiB | MiB/MP  | act MiB | act/MP  |\n");
	printf("|------------|-----------|----|---------|---------|--------|---------|---------|---------|---------|---------|\n");
	fflush(stdout);
	const char *what[2] = {"decode", "encode"};
	int fail = 0;
	for (int i = 0; i < 2; i++) {
		pid_t pid = fork();
		if (pid == 0) _exit(run(what[i], px));
		int st;
		if (pid < 0 || waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) fail = 1;
	}
	return fail;
}
