/*
 * bench/train.c - seconds per LoRA training step (sd_train_step: forward recorded or checkpointed,
 * backward, Adam) at the full Stable Diffusion 1.5 shape with random weights: the UNet from
 * sd_unet_new_random (859.5 M parameters), the text encoder (CLIP ViT-L/14 text tower: 12 layers, 768
 * wide, 123 M parameters) written once as a random diffusers folder under $TMPDIR and loaded.  LoRA as
 * the study: rank 8, alpha 16, dropout 0.05 on the UNet's attn1/attn2 to_q/to_v and CLIP's
 * q_proj/v_proj; the VAE frozen, so the batch carries cached latents.  Batch 1 (or -b N), 77 tokens.
 * Each size and mode (plain, --checkpointing) runs in its own child process so that its peak RSS
 * (getrusage ru_maxrss: weights, activations, gradients and optimizer state) is its own.  One warm-up
 * step, then the best of the timed steps.  The machine may be shared: timings are noisy.
 *
 *   build/bench/train [-b N] [SIZE…]     sizes in pixels, multiples of 8 (default 256); SD_THREADS threads
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
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

static void fill(float *p, int64_t n, uint64_t *s, float scale, float center)
{
	for (int64_t i = 0; i < n; i++) {
		*s = *s * 6364136223846793005ull + 1442695040888963407ull;
		p[i] = center + scale * (float)((*s >> 40) * (2.0 / 16777216.0) - 1.0);
	}
}

static int write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	if (!f) return -1;
	fputs(text, f);
	return fclose(f);
}

/* A random SD 1.5 text encoder as a diffusers folder dir/{model_index.json, text_encoder/}. */
static int make_clip(const char *dir)
{
	enum { D = 768, F = 3072, V = 49408, P = 77, LAYERS = 12 };
	char p[600];
	mkdir(dir, 0700);
	snprintf(p, sizeof p, "%s/text_encoder", dir);
	mkdir(p, 0700);
	snprintf(p, sizeof p, "%s/model_index.json", dir);
	if (write_text(p, "{\"_class_name\": \"StableDiffusionPipeline\", \"text_encoder\": [\"transformers\", "
	                  "\"CLIPTextModel\"]}\n"))
		return -1;
	snprintf(p, sizeof p, "%s/text_encoder/config.json", dir);
	if (write_text(p, "{\"hidden_size\": 768, \"intermediate_size\": 3072, \"num_hidden_layers\": 12, "
	                  "\"num_attention_heads\": 12, \"max_position_embeddings\": 77, \"vocab_size\": 49408, "
	                  "\"hidden_act\": \"quick_gelu\", \"layer_norm_eps\": 1e-05}\n"))
		return -1;
	int n = 0, cap = 4 + LAYERS * 16;
	char **names = calloc(cap, sizeof *names);
	sd_tensor **ts = calloc(cap, sizeof *ts);
	uint64_t s = 7;
#define ADD(name, nd, d0, d1, scale, center) do {                                   \
		names[n] = strdup(name);                                                    \
		ts[n] = nd == 1 ? sd_tensor_newv(SD_DTYPE_F32, 1, (int64_t)(d0))             \
		                : sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)(d0), (int64_t)(d1)); \
		fill(ts[n]->data, sd_tensor_numel(ts[n]), &s, scale, center);               \
		n++;                                                                        \
	} while (0)
	ADD("text_model.embeddings.token_embedding.weight", 2, V, D, 0.02f, 0);
	ADD("text_model.embeddings.position_embedding.weight", 2, P, D, 0.02f, 0);
	char b[160];
	for (int l = 0; l < LAYERS; l++) {
		static const char *const lin[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
		                                  "self_attn.out_proj", "mlp.fc1", "mlp.fc2"};
		for (int k = 0; k < 6; k++) {
			int O = k == 4 ? F : D, I = k == 5 ? F : D;
			snprintf(b, sizeof b, "text_model.encoder.layers.%d.%s.weight", l, lin[k]);
			ADD(b, 2, O, I, 1.0f / 32, 0);
			snprintf(b, sizeof b, "text_model.encoder.layers.%d.%s.bias", l, lin[k]);
			ADD(b, 1, O, 0, 0.02f, 0);
		}
		for (int k = 1; k <= 2; k++) {
			snprintf(b, sizeof b, "text_model.encoder.layers.%d.layer_norm%d.weight", l, k);
			ADD(b, 1, D, 0, 0.1f, 1);
			snprintf(b, sizeof b, "text_model.encoder.layers.%d.layer_norm%d.bias", l, k);
			ADD(b, 1, D, 0, 0.1f, 0);
		}
	}
	ADD("text_model.final_layer_norm.weight", 1, D, 0, 0.1f, 1);
	ADD("text_model.final_layer_norm.bias", 1, D, 0, 0.1f, 0);
#undef ADD
	snprintf(p, sizeof p, "%s/text_encoder/model.safetensors", dir);
	int rc = sd_st_write(p, n, (const char *const *)names, (const sd_tensor *const *)ts, NULL);
	for (int i = 0; i < n; i++) free(names[i]), sd_tensor_free(ts[i]);
	free(names);
	free(ts);
	return rc;
}

static int run(const char *clip_dir, int px, int N, int ckpt)
{
	sd_unet_config c = {.in_channels = 4, .out_channels = 4, .nblocks = 4, .block_out = {320, 640, 1280, 1280},
	                    .down_attn = {1, 1, 1, 0}, .up_attn = {0, 1, 1, 1}, .mid_attn = 1,
	                    .heads = {8, 8, 8, 8}, .cross_dim = {768, 768, 768, 768}, .flip_sin_to_cos = 1};
	sd_unet *u = sd_unet_new_random(&c, SD_DEVICE_CPU, 1);
	sd_model *m = sd_model_open(clip_dir, NULL);
	sd_weights *w = m ? sd_weights_load(m, SD_TEXT_ENCODER, SD_DEVICE_CPU) : NULL;
	sd_clip *te = w ? sd_clip_new(w) : NULL;
	if (!u || !te) {
		fprintf(stderr, "bench/train: %s\n", sd_errmsg());
		return 1;
	}
	sd_train_config tc;
	sd_train_defaults(&tc); /* the study's: r 8, alpha 16, dropout 0.05, Adam lr 1e-4 */
	tc.train = SD_TRAIN_UNET | SD_TRAIN_TEXT;
	tc.checkpointing = ckpt;
	tc.seed = 1;
	sd_trainer *t = sd_trainer_new(&tc, u, te, NULL);
	if (!t) {
		fprintf(stderr, "bench/train: %s\n", sd_errmsg());
		return 1;
	}
	int64_t nparam = 0;
	for (int i = 0; i < sd_trainer_param_count(t); i++) nparam += sd_tensor_numel(sd_trainer_param(t, i));
	const int lat = px / 8, L = 77;
	sd_tensor *x = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)N, 4, (int64_t)lat, (int64_t)lat);
	sd_tensor *z = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)N, 4, (int64_t)lat, (int64_t)lat);
	sd_tensor *ids = sd_tensor_newv(SD_DTYPE_I32, 2, (int64_t)N, (int64_t)L);
	uint64_t s = 42;
	fill(x->data, sd_tensor_numel(x), &s, 1.0f, 0);
	fill(z->data, sd_tensor_numel(z), &s, 1.7f, 0);
	int32_t *id = ids->data;
	for (int64_t i = 0; i < N * L; i++) id[i] = i % L == 0 ? SD_CLIP_BOS : i % L < 12 ? 320 + (int32_t)(i % 977) : SD_CLIP_EOS;
	int64_t ts[64];
	for (int i = 0; i < N; i++) ts[i] = (i * 397 + 211) % 1000;
	sd_train_batch b = {.latents = x, .input_ids = ids, .timesteps = ts, .noise = z};
	int steps = 2;
	double best = 1e30, warm = 0, loss = 0;
	for (int i = 0; i <= steps; i++) {
		double t0 = now();
		if (sd_train_step(t, &b, &loss)) {
			fprintf(stderr, "bench/train: %s\n", sd_errmsg());
			return 1;
		}
		double dt = now() - t0;
		if (i == 0) warm = dt;
		else if (dt < best) best = dt;
	}
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	double rss = ru.ru_maxrss / 1024.0, act = sd_trainer_peak_bytes(t) / 1048576.0;
	printf("| train b%-2d %-5s | %4dx%-4d | %2d | %7.2f | %7.2f | %8.0f | %7.0f | %9lld | %.4f%s\n", N,
	       ckpt ? "ckpt" : "plain", px, px, sd_threads(), best, warm, rss, act, (long long)nparam, loss,
	       loss == loss ? "" : " (non-finite loss!)");
	fflush(stdout);
	sd_trainer_free(t);
	sd_tensor_free(x), sd_tensor_free(z), sd_tensor_free(ids);
	sd_clip_free(te);
	sd_weights_free(w);
	sd_model_close(m);
	sd_unet_free(u);
	return loss == loss ? 0 : 1;
}

int main(int argc, char **argv)
{
	int sizes[8], ns = 0, N = 1;
	for (int i = 1; i < argc; i++) {
		char *end;
		if (!strcmp(argv[i], "-b") && i + 1 < argc) {
			N = (int)strtol(argv[++i], &end, 10);
			if (*end || N < 1 || N > 64) goto usage;
			continue;
		}
		long px = strtol(argv[i], &end, 10);
		if (*end || px < 64 || px > 4096 || px % 8 || ns == 8) goto usage;
		sizes[ns++] = (int)px;
	}
	if (!ns) sizes[ns++] = 256;
	const char *tmp = getenv("TMPDIR");
	char dir[512];
	snprintf(dir, sizeof dir, "%s/sdpipe-bench-clip-%d", tmp && *tmp ? tmp : "/tmp", (int)getpid());
	if (make_clip(dir)) {
		fprintf(stderr, "bench/train: cannot write the random text encoder under %s: %s\n", dir, sd_errmsg());
		return 1;
	}
	printf("| bench            | size      | th | s/step  | warm-up | RSS MiB  | act MiB | LoRA params | loss\n");
	printf("|------------------|-----------|----|---------|---------|----------|---------|-------------|------\n");
	fflush(stdout);
	int fail = 0;
	for (int i = 0; i < ns; i++)
		for (int ck = 0; ck < 2; ck++) {
			pid_t pid = fork();
			if (pid == 0) _exit(run(dir, sizes[i], N, ck));
			int st;
			if (pid < 0 || waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st)) fail = 1;
		}
	char p[600];
	snprintf(p, sizeof p, "%s/text_encoder/model.safetensors", dir), unlink(p);
	snprintf(p, sizeof p, "%s/text_encoder/config.json", dir), unlink(p);
	snprintf(p, sizeof p, "%s/model_index.json", dir), unlink(p);
	snprintf(p, sizeof p, "%s/text_encoder", dir), rmdir(p);
	rmdir(dir);
	return fail;
usage:
	fprintf(stderr, "usage: %s [-b N] [SIZE…]  (SIZE a multiple of 8 in [64, 4096]; default 256)\n", argv[0]);
	return 2;
}
