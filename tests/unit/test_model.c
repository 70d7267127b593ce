/*
 * test_model.c - tests of lib/models/model.c and ldm-names.c: the tiny model as a diffusers folder
 * (tests/fixtures/tiny, lossless fp16 copies of the reference's f32 files) loads with the parameter
 * counts and configs of ../shared/fixtures/README.md; the same model as an original LDM .ckpt
 * (tests/fixtures/tiny.ldm.ckpt, written by torch.save) and as a single-file .safetensors made from it
 * gives the same names and bit-identical tensors, as diffusers' single-file conversion does; configs
 * inferred from shapes alone match config.json; with $SHARED the sd15-shape-small folder and its
 * single-file twin agree too; and bad models are refused with messages that say why.
 */
#include <errno.h>
#include <ftw.h>
#include <jansson.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>
#include "sd.h"
#include "models/model.h"
#include "test.h"

/* ==== helpers ==== */

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

static char *join(const char *dir, const char *name)
{
	char *s = malloc(strlen(dir) + strlen(name) + 2);
	if (s) sprintf(s, "%s/%s", dir, name);
	return s;
}

static int exists(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0;
}

static int rm_entry(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	return remove(path);
}

static char *tmp_dir(void)
{
	const char *t = getenv("TMPDIR");
	char buf[4096];
	snprintf(buf, sizeof buf, "%s/sdmodel.XXXXXX", t && *t ? t : "/tmp");
	return mkdtemp(buf) ? strdup(buf) : NULL;
}

static void rm_tree(char *dir)
{
	if (dir) nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
	free(dir);
}

static void write_bytes(const char *path, const char *data, size_t n)
{
	FILE *f = fopen(path, "wb");
	if (f) {
		fwrite(data, 1, n, f);
		fclose(f);
	}
}

static void write_text(const char *path, const char *text)
{
	write_bytes(path, text, strlen(text));
}

/* The tiny model's LDM checkpoint: our copy, else the shared one, else NULL. */
static char *tiny_ckpt(void)
{
	char *p = join(fixtures(), "tiny.ldm.ckpt");
	if (p && exists(p)) return p;
	free(p);
	return shared() ? join(shared(), "tiny.ldm.ckpt") : NULL;
}

/* CHECK that an open or a load failed with a message holding every given substring. */
#define CHECK_ERR(expr, ...) do {                                                       \
	const void *r_ = (expr);                                                            \
	const char *want_[] = { __VA_ARGS__, NULL };                                        \
	int ok_ = r_ == NULL;                                                               \
	for (int k_ = 0; ok_ && want_[k_]; k_++) ok_ = strstr(sd_errmsg(), want_[k_]) != NULL; \
	if (!ok_) {                                                                         \
		printf("  %s:%d: %s: %s, message \"%s\"\n", __FILE__, __LINE__, #expr,         \
		       r_ ? "succeeded" : "failed", r_ ? "" : sd_errmsg());                     \
		test_failed_++;                                                                 \
	}                                                                                   \
	printf("  refused as expected: %s\n", sd_errmsg());                                 \
} while (0)

/*
 * Same names, dtypes, shapes and bytes, in the same (sorted) order; prints the first difference.
 * Returns 1 when equal.
 */
static int same_weights(const sd_weights *a, const sd_weights *b, const char *what)
{
	int n = sd_weights_count(a) < sd_weights_count(b) ? sd_weights_count(a) : sd_weights_count(b);
	for (int i = 0; i < n; i++) {
		const char *na = sd_weights_name(a, i), *nb = sd_weights_name(b, i);
		if (strcmp(na, nb) != 0) {
			printf("  %s: first name that differs: '%s' vs '%s' (at %d)\n", what, na, nb, i);
			test_failed_++;
			return 0;
		}
		const sd_tensor *ta = sd_weights_at(a, i), *tb = sd_weights_at(b, i);
		if (ta->dtype != tb->dtype || !sd_tensor_same_shape(ta, tb) ||
		    memcmp(ta->data, tb->data, sd_tensor_nbytes(ta)) != 0) {
			char sa[64], sb[64];
			printf("  %s: first tensor that differs: '%s' %s %s vs %s %s\n", what, na,
			       sd_dtype_name(ta->dtype), sd_shape_str(ta->ndim, ta->shape, sa, sizeof sa),
			       sd_dtype_name(tb->dtype), sd_shape_str(tb->ndim, tb->shape, sb, sizeof sb));
			test_failed_++;
			return 0;
		}
	}
	if (sd_weights_count(a) != sd_weights_count(b)) {
		const sd_weights *more = sd_weights_count(a) > n ? a : b;
		printf("  %s: %d vs %d tensors; first extra: '%s'\n", what, sd_weights_count(a),
		       sd_weights_count(b), sd_weights_name(more, n));
		test_failed_++;
		return 0;
	}
	printf("  %s: %d tensors identical\n", what, n);
	return 1;
}

/* The shape-determined config keys, compared between a loaded config and a config.json. */
static const char *const shape_keys[SD_COMPONENT_COUNT][10] = {
	[SD_TEXT_ENCODER] = { "hidden_size", "intermediate_size", "num_hidden_layers",
	                      "max_position_embeddings", "vocab_size" },
	[SD_VAE] = { "in_channels", "out_channels", "block_out_channels", "layers_per_block",
	             "latent_channels", "down_block_types", "up_block_types" },
	[SD_UNET] = { "in_channels", "out_channels", "block_out_channels", "layers_per_block",
	              "cross_attention_dim", "down_block_types", "up_block_types",
	              "transformer_layers_per_block", "use_linear_projection" },
};

/* Check that w's config has every shape key of dir/<component>/config.json with the same value. */
static void config_matches(const sd_weights *w, const char *dir, enum sd_component c)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/%s/config.json", dir, sd_component_name(c));
	json_error_t err;
	json_t *want = json_load_file(path, 0, &err), *got = json_loads(sd_config_json(w), 0, &err);
	CHECK(want && got);
	for (int k = 0; want && got && k < 10 && shape_keys[c][k]; k++) {
		const char *key = shape_keys[c][k];
		json_t *a = json_object_get(got, key), *b = json_object_get(want, key);
		if (!a || !b || !json_equal(a, b)) {
			char *sa = a ? json_dumps(a, JSON_ENCODE_ANY) : NULL, *sb = b ? json_dumps(b, JSON_ENCODE_ANY) : NULL;
			printf("  %s: config '%s' is %s, config.json says %s\n", sd_component_name(c), key,
			       sa ? sa : "absent", sb ? sb : "absent");
			free(sa);
			free(sb);
			test_failed_++;
		}
	}
	json_decref(want);
	json_decref(got);
}

/* Load every component of model path (config_dir may be NULL) and compare it with ref's weights. */
static void same_model(const char *path, const char *config_dir, sd_weights *const *ref, const char *what)
{
	sd_model *m = sd_model_open(path, config_dir);
	if (!m) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return;
	}
	for (int c = 0; c < SD_TEXT_ENCODER_2; c++) {
		CHECK(sd_model_has(m, c));
		sd_weights *w = sd_weights_load(m, c, SD_DEVICE_CPU);
		if (!w) {
			printf("  %s: %s\n", what, sd_errmsg());
			test_failed_++;
			continue;
		}
		char label[256];
		snprintf(label, sizeof label, "%s %s", what, sd_component_name(c));
		same_weights(w, ref[c], label);
		CHECK(sd_weights_params(w) == sd_weights_params(ref[c]));
		/* with the folder's configs: exactly the folder's config (nothing to add, nothing changed) */
		if (config_dir) {
			json_t *a = json_loads(sd_config_json(w), 0, NULL), *b = json_loads(sd_config_json(ref[c]), 0, NULL);
			CHECK(a && b && json_equal(a, b));
			json_decref(a);
			json_decref(b);
		}
		sd_weights_free(w);
	}
	sd_model_close(m);
}

/* The three components of a diffusers folder (NULL entries after a failure). */
static void load_all(const char *dir, sd_weights **w)
{
	sd_model *m = sd_model_open(dir, NULL);
	for (int c = 0; c < SD_TEXT_ENCODER_2; c++) {
		w[c] = m ? sd_weights_load(m, c, SD_DEVICE_CPU) : NULL;
		if (!w[c]) {
			printf("  %s\n", sd_errmsg());
			test_failed_++;
		}
	}
	sd_model_close(m);
}

static void free_all(sd_weights **w)
{
	for (int c = 0; c < SD_TEXT_ENCODER_2; c++) sd_weights_free(w[c]);
}

static char *tiny_dir(void)
{
	return join(fixtures(), "tiny");
}

/* ==== the name mapping on its own ==== */

TEST(ldm_names)
{
	/* SD 1.x geometry: 2 res blocks per level, 4 decoder levels */
	struct ldm_geom g = { .unet_lpb = 2, .vae_up_blocks = 4 };
	static const struct { enum sd_component c; const char *ldm, *hf; int flags; } cases[] = {
		{ SD_TEXT_ENCODER, "cond_stage_model.transformer.text_model.final_layer_norm.weight",
		  "text_model.final_layer_norm.weight", 0 },
		/* older files without text_model. */
		{ SD_TEXT_ENCODER, "cond_stage_model.transformer.encoder.layers.11.mlp.fc2.bias",
		  "text_model.encoder.layers.11.mlp.fc2.bias", 0 },
		{ SD_TEXT_ENCODER, "cond_stage_model.transformer.text_model.embeddings.position_ids", NULL, 0 },
		{ SD_TEXT_ENCODER, "cond_stage_model.model.transformer.resblocks.0.ln_1.weight", NULL, 0 },
		{ SD_VAE, "first_stage_model.encoder.down.3.block.1.nin_shortcut.weight",
		  "encoder.down_blocks.3.resnets.1.conv_shortcut.weight", 0 },
		{ SD_VAE, "first_stage_model.encoder.down.0.downsample.conv.bias",
		  "encoder.down_blocks.0.downsamplers.0.conv.bias", 0 },
		{ SD_VAE, "first_stage_model.decoder.up.0.block.2.conv1.weight",
		  "decoder.up_blocks.3.resnets.2.conv1.weight", 0 },
		{ SD_VAE, "first_stage_model.decoder.up.3.upsample.conv.weight",
		  "decoder.up_blocks.0.upsamplers.0.conv.weight", 0 },
		{ SD_VAE, "first_stage_model.decoder.mid.block_2.norm1.bias", "decoder.mid_block.resnets.1.norm1.bias", 0 },
		{ SD_VAE, "first_stage_model.encoder.mid.attn_1.proj_out.bias",
		  "encoder.mid_block.attentions.0.to_out.0.bias", LDM_SQUEEZE },
		{ SD_VAE, "first_stage_model.encoder.mid.attn_1.norm.weight",
		  "encoder.mid_block.attentions.0.group_norm.weight", 0 },
		{ SD_VAE, "first_stage_model.encoder.norm_out.weight", "encoder.conv_norm_out.weight", 0 },
		{ SD_VAE, "first_stage_model.post_quant_conv.weight", "post_quant_conv.weight", 0 },
		{ SD_UNET, "model.diffusion_model.input_blocks.0.0.weight", "conv_in.weight", 0 },
		{ SD_UNET, "model.diffusion_model.input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight", 0 },
		{ SD_UNET, "model.diffusion_model.input_blocks.5.0.skip_connection.bias",
		  "down_blocks.1.resnets.1.conv_shortcut.bias", 0 },
		{ SD_UNET, "model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight",
		  "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight", 0 },
		{ SD_UNET, "model.diffusion_model.middle_block.2.emb_layers.1.weight",
		  "mid_block.resnets.1.time_emb_proj.weight", 0 },
		{ SD_UNET, "model.diffusion_model.middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight", 0 },
		{ SD_UNET, "model.diffusion_model.output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight", 0 },
		{ SD_UNET, "model.diffusion_model.output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias", 0 },
		{ SD_UNET, "model.diffusion_model.output_blocks.11.1.norm.weight", "up_blocks.3.attentions.2.norm.weight", 0 },
		{ SD_UNET, "model.diffusion_model.output_blocks.9.0.out_layers.3.weight", "up_blocks.3.resnets.0.conv2.weight", 0 },
		{ SD_UNET, "model.diffusion_model.time_embed.2.bias", "time_embedding.linear_2.bias", 0 },
		{ SD_UNET, "model.diffusion_model.out.0.weight", "conv_norm_out.weight", 0 },
		{ SD_UNET, "model_ema.diffusion_modelinput_blocks00weight", NULL, 0 },
		{ SD_UNET, "alphas_cumprod", NULL, 0 },
		{ SD_UNET, "model.diffusion_model.label_emb.0.0.weight", NULL, 0 },
		{ SD_VAE, "model.diffusion_model.out.2.weight", NULL, 0 },
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		char out[256];
		int flags = -1, r = ldm_map_name(cases[i].c, &g, cases[i].ldm, out, sizeof out, &flags);
		int ok = cases[i].hf ? r == 1 && strcmp(out, cases[i].hf) == 0 && flags == cases[i].flags : r == 0;
		if (!ok) {
			printf("  %s -> %s (rc %d, flags %d), want %s\n", cases[i].ldm, r == 1 ? out : "-", r, flags,
			       cases[i].hf ? cases[i].hf : "dropped");
			test_failed_++;
		}
	}
	char small[8];
	int flags;
	CHECK(ldm_map_name(SD_UNET, &g, "model.diffusion_model.out.2.weight", small, sizeof small, &flags) == -1);
}

/* ==== the diffusers folder ==== */

TEST(tiny_folder)
{
	char *dir = tiny_dir();
	sd_model *m = sd_model_open(dir, NULL);
	CHECK(m != NULL);
	if (!m) {
		printf("  %s\n", sd_errmsg());
		free(dir);
		return;
	}
	CHECK(strcmp(sd_model_format(m), "diffusers") == 0);
	CHECK(strcmp(sd_model_path(m), dir) == 0);
	CHECK(sd_model_scheduler_json(m) && strstr(sd_model_scheduler_json(m), "PNDMScheduler"));
	const char *tok = sd_model_tokenizer_dir(m);
	char *vocab = join(dir, "tokenizer/vocab.json");
	CHECK(exists(vocab) ? tok && strstr(tok, "/tokenizer") : tok == NULL);
	free(vocab);

	/* README: parameters {"text_encoder": 1617529, "unet": 1427012, "vae": 658375} */
	static const int64_t params[SD_COMPONENT_COUNT] = { 1617529, 658375, 1427012 };
	static const int counts[SD_COMPONENT_COUNT] = { 84, 124, 304 };
	sd_weights *w[SD_COMPONENT_COUNT] = { 0 };
	for (int c = 0; c < SD_TEXT_ENCODER_2; c++) {
		CHECK(sd_model_has(m, c));
		w[c] = sd_weights_load(m, c, SD_DEVICE_CPU);
		if (!w[c]) {
			printf("  %s\n", sd_errmsg());
			test_failed_++;
			continue;
		}
		CHECK(sd_weights_component(w[c]) == (enum sd_component)c);
		CHECK(sd_weights_count(w[c]) == counts[c]);
		CHECK(sd_weights_params(w[c]) == params[c]);
		printf("  %s: %d tensors, %lld parameters\n", sd_component_name(c), sd_weights_count(w[c]),
		       (long long)sd_weights_params(w[c]));
		int sorted = 1, f32 = 1;
		for (int i = 0; i < sd_weights_count(w[c]); i++) {
			const sd_tensor *t = sd_weights_at(w[c], i);
			f32 &= t->dtype == SD_DTYPE_F32 && t->device == SD_DEVICE_CPU && t->owns;
			if (i) sorted &= strcmp(sd_weights_name(w[c], i - 1), sd_weights_name(w[c], i)) < 0;
			CHECK(sd_weights_get(w[c], sd_weights_name(w[c], i)) == t);
		}
		CHECK(sorted && f32);
		CHECK(sd_weights_at(w[c], -1) == NULL && sd_weights_name(w[c], sd_weights_count(w[c])) == NULL);
	}
	sd_model_close(m); /* the weights are copies: they outlive the model */
	if (!w[0] || !w[1] || !w[2]) goto out;

	/* text encoder config */
	int64_t v = 0;
	double d = 0;
	const char *s = NULL;
	CHECK(sd_config_int(w[SD_TEXT_ENCODER], "hidden_size", &v) == 0 && v == 32);
	CHECK(sd_config_int(w[SD_TEXT_ENCODER], "num_attention_heads", &v) == 0 && v == 4);
	CHECK(sd_config_int(w[SD_TEXT_ENCODER], "intermediate_size", &v) == 0 && v == 37);
	CHECK(sd_config_int(w[SD_TEXT_ENCODER], "num_hidden_layers", &v) == 0 && v == 5);
	CHECK(sd_config_float(w[SD_TEXT_ENCODER], "layer_norm_eps", &d) == 0 && d == 1e-5);
	CHECK(sd_config_str(w[SD_TEXT_ENCODER], "hidden_act", &s) == 0 && strcmp(s, "quick_gelu") == 0);
	CHECK(sd_weights_get(w[SD_TEXT_ENCODER], "text_model.embeddings.position_ids") == NULL);
	const sd_tensor *t = sd_weights_need(w[SD_TEXT_ENCODER], "text_model.encoder.layers.%d.mlp.fc1.weight", 4);
	CHECK(t && t->ndim == 2 && t->shape[0] == 37 && t->shape[1] == 32);
	CHECK(sd_weights_need(w[SD_TEXT_ENCODER], "text_model.encoder.layers.%d.mlp.fc1.weight", 5) == NULL);
	CHECK(strcmp(sd_errmsg(), "text_encoder: missing weight 'text_model.encoder.layers.5.mlp.fc1.weight'") == 0);

	/* unet config: arrays, string arrays, null = absent, booleans, type errors */
	int64_t arr[8];
	const char *strs[8];
	int n = 0, b = -1;
	CHECK(sd_config_int_array(w[SD_UNET], "block_out_channels", arr, 8, &n) == 0 && n == 2 &&
	      arr[0] == 32 && arr[1] == 64);
	CHECK(sd_config_str_array(w[SD_UNET], "down_block_types", strs, 8, &n) == 0 && n == 2 &&
	      strcmp(strs[0], "DownBlock2D") == 0 && strcmp(strs[1], "CrossAttnDownBlock2D") == 0);
	CHECK(sd_config_int_array(w[SD_UNET], "attention_head_dim", arr, 8, &n) == 0 && n == 1 && arr[0] == 8);
	CHECK(sd_config_int_array(w[SD_UNET], "block_out_channels", arr, 1, &n) == -1 &&
	      strstr(sd_errmsg(), "more than 1"));
	CHECK(sd_config_int(w[SD_UNET], "num_attention_heads", &v) == 1); /* null */
	CHECK(sd_config_int(w[SD_UNET], "no such key", &v) == 1);
	CHECK(sd_config_bool(w[SD_UNET], "use_linear_projection", &b) == 0 && b == 0);
	CHECK(sd_config_bool(w[SD_UNET], "flip_sin_to_cos", &b) == 0 && b == 1);
	CHECK(sd_config_int(w[SD_UNET], "cross_attention_dim", &v) == 0 && v == 32);
	CHECK(sd_config_int(w[SD_UNET], "act_fn", &v) == -1 && strstr(sd_errmsg(), "act_fn"));
	CHECK(sd_config_str(w[SD_UNET], "layers_per_block", &s) == -1);
	CHECK(sd_config_bool(w[SD_UNET], "layers_per_block", &b) == -1);
	CHECK(sd_config_float(w[SD_UNET], "act_fn", &d) == -1);
	CHECK(sd_config_int_array(w[SD_UNET], "down_block_types", arr, 8, &n) == -1);
	CHECK(sd_config_str_array(w[SD_UNET], "block_out_channels", strs, 8, &n) == -1);
	CHECK(sd_config_float(w[SD_UNET], "norm_eps", &d) == 0 && d == 1e-5);
	CHECK(sd_config_float(w[SD_UNET], "layers_per_block", &d) == 0 && d == 2); /* an int is a number */
	CHECK(strstr(sd_config_json(w[SD_UNET]), "\"block_out_channels\":[32,64]") != NULL);
	t = sd_weights_get(w[SD_UNET], "down_blocks.1.attentions.0.proj_in.weight");
	CHECK(t && t->ndim == 4); /* use_linear_projection false: 1x1 conv kept */

	/* vae config */
	CHECK(sd_config_float(w[SD_VAE], "scaling_factor", &d) == 0 && d == 0.18215);
	CHECK(sd_config_int(w[SD_VAE], "latent_channels", &v) == 0 && v == 4);
	CHECK(sd_config_int(w[SD_VAE], "layers_per_block", &v) == 0 && v == 1);
	t = sd_weights_get(w[SD_VAE], "decoder.mid_block.attentions.0.to_q.weight");
	CHECK(t && t->ndim == 2 && t->shape[0] == 64 && t->shape[1] == 64);

	/* the fixture's fp16 files are lossless copies of the reference's f32 ones */
	if (shared()) {
		char *ref = join(shared(), "tiny");
		sd_weights *r[SD_COMPONENT_COUNT];
		load_all(ref, r);
		for (int c = 0; c < SD_TEXT_ENCODER_2; c++)
			if (r[c]) same_weights(w[c], r[c], "fp16 fixture vs shared f32");
		free_all(r);
		free(ref);
	}
out:
	free_all(w);
	free(dir);
}

/* Weights loaded onto the GPU hold the same bytes as on the CPU. */
TEST(tiny_cuda)
{
	if (!sd_cuda_available()) SKIP("no CUDA device");
	char *dir = tiny_dir();
	sd_model *m = sd_model_open(dir, NULL);
	sd_weights *cpu = m ? sd_weights_load(m, SD_VAE, SD_DEVICE_CPU) : NULL;
	sd_weights *gpu = m ? sd_weights_load(m, SD_VAE, SD_DEVICE_CUDA) : NULL;
	CHECK(cpu && gpu);
	if (!cpu || !gpu) printf("  %s\n", sd_errmsg());
	for (int i = 0; cpu && gpu && i < sd_weights_count(gpu); i++) {
		const sd_tensor *g = sd_weights_at(gpu, i), *c = sd_weights_at(cpu, i);
		sd_tensor *back = sd_tensor_to_device(g, SD_DEVICE_CPU);
		int ok = g->device == SD_DEVICE_CUDA && back && sd_tensor_same_shape(back, c) &&
		         memcmp(back->data, c->data, sd_tensor_nbytes(c)) == 0;
		if (!ok) {
			printf("  '%s' differs after the round trip through the GPU\n", sd_weights_name(gpu, i));
			test_failed_++;
			i = sd_weights_count(gpu);
		}
		sd_tensor_free(back);
	}
	sd_weights_free(cpu);
	sd_weights_free(gpu);
	sd_model_close(m);
	free(dir);
}

/* ==== the original LDM checkpoint: .ckpt and single-file .safetensors ==== */

TEST(tiny_ckpt)
{
	char *ckpt = tiny_ckpt(), *dir = tiny_dir();
	if (!ckpt) {
		free(dir);
		SKIP("no tiny.ldm.ckpt in %s and no $SHARED", fixtures());
	}
	sd_weights *ref[SD_COMPONENT_COUNT];
	load_all(dir, ref);
	if (ref[0] && ref[1] && ref[2]) {
		same_model(ckpt, dir, ref, "ckpt");
		sd_model *m = sd_model_open(ckpt, NULL);
		CHECK(m && strcmp(sd_model_format(m), "ckpt") == 0 && sd_model_tokenizer_dir(m) == NULL &&
		      sd_model_scheduler_json(m) == NULL);
		sd_model_close(m);
		/* with the config folder, its tokenizer and scheduler come along */
		m = sd_model_open(ckpt, dir);
		CHECK(m && sd_model_scheduler_json(m) && strstr(sd_model_scheduler_json(m), "PNDM"));
		sd_model_close(m);
	}
	free_all(ref);
	free(ckpt);
	free(dir);
}

/*
 * The ckpt's tensors (original names, f16 + f32 buffers + i64 position_ids) written to a single
 * .safetensors, opened with and without the config folder.
 */
TEST(tiny_single_file)
{
	char *ckpt = tiny_ckpt(), *dir = tiny_dir(), *tmp = tmp_dir();
	char *file = tmp ? join(tmp, "tiny.ldm.safetensors") : NULL;
	sd_weights *ref[SD_COMPONENT_COUNT] = { 0 };
	if (!ckpt) {
		SKIP("no tiny.ldm.ckpt in %s and no $SHARED", fixtures());
		goto out;
	}
	sd_ckpt *ck = sd_ckpt_open(ckpt);
	CHECK(ck != NULL && file != NULL);
	if (!ck || !file) goto out;
	int n = sd_ckpt_count(ck);
	const char **names = malloc(n * sizeof *names);
	const sd_tensor **ts = malloc(n * sizeof *ts);
	for (int i = 0; i < n; i++) {
		names[i] = sd_ckpt_name(ck, i);
		ts[i] = sd_ckpt_tensor(ck, i);
	}
	const char *meta[] = { "format", "pt", NULL };
	CHECK_OK(sd_st_write(file, n, names, ts, meta));
	free(names);
	free(ts);
	sd_ckpt_close(ck);
	printf("  %d tensors written to %s\n", n, file);

	load_all(dir, ref);
	if (!ref[0] || !ref[1] || !ref[2]) goto out;
	same_model(file, dir, ref, "single-file");

	/* from the shapes alone: the same tensors, configs that agree with config.json */
	sd_model *m = sd_model_open(file, NULL);
	CHECK(m && strcmp(sd_model_format(m), "single-file") == 0);
	if (!m) goto out;
	for (int c = 0; c < SD_TEXT_ENCODER_2; c++) {
		sd_weights *w = sd_weights_load(m, c, SD_DEVICE_CPU);
		if (c == SD_TEXT_ENCODER) {
			/* hidden 32 is not a multiple of 64: the head count cannot be guessed */
			CHECK(w == NULL && strstr(sd_errmsg(), "num_attention_heads") && strstr(sd_errmsg(), "--config"));
			printf("  refused as expected: %s\n", sd_errmsg());
			sd_weights_free(w);
			continue;
		}
		CHECK(w != NULL);
		if (!w) {
			printf("  %s\n", sd_errmsg());
			continue;
		}
		same_weights(w, ref[c], sd_component_name(c));
		config_matches(w, dir, c);
		int64_t v;
		double d;
		if (c == SD_UNET) CHECK(sd_config_int(w, "attention_head_dim", &v) == 0 && v == 8);
		if (c == SD_VAE) CHECK(sd_config_float(w, "scaling_factor", &d) == 0 && d == 0.18215);
		printf("  inferred %s config: %s\n", sd_component_name(c), sd_config_json(w));
		sd_weights_free(w);
	}
	sd_model_close(m);

	/* $SD_MODEL and $SD_MODEL_CONFIG stand in for missing arguments */
	setenv("SD_MODEL", file, 1);
	setenv("SD_MODEL_CONFIG", dir, 1);
	m = sd_model_open(NULL, NULL);
	CHECK(m && strcmp(sd_model_path(m), file) == 0);
	sd_weights *w = m ? sd_weights_load(m, SD_TEXT_ENCODER, SD_DEVICE_CPU) : NULL;
	int64_t heads = 0;
	CHECK(w && sd_config_int(w, "num_attention_heads", &heads) == 0 && heads == 4);
	if (w) same_weights(w, ref[SD_TEXT_ENCODER], "text_encoder via $SD_MODEL_CONFIG");
	sd_weights_free(w);
	sd_model_close(m);
	unsetenv("SD_MODEL");
	unsetenv("SD_MODEL_CONFIG");

	/* a config folder that does not fit the weights */
	char *bad = join(tmp, "cfg"), *unet = join(tmp, "cfg/unet"), *cj = join(tmp, "cfg/unet/config.json");
	mkdir(bad, 0755);
	mkdir(unet, 0755);
	write_text(cj, "{\"block_out_channels\": [32, 32], \"layers_per_block\": 2}");
	m = sd_model_open(file, bad);
	CHECK(m != NULL);
	if (m) {
		CHECK_ERR(sd_weights_load(m, SD_UNET, SD_DEVICE_CPU), "does not fit", "block_out_channels",
		          "[32,32]", "[32,64]");
		CHECK_ERR(sd_weights_load(m, SD_VAE, SD_DEVICE_CPU), "cfg/vae/config.json", "No such file");
	}
	sd_model_close(m);
	write_text(cj, "{\"use_linear_projection\": true}"); /* SD 2.x style: proj_in becomes [C,C] */
	m = sd_model_open(file, bad);
	w = m ? sd_weights_load(m, SD_UNET, SD_DEVICE_CPU) : NULL;
	const sd_tensor *t = w ? sd_weights_get(w, "mid_block.attentions.0.proj_out.weight") : NULL;
	CHECK(t && t->ndim == 2 && t->shape[0] == 64 && t->shape[1] == 64);
	sd_weights_free(w);
	sd_model_close(m);
	free(bad);
	free(unet);
	free(cj);
out:
	free_all(ref);
	free(file);
	rm_tree(tmp);
	free(ckpt);
	free(dir);
}

/* ==== sd15-shape-small from the shared fixtures ==== */

TEST(sd15_shape_small)
{
	if (!shared()) SKIP("$SHARED is not set or not a folder (the sd15-shape-small model is not copied)");
	char *dir = join(shared(), "sd15-shape-small"), *file = join(shared(), "sd15-shape-small.ldm.fp16.safetensors");
	sd_weights *ref[SD_COMPONENT_COUNT];
	load_all(dir, ref);
	static const int64_t params[SD_COMPONENT_COUNT] = { 3267136, 1399879, 2491844 };
	for (int c = 0; c < SD_TEXT_ENCODER_2; c++) CHECK(ref[c] && sd_weights_params(ref[c]) == params[c]);
	if (ref[0] && ref[1] && ref[2]) {
		same_model(file, dir, ref, "sd15-shape-small single-file");
		/* without the configs: shapes agree; heads fall back to hidden/64 = 1 (the model has 4) */
		sd_model *m = sd_model_open(file, NULL);
		for (int c = 0; m && c < SD_TEXT_ENCODER_2; c++) {
			sd_weights *w = sd_weights_load(m, c, SD_DEVICE_CPU);
			CHECK(w != NULL);
			if (!w) {
				printf("  %s\n", sd_errmsg());
				continue;
			}
			same_weights(w, ref[c], sd_component_name(c));
			config_matches(w, dir, c);
			int64_t v;
			if (c == SD_TEXT_ENCODER) CHECK(sd_config_int(w, "num_attention_heads", &v) == 0 && v == 1);
			sd_weights_free(w);
		}
		CHECK(m != NULL);
		sd_model_close(m);
	}
	free_all(ref);
	free(dir);
	free(file);
}

/* ==== bad input ==== */

TEST(bad_models)
{
	char *tmp = tmp_dir(), *tiny = tiny_dir();
	CHECK(tmp != NULL);
	if (!tmp) return;
	char abs_tiny[4096];
	CHECK(realpath(tiny, abs_tiny) != NULL);

	unsetenv("SD_MODEL");
	CHECK_ERR(sd_model_open(NULL, NULL), "$SD_MODEL is not set and no -m given");
	CHECK_ERR(sd_model_open("", NULL), "$SD_MODEL is not set");
	char *none = join(tmp, "no-such-model");
	CHECK_ERR(sd_model_open(none, NULL), none, "No such file");

	/* an empty folder, a text file, a safetensors file that is one diffusers component */
	CHECK_ERR(sd_model_open(tmp, NULL), tmp, "not a model");
	char *txt = join(tmp, "notes.txt");
	write_text(txt, "hello\n");
	CHECK_ERR(sd_model_open(txt, NULL), "not a model");
	char *unet_file = join(tiny, "unet/diffusion_pytorch_model.fp16.safetensors");
	CHECK_ERR(sd_model_open(unet_file, NULL), "not a Stable Diffusion checkpoint");
	CHECK_ERR(sd_model_open(unet_file, txt), "config folder", "not a folder");

	/* a folder with a text encoder, a vae folder without weights, a unet with a corrupt header */
	char *m1 = join(tmp, "m1"), p[8192], q[8192];
	mkdir(m1, 0755);
	snprintf(p, sizeof p, "%s/model_index.json", m1);
	write_text(p, "{}");
	snprintf(p, sizeof p, "%s/text_encoder", m1);
	mkdir(p, 0755);
	snprintf(p, sizeof p, "%s/text_encoder/model.fp16.safetensors", m1);
	snprintf(q, sizeof q, "%s/text_encoder/model.fp16.safetensors", abs_tiny);
	CHECK(symlink(q, p) == 0);
	snprintf(p, sizeof p, "%s/vae", m1);
	mkdir(p, 0755);
	snprintf(p, sizeof p, "%s/vae/config.json", m1);
	snprintf(q, sizeof q, "%s/vae/config.json", abs_tiny);
	CHECK(symlink(q, p) == 0);
	sd_model *m = sd_model_open(m1, NULL);
	CHECK(m != NULL);
	if (m) {
		CHECK(sd_model_has(m, SD_TEXT_ENCODER) && !sd_model_has(m, SD_VAE) && !sd_model_has(m, SD_UNET));
		CHECK(sd_model_tokenizer_dir(m) == NULL && sd_model_scheduler_json(m) == NULL);
		CHECK_ERR(sd_weights_load(m, SD_VAE, SD_DEVICE_CPU), "model has no vae", m1);
		CHECK_ERR(sd_weights_load(m, SD_UNET, SD_DEVICE_CPU), "model has no unet");
		/* weights without a config.json */
		CHECK_ERR(sd_weights_load(m, SD_TEXT_ENCODER, SD_DEVICE_CPU), "text_encoder/config.json");
		CHECK(sd_weights_load(m, (enum sd_component)7, SD_DEVICE_CPU) == NULL);
	}
	sd_model_close(m);
	snprintf(p, sizeof p, "%s/unet", m1);
	mkdir(p, 0755);
	snprintf(p, sizeof p, "%s/unet/diffusion_pytorch_model.safetensors", m1);
	static const char corrupt[] = "\x10\0\0\0\0\0\0\0{\"a\": not json} ";
	write_bytes(p, corrupt, sizeof corrupt - 1);
	CHECK_ERR(sd_model_open(m1, NULL), p, "not valid JSON");

	/* a .ckpt that is not a zip: refused when it is first read */
	char *ck = join(tmp, "broken.ckpt");
	write_text(ck, "not a zip archive at all");
	m = sd_model_open(ck, NULL);
	CHECK(m != NULL);
	if (m) {
		CHECK(!sd_model_has(m, SD_UNET));
		CHECK_ERR(sd_weights_load(m, SD_UNET, SD_DEVICE_CPU), "broken.ckpt");
	}
	sd_model_close(m);
	sd_model_close(NULL);
	sd_weights_free(NULL);

	free(ck);
	free(m1);
	free(unet_file);
	free(txt);
	free(none);
	free(tiny);
	rm_tree(tmp);
}

int main(void)
{
	unsetenv("SD_MODEL_CONFIG");
	RUN(ldm_names);
	RUN(tiny_folder);
	RUN(tiny_cuda);
	RUN(tiny_ckpt);
	RUN(tiny_single_file);
	RUN(sd15_shape_small);
	RUN(bad_models);
	return test_summary();
}
