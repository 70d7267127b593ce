/*
 * test_clip.c - the CLIP text encoder (lib/models/clip.c) against transformers' CLIPTextModel:
 * golden/<model>/text_encoder.safetensors holds input_ids [3,77], every hidden state [layers+1,3,77,D]
 * and last_hidden_state [3,77,D] of te(input_ids, output_hidden_states=True).  From the input_ids we must
 * reproduce all of them (relative error <= 1e-4, printed), A1111's clip skip 2 must be the final LN of
 * hidden_states[-2], the recorded forward must agree with the plain one, and the same numbers must come
 * from every checkpoint layout: the tiny diffusers folder (fp16 variant files), the tiny .ckpt with its
 * config folder, and with $SHARED the sd15-shape-small folder and its single-file twin.  CUDA results
 * are compared with the CPU's when a GPU is there.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "sd.h"
#include "test.h"

#define RTOL 1e-4

static const char *fixtures(void)
{
	const char *s = getenv("SD_FIXTURES");
	return s && *s ? s : "tests/fixtures";
}

/* $SHARED when it names a folder, else NULL. */
static const char *shared(void)
{
	const char *s = getenv("SHARED");
	struct stat st;
	return s && *s && stat(s, &st) == 0 && S_ISDIR(st.st_mode) ? s : NULL;
}

static char path_buf[8][4096];
static int path_i;
/* printf into one of a few rotating static buffers (test code: short-lived paths). */
static const char *P(const char *fmt, const char *a, const char *b)
{
	char tmp[sizeof path_buf[0]], *p = path_buf[path_i++ % 8];
	snprintf(tmp, sizeof tmp, fmt, a, b); /* a or b may be an older P() result */
	memcpy(p, tmp, sizeof tmp);
	return p;
}

static int exists(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0;
}

/* (sd_tensor_newv reads its dimensions as int64_t varargs: literals are cast) */

/* ==== golden data ==== */

typedef struct {
	sd_st *st;
	const sd_tensor *ids, *last, *hidden; /* i64 (B,L), f32 (B,L,D), f32 (K,B,L,D) */
} golden;

static int golden_open(golden *g, const char *path)
{
	memset(g, 0, sizeof *g);
	if (!(g->st = sd_st_open(path))) return -1;
	int i = sd_st_find(g->st, "input_ids"), j = sd_st_find(g->st, "last_hidden_state"),
	    k = sd_st_find(g->st, "hidden_states");
	if (i < 0 || j < 0 || k < 0) return sd_seterr("%s: missing tensors", path);
	g->ids = sd_st_tensor(g->st, i);
	g->last = sd_st_tensor(g->st, j);
	g->hidden = sd_st_tensor(g->st, k);
	return 0;
}

static float *slice(const sd_tensor *stacked, int64_t k)
{
	int64_t per = sd_tensor_numel(stacked) / stacked->shape[0];
	return (float *)stacked->data + k * per;
}

/* Load the text encoder of a model (path, config_dir) on dev; NULL (with a FAIL printed) on error. */
static sd_clip *load(const char *path, const char *config_dir, enum sd_device dev, sd_weights **wout)
{
	*wout = NULL;
	sd_model *m = sd_model_open(path, config_dir);
	if (!m) {
		printf("  sd_model_open(%s): %s\n", path, sd_errmsg());
		test_failed_++;
		return NULL;
	}
	sd_weights *w = sd_weights_load(m, SD_TEXT_ENCODER, dev);
	sd_model_close(m);
	if (!w) {
		printf("  sd_weights_load(%s): %s\n", path, sd_errmsg());
		test_failed_++;
		return NULL;
	}
	sd_clip *c = sd_clip_new(w);
	if (!c) {
		printf("  sd_clip_new(%s): %s\n", path, sd_errmsg());
		test_failed_++;
		sd_weights_free(w);
		return NULL;
	}
	*wout = w;
	return c;
}

/*
 * The whole golden comparison for one loaded encoder: every hidden state, the last hidden state, clip
 * skip 2 against final_layer_norm(hidden_states[-2]) of the reference.  *out_copy (when not NULL) gets
 * a malloc'd copy of last_hidden_state as computed, for cross-layout comparisons.
 */
static void check_golden(sd_clip *c, const sd_weights *w, const golden *g, float **out_copy)
{
	const sd_clip_config *cfg = sd_clip_get_config(c);
	const int64_t B = g->ids->shape[0], L = g->ids->shape[1], D = cfg->hidden, K = cfg->layers + 1;
	CHECK(g->hidden->shape[0] == K && g->last->shape[2] == D);
	if (g->hidden->shape[0] != K || g->last->shape[2] != D) return;
	sd_tensor *out = sd_tensor_newv(SD_DTYPE_F32, 3, B, L, D);
	sd_tensor *hid = sd_tensor_newv(SD_DTYPE_F32, 4, K, B, L, D);
	sd_tensor *skip = sd_tensor_newv(SD_DTYPE_F32, 3, B, L, D);
	sd_tensor *want = sd_tensor_newv(SD_DTYPE_F32, 3, B, L, D);
	int64_t n = B * L * D;

	/* the golden ids are i64: taken as they are (converted inside) */
	CHECK_OK(sd_clip_encode(c, out, g->ids, 0, hid));
	CHECK_CLOSE((float *)out->data, (float *)g->last->data, n, RTOL);
	for (int64_t k = 0; k < K; k++) {
		printf("  hidden_states[%lld]:\n", (long long)k);
		CHECK_CLOSE(slice(hid, k), slice(g->hidden, k), n, RTOL);
	}

	/* without the hidden-state record the result is the same, bit for bit */
	sd_tensor *out2 = sd_tensor_newv(SD_DTYPE_F32, 3, B, L, D);
	CHECK_OK(sd_clip_encode(c, out2, g->ids, 1, NULL));
	CHECK(memcmp(out2->data, out->data, sd_tensor_nbytes(out)) == 0);

	/* clip skip 2 (A1111) = final_layer_norm(hidden_states[-2]) */
	sd_tensor h2 = *g->hidden;
	h2.ndim = 3;
	memmove(h2.shape, g->hidden->shape + 1, 3 * sizeof(int64_t));
	h2.data = slice(g->hidden, K - 2);
	h2.owns = 0;
	sd_tensor *h2c = sd_tensor_convert(&h2, SD_DTYPE_F32); /* a CPU copy, for the CPU layer norm */
	const sd_tensor *fw = sd_weights_get(w, "text_model.final_layer_norm.weight");
	const sd_tensor *fb = sd_weights_get(w, "text_model.final_layer_norm.bias");
	sd_tensor *fwc = fw ? sd_tensor_to_device(fw, SD_DEVICE_CPU) : NULL;
	sd_tensor *fbc = fb ? sd_tensor_to_device(fb, SD_DEVICE_CPU) : NULL;
	CHECK(h2c && fwc && fbc);
	if (h2c && fwc && fbc) {
		CHECK_OK(sd_layer_norm(want, h2c, fwc, fbc, cfg->eps));
		CHECK_OK(sd_clip_encode(c, skip, g->ids, 2, NULL));
		printf("  clip skip 2:\n");
		CHECK_CLOSE((float *)skip->data, (float *)want->data, n, RTOL);
		/* and it is not the last layer's output */
		CHECK(memcmp(skip->data, out->data, sd_tensor_nbytes(out)) != 0);
		/* the hidden-state record does not change the clip-skip result */
		CHECK_OK(sd_clip_encode(c, out2, g->ids, 2, hid));
		CHECK(memcmp(out2->data, skip->data, sd_tensor_nbytes(out)) == 0);
	}
	if (out_copy) {
		*out_copy = malloc(sd_tensor_nbytes(out));
		if (*out_copy) memcpy(*out_copy, out->data, sd_tensor_nbytes(out));
	}
	sd_tensor_free(h2c);
	sd_tensor_free(fwc);
	sd_tensor_free(fbc);
	sd_tensor_free(out);
	sd_tensor_free(out2);
	sd_tensor_free(hid);
	sd_tensor_free(skip);
	sd_tensor_free(want);
}

/* ==== tests ==== */

TEST(tiny_folder)
{
	golden g;
	const char *dir = P("%s/tiny%s", fixtures(), "");
	if (golden_open(&g, P("%s/golden/tiny/text_encoder.safetensors", fixtures(), "")) < 0) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return;
	}
	sd_weights *w;
	sd_clip *c = load(dir, NULL, SD_DEVICE_CPU, &w);
	if (c) {
		const sd_clip_config *cfg = sd_clip_get_config(c);
		CHECK(cfg->hidden == 32 && cfg->layers == 5 && cfg->heads == 4 && cfg->intermediate == 37 &&
		      cfg->max_pos == 77 && cfg->vocab == 49408 && cfg->act == SD_ACT_QUICK_GELU &&
		      fabsf(cfg->eps - 1e-5f) < 1e-12f);
		check_golden(c, w, &g, NULL);
	}
	sd_clip_free(c);
	sd_weights_free(w);
	sd_st_close(g.st);
}

/* The recorded forward (every activation in an arena) gives the same numbers, and its attention
 * weights are causal rows that sum to 1. */
TEST(record)
{
	golden g;
	if (golden_open(&g, P("%s/golden/tiny/text_encoder.safetensors", fixtures(), "")) < 0) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return;
	}
	sd_weights *w;
	sd_clip *c = load(P("%s/tiny%s", fixtures(), ""), NULL, SD_DEVICE_CPU, &w);
	sd_tensor *ids = sd_tensor_convert(g.ids, SD_DTYPE_I32);
	sd_arena *a = sd_arena_new(SD_DEVICE_CPU, 0);
	if (c && ids && a) {
		const sd_clip_config *cfg = sd_clip_get_config(c);
		const int64_t B = ids->shape[0], L = ids->shape[1], n = B * L * cfg->hidden;
		sd_clip_act act;
		CHECK_OK(sd_clip_encode_record(c, &act, a, ids, 0));
		CHECK(act.nlayers == cfg->layers);
		CHECK_CLOSE((float *)act.out->data, (float *)g.last->data, n, RTOL);
		for (int k = 0; k <= act.nlayers; k++) {
			printf("  recorded hidden[%d]:\n", k);
			CHECK_CLOSE((float *)act.hidden[k]->data, slice(g.hidden, k), n, RTOL);
		}
		/* probs: (B, H, L, L), zero above the diagonal, rows summing to 1 */
		const float *pr = act.layer[0].probs->data;
		double worst_sum = 0, worst_upper = 0;
		for (int64_t r = 0; r < B * cfg->heads * L; r++) {
			int64_t i = r % L;
			double s = 0;
			for (int64_t j = 0; j < L; j++) {
				s += pr[r * L + j];
				if (j > i && fabs(pr[r * L + j]) > worst_upper) worst_upper = fabs(pr[r * L + j]);
			}
			if (fabs(s - 1) > worst_sum) worst_sum = fabs(s - 1);
		}
		printf("  probs: max |row sum - 1| %.3g, max |masked| %.3g\n", worst_sum, worst_upper);
		CHECK(worst_sum < 1e-5 && worst_upper == 0);
		/* the residual stream is kept apart from the layer output (a backward needs both) */
		CHECK(act.layer[0].res1 != act.hidden[1] && act.layer[0].res1->data != act.hidden[1]->data);

		/* clip skip 2: one layer fewer, out = final LN of hidden[layers-1] */
		sd_arena_reset(a);
		CHECK_OK(sd_clip_encode_record(c, &act, a, ids, 2));
		CHECK(act.nlayers == cfg->layers - 1);
		sd_tensor *skip = sd_tensor_newv(SD_DTYPE_F32, 3, B, L, (int64_t)cfg->hidden);
		CHECK_OK(sd_clip_encode(c, skip, ids, 2, NULL));
		CHECK(memcmp(skip->data, act.out->data, sd_tensor_nbytes(skip)) == 0);
		sd_tensor_free(skip);
		printf("  arena peak %zu bytes, encode peak %zu bytes\n", sd_arena_peak(a), sd_clip_peak_bytes(c));
	}
	sd_arena_free(a);
	sd_tensor_free(ids);
	sd_clip_free(c);
	sd_weights_free(w);
	sd_st_close(g.st);
}

/* The original LDM .ckpt with the tiny folder's configs gives exactly the folder's numbers (both are
 * lossless fp16 copies of the same weights). */
TEST(tiny_ckpt)
{
	const char *ckpt = P("%s/tiny.ldm.ckpt%s", fixtures(), "");
	if (!exists(ckpt)) SKIP("no %s", ckpt);
	golden g;
	if (golden_open(&g, P("%s/golden/tiny/text_encoder.safetensors", fixtures(), "")) < 0) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return;
	}
	const char *dir = P("%s/tiny%s", fixtures(), "");
	sd_weights *w1, *w2;
	sd_clip *c1 = load(dir, NULL, SD_DEVICE_CPU, &w1);
	sd_clip *c2 = load(ckpt, dir, SD_DEVICE_CPU, &w2);
	if (c1 && c2) {
		float *a = NULL, *b = NULL;
		check_golden(c1, w1, &g, &a);
		printf("  ckpt:\n");
		check_golden(c2, w2, &g, &b);
		size_t n = sd_tensor_numel(g.last) * sizeof(float);
		CHECK(a && b && memcmp(a, b, n) == 0);
		free(a);
		free(b);
	}
	sd_clip_free(c1);
	sd_clip_free(c2);
	sd_weights_free(w1);
	sd_weights_free(w2);
	sd_st_close(g.st);
}

/* sd15-shape-small (D 64, 2 layers, 4 heads, F 256): the fp16 diffusers folder and the single-file
 * .safetensors with the folder as config. */
TEST(sd15_shape_small)
{
	const char *sh = shared();
	if (!sh) SKIP("no $SHARED");
	const char *dir = P("%s/sd15-shape-small%s", sh, "");
	const char *single = P("%s/sd15-shape-small.ldm.fp16.safetensors%s", sh, "");
	const char *gold = P("%s/golden/sd15-shape-small/text_encoder.safetensors%s", sh, "");
	if (!exists(dir) || !exists(single) || !exists(gold)) SKIP("sd15-shape-small is not in %s", sh);
	golden g;
	if (golden_open(&g, gold) < 0) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return;
	}
	sd_weights *w1, *w2, *w3;
	sd_clip *c1 = load(dir, NULL, SD_DEVICE_CPU, &w1);
	sd_clip *c2 = load(single, dir, SD_DEVICE_CPU, &w2);
	sd_clip *c3 = load(single, NULL, SD_DEVICE_CPU, &w3); /* heads = 64/64 from the SD conventions: wrong here */
	if (c1 && c2) {
		const sd_clip_config *cfg = sd_clip_get_config(c1);
		CHECK(cfg->hidden == 64 && cfg->layers == 2 && cfg->heads == 4 && cfg->intermediate == 256);
		float *a = NULL, *b = NULL;
		check_golden(c1, w1, &g, &a);
		printf("  single file:\n");
		check_golden(c2, w2, &g, &b);
		size_t n = sd_tensor_numel(g.last) * sizeof(float);
		CHECK(a && b && memcmp(a, b, n) == 0);
		free(a);
		free(b);
	}
	if (c3) printf("  single file without config: %d heads (SD 1.x convention hidden/64)\n",
	               sd_clip_get_config(c3)->heads);
	sd_clip_free(c1);
	sd_clip_free(c2);
	sd_clip_free(c3);
	sd_weights_free(w1);
	sd_weights_free(w2);
	sd_weights_free(w3);
	sd_st_close(g.st);
}

/* Bad calls fail with a message and leave the encoder usable. */
TEST(bad_input)
{
	sd_weights *w;
	sd_clip *c = load(P("%s/tiny%s", fixtures(), ""), NULL, SD_DEVICE_CPU, &w);
	if (!c) return;
	sd_tensor *ids = sd_tensor_newv(SD_DTYPE_I32, 2, (int64_t)1, (int64_t)77);
	sd_tensor *out = sd_tensor_newv(SD_DTYPE_F32, 3, (int64_t)1, (int64_t)77, (int64_t)32);
	int32_t *p = ids->data;
	for (int i = 0; i < 77; i++) p[i] = SD_CLIP_EOS;
	p[0] = SD_CLIP_BOS;
	CHECK_OK(sd_clip_encode(c, out, ids, 0, NULL));

	p[5] = 49408; /* one past the vocabulary */
	CHECK(sd_clip_encode(c, out, ids, 0, NULL) < 0 && strstr(sd_errmsg(), "out of range"));
	printf("  %s\n", sd_errmsg());
	p[5] = -1;
	CHECK(sd_clip_encode(c, out, ids, 0, NULL) < 0 && strstr(sd_errmsg(), "out of range"));
	p[5] = SD_CLIP_EOS;

	CHECK(sd_clip_encode(c, out, ids, 6, NULL) < 0 && strstr(sd_errmsg(), "clip skip"));
	printf("  %s\n", sd_errmsg());
	CHECK(sd_clip_encode(c, out, ids, 5, NULL) == 0); /* the first layer's output: still valid */

	sd_tensor *long_ids = sd_tensor_newv(SD_DTYPE_I32, 2, (int64_t)1, (int64_t)78);
	sd_tensor *long_out = sd_tensor_newv(SD_DTYPE_F32, 3, (int64_t)1, (int64_t)78, (int64_t)32);
	CHECK(sd_clip_encode(c, long_out, long_ids, 0, NULL) < 0 && strstr(sd_errmsg(), "L <= 77"));
	printf("  %s\n", sd_errmsg());

	sd_tensor *wrong = sd_tensor_newv(SD_DTYPE_F32, 3, (int64_t)1, (int64_t)77, (int64_t)16);
	CHECK(sd_clip_encode(c, wrong, ids, 0, NULL) < 0 && strstr(sd_errmsg(), "out is"));
	printf("  %s\n", sd_errmsg());
	sd_tensor *fids = sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)1, (int64_t)77);
	CHECK(sd_clip_encode(c, out, fids, 0, NULL) < 0 && strstr(sd_errmsg(), "i32 or i64"));

	/* shorter sequences are fine (transformers takes any L <= max_position_embeddings) and equal the
	 * first L positions of the long one: the mask is causal */
	sd_tensor *short_ids = sd_tensor_newv(SD_DTYPE_I32, 2, (int64_t)1, (int64_t)10);
	sd_tensor *short_out = sd_tensor_newv(SD_DTYPE_F32, 3, (int64_t)1, (int64_t)10, (int64_t)32);
	memcpy(short_ids->data, p, 10 * sizeof(int32_t));
	CHECK_OK(sd_clip_encode(c, out, ids, 0, NULL));
	CHECK_OK(sd_clip_encode(c, short_out, short_ids, 0, NULL));
	CHECK_CLOSE((float *)short_out->data, (float *)out->data, 10 * 32, 1e-6);

	/* weights of another component */
	sd_model *m = sd_model_open(P("%s/tiny%s", fixtures(), ""), NULL);
	sd_weights *vw = m ? sd_weights_load(m, SD_VAE, SD_DEVICE_CPU) : NULL;
	if (vw) {
		CHECK(sd_clip_new(vw) == NULL && strstr(sd_errmsg(), "not the text_encoder"));
		printf("  %s\n", sd_errmsg());
	}
	sd_weights_free(vw);
	sd_model_close(m);
	sd_clip_free(NULL);

	sd_tensor_free(ids);
	sd_tensor_free(out);
	sd_tensor_free(long_ids);
	sd_tensor_free(long_out);
	sd_tensor_free(wrong);
	sd_tensor_free(fids);
	sd_tensor_free(short_ids);
	sd_tensor_free(short_out);
	sd_clip_free(c);
	sd_weights_free(w);
}

/* A text encoder with a weight missing or of the wrong shape is refused, naming the weight. */
TEST(bad_weights)
{
	const char *dir = P("%s/tiny%s", fixtures(), "");
	const char *tmp = getenv("TMPDIR");
	char root[4096];
	snprintf(root, sizeof root, "%s/sdclip.XXXXXX", tmp && *tmp ? tmp : "/tmp");
	if (!mkdtemp(root)) SKIP("no temporary folder");
	sd_model *m = sd_model_open(dir, NULL);
	sd_weights *w = m ? sd_weights_load(m, SD_TEXT_ENCODER, SD_DEVICE_CPU) : NULL;
	sd_model_close(m);
	CHECK(w);
	char te[4200], file[4300], cfg[4300], idx[4300];
	snprintf(te, sizeof te, "%s/text_encoder", root);
	snprintf(file, sizeof file, "%s/model.safetensors", te);
	snprintf(cfg, sizeof cfg, "%s/config.json", te);
	snprintf(idx, sizeof idx, "%s/model_index.json", root);
	size_t len;
	char *cj = sd_read_file(P("%s/text_encoder/config.json%s", dir, ""), 0, &len);
	char *mj = sd_read_file(P("%s/model_index.json%s", dir, ""), 0, &len);
	CHECK(cj && mj && mkdir(te, 0755) == 0);
	if (w && cj && mj && sd_write_file_atomic(cfg, cj, strlen(cj)) == 0 &&
	    sd_write_file_atomic(idx, mj, strlen(mj)) == 0) {
		int n = sd_weights_count(w);
		const char **names = malloc(n * sizeof *names);
		const sd_tensor **ts = malloc(n * sizeof *ts);
		for (int pass = 0; pass < 2; pass++) {
			int k = 0;
			sd_tensor *bad = NULL;
			for (int i = 0; i < n; i++) {
				const char *name = sd_weights_name(w, i);
				if (!strcmp(name, "text_model.encoder.layers.3.mlp.fc2.weight")) {
					if (pass == 0) continue; /* missing */
					bad = sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)32, (int64_t)36); /* wrong shape */
					names[k] = name, ts[k++] = bad;
					continue;
				}
				names[k] = name, ts[k++] = sd_weights_at(w, i);
			}
			CHECK_OK(sd_st_write(file, k, names, (const sd_tensor *const *)ts, NULL));
			sd_tensor_free(bad);
			sd_model *bm = sd_model_open(root, NULL);
			sd_weights *bw = bm ? sd_weights_load(bm, SD_TEXT_ENCODER, SD_DEVICE_CPU) : NULL;
			sd_clip *bc = bw ? sd_clip_new(bw) : NULL;
			const char *e = sd_errmsg();
			printf("  %s: %s\n", pass ? "wrong shape" : "missing", e);
			CHECK(!bc && strstr(e, "text_encoder") && strstr(e, "layers.3.mlp.fc2.weight"));
			sd_clip_free(bc);
			sd_weights_free(bw);
			sd_model_close(bm);
		}
		free(names);
		free(ts);
	}
	unlink(file);
	unlink(cfg);
	unlink(idx);
	rmdir(te);
	rmdir(root);
	free(cj);
	free(mj);
	sd_weights_free(w);
}

/* The CUDA backend against the CPU (skipped without a GPU). */
TEST(cuda)
{
	if (!sd_cuda_available()) SKIP("no CUDA device");
	golden g;
	if (golden_open(&g, P("%s/golden/tiny/text_encoder.safetensors", fixtures(), "")) < 0) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return;
	}
	sd_weights *w;
	sd_clip *c = load(P("%s/tiny%s", fixtures(), ""), NULL, SD_DEVICE_CUDA, &w);
	if (c) {
		/* while the CUDA backend lacks an op the encoder needs, say so and skip */
		sd_tensor *out = sd_tensor_newv(SD_DTYPE_F32, 3, g.ids->shape[0], g.ids->shape[1],
		                                (int64_t)sd_clip_get_config(c)->hidden);
		int rc = sd_clip_encode(c, out, g.ids, 0, NULL);
		sd_tensor_free(out);
		if (rc < 0 && strstr(sd_errmsg(), "not implemented on cuda")) {
			char why[200];
			snprintf(why, sizeof why, "%s", sd_errmsg());
			sd_clip_free(c);
			sd_weights_free(w);
			sd_st_close(g.st);
			SKIP("%s", why);
		}
		check_golden(c, w, &g, NULL);
	}
	sd_clip_free(c);
	sd_weights_free(w);
	sd_st_close(g.st);
}

int main(void)
{
	RUN(tiny_folder);
	RUN(record);
	RUN(tiny_ckpt);
	RUN(sd15_shape_small);
	RUN(bad_input);
	RUN(bad_weights);
	RUN(cuda);
	return test_summary();
}
