/*
 * fuzz_config.c - libFuzzer target for the JSON configs a model folder carries, through the loaders
 * that read them: <component>/config.json (lib/models/model.c: sd_model_open + sd_weights_load, the
 * sd_config_* getters, then sd_clip_new and a forward, which size everything from it) and
 * scheduler/scheduler_config.json (sd_sched_new and a whole run).  The first byte picks the mode:
 *
 *   0  the rest is text_encoder/config.json of a diffusers folder holding a tiny text encoder
 *      (D 8, F 12, vocab 16, 8 positions, 2 layers: synthetic weights written once at start-up);
 *   1  the same config given as --config for a single-file (LDM-named) copy of those weights, where
 *      it is checked against the shapes and merged with what they tell;
 *   2  bytes 1-4 choose sampler, steps (1-64), karras (-1/0/1) and eta (0 or 0.5), the rest is a
 *      scheduler config: every step is taken on a [1,1,2,2] latent and the state saved and restored.
 */
#include "fuzz.h"
#include "sd.h"

enum { D = 8, F = 12, V = 16, P = 8, L = 2 };

static char te_dir[4400], single[4400], cfg_dir[4400];

/* Write the tiny text encoder's weights to path, each name prefixed by pre. */
static void write_weights(const char *path, const char *pre)
{
	static const char *const base[][2] = {
		{ "embeddings.token_embedding.weight", "VD" }, { "embeddings.position_embedding.weight", "PD" },
		{ "final_layer_norm.weight", "D" }, { "final_layer_norm.bias", "D" },
	};
	static const char *const layer[][2] = {
		{ "layer_norm1.weight", "D" }, { "layer_norm1.bias", "D" }, { "layer_norm2.weight", "D" },
		{ "layer_norm2.bias", "D" }, { "self_attn.q_proj.weight", "DD" }, { "self_attn.q_proj.bias", "D" },
		{ "self_attn.k_proj.weight", "DD" }, { "self_attn.k_proj.bias", "D" },
		{ "self_attn.v_proj.weight", "DD" }, { "self_attn.v_proj.bias", "D" },
		{ "self_attn.out_proj.weight", "DD" }, { "self_attn.out_proj.bias", "D" },
		{ "mlp.fc1.weight", "FD" }, { "mlp.fc1.bias", "F" }, { "mlp.fc2.weight", "DF" }, { "mlp.fc2.bias", "D" },
	};
	enum { N = 4 + L * 16 };
	char names[N][160];
	const char *np[N];
	sd_tensor *ts[N];
	int n = 0;
	for (int k = -1; k < L; k++)
		for (int j = 0; j < (k < 0 ? 4 : 16); j++, n++) {
			const char *nm = k < 0 ? base[j][0] : layer[j][0], *dims = k < 0 ? base[j][1] : layer[j][1];
			if (k < 0) snprintf(names[n], sizeof names[n], "%stext_model.%s", pre, nm);
			else snprintf(names[n], sizeof names[n], "%stext_model.encoder.layers.%d.%s", pre, k, nm);
			int64_t shape[2];
			int nd = (int)strlen(dims);
			for (int d = 0; d < nd; d++)
				shape[d] = dims[d] == 'D' ? D : dims[d] == 'F' ? F : dims[d] == 'V' ? V : P;
			ts[n] = sd_tensor_new(SD_DTYPE_F32, nd, shape);
			if (!ts[n]) abort();
			float *x = ts[n]->data;
			for (int64_t i = 0; i < sd_tensor_numel(ts[n]); i++) x[i] = 0.01f * (float)((i * 7 + n) % 13) - 0.05f;
			np[n] = names[n];
		}
	if (sd_st_write(path, n, np, (const sd_tensor *const *)ts, NULL) < 0) {
		fprintf(stderr, "fuzz_config: %s\n", sd_errmsg());
		exit(1);
	}
	for (int i = 0; i < n; i++) sd_tensor_free(ts[i]);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	setenv("SD_THREADS", "1", 1);
	snprintf(te_dir, sizeof te_dir, "%s/te", fuzz_dir());
	snprintf(single, sizeof single, "%s/single.safetensors", fuzz_dir());
	snprintf(cfg_dir, sizeof cfg_dir, "%s/cfg", fuzz_dir());
	char cmd[14000];
	snprintf(cmd, sizeof cmd, "mkdir -p '%s/text_encoder' '%s/text_encoder' && echo '{}' > '%s/model_index.json'",
	         te_dir, cfg_dir, te_dir);
	if (system(cmd) != 0) exit(1);
	write_weights(fuzz_path("te/text_encoder/model.safetensors"), "");
	write_weights(single, "cond_stage_model.transformer.");
	return 0;
}

/* Read the config through every getter, then build the encoder and run it on 4 tokens. */
static void use_weights(sd_weights *w)
{
	static const char *const keys[] = { "hidden_size", "intermediate_size", "num_hidden_layers",
	                                    "num_attention_heads", "layer_norm_eps", "hidden_act",
	                                    "vocab_size", "max_position_embeddings", "architectures", "x" };
	for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
		int64_t i, a[8];
		double f;
		int b, n;
		const char *s, *sa[8];
		sd_config_int(w, keys[k], &i);
		sd_config_float(w, keys[k], &f);
		sd_config_bool(w, keys[k], &b);
		sd_config_str(w, keys[k], &s);
		sd_config_int_array(w, keys[k], a, 8, &n);
		sd_config_str_array(w, keys[k], sa, 8, &n);
	}
	fuzz_sink += (unsigned)strlen(sd_config_json(w));
	sd_clip *c = sd_clip_new(w);
	if (!c) return;
	const sd_clip_config *g = sd_clip_get_config(c);
	if (g->max_pos >= 4 && g->vocab >= 4) {
		sd_tensor *ids = sd_tensor_newv(SD_DTYPE_I32, 2, (int64_t)1, (int64_t)4);
		sd_tensor *out = sd_tensor_newv(SD_DTYPE_F32, 3, (int64_t)1, (int64_t)4, (int64_t)g->hidden);
		if (!ids || !out) abort();
		int32_t *p = ids->data;
		for (int i = 0; i < 4; i++) p[i] = i;
		sd_clip_encode(c, out, ids, 0, NULL);
		sd_tensor_free(ids);
		sd_tensor_free(out);
	}
	sd_clip_free(c);
}

static void component(const uint8_t *data, size_t size, int single_file)
{
	const char *name = single_file ? "cfg/text_encoder/config.json" : "te/text_encoder/config.json";
	if (!fuzz_file(name, data, size)) return;
	sd_model *m = sd_model_open(single_file ? single : te_dir, single_file ? cfg_dir : NULL);
	if (!m) return;
	sd_weights *w = sd_weights_load(m, SD_TEXT_ENCODER, SD_DEVICE_CPU);
	if (w) use_weights(w);
	sd_weights_free(w);
	sd_model_close(m);
}

static void scheduler(const uint8_t *data, size_t size)
{
	if (size < 4) return;
	enum sd_sampler_kind kind = (enum sd_sampler_kind)(data[0] % SD_SAMPLER_COUNT);
	int steps = 1 + data[1] % 64, karras = data[2] % 3 - 1;
	double eta = data[3] & 1 ? 0.5 : 0.0;
	char *json = malloc(size - 4 + 1);
	if (!json) return;
	memcpy(json, data + 4, size - 4);
	json[size - 4] = 0;
	sd_sched *s = sd_sched_new(json, kind, steps, karras, eta);
	free(json);
	if (!s) return;
	sd_tensor *x = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)1, (int64_t)1, (int64_t)2, (int64_t)2);
	sd_tensor *eps = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)1, (int64_t)1, (int64_t)2, (int64_t)2);
	sd_tensor *in = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)1, (int64_t)1, (int64_t)2, (int64_t)2);
	if (!x || !eps || !in) abort();
	for (int i = 0; i < 4; i++) ((float *)x->data)[i] = (float)i - 1.5f, ((float *)eps->data)[i] = 0.25f * (float)i;
	sd_rng rng;
	sd_rng_seed(&rng, 42);
	int calls = sd_sched_calls(s);
	for (int i = sd_sched_begin(s); i < calls; i++) {
		fuzz_sink += (unsigned)sd_sched_timestep(s, i);
		if (sd_sched_scale_model_input(s, in, x, i) < 0) break;
		if (sd_sched_step(s, x, eps, i, NULL, &rng, NULL) < 0) break;
		if (i == calls / 2) { /* the state through a frame's sampler map, as a pipe carries it */
			sd_value *map = sd_value_map();
			sd_sched *t = sd_sched_new(NULL, kind, steps, karras, eta);
			if (map && sd_sched_save(s, map) == 0 && t) sd_sched_load(t, map);
			sd_sched_free(t);
			sd_value_free(map);
		}
	}
	sd_sched_strength_begin(s, 0.5);
	sd_tensor_free(x);
	sd_tensor_free(eps);
	sd_tensor_free(in);
	sd_sched_free(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0) return 0;
	switch (data[0] % 3) {
	case 0: component(data + 1, size - 1, 0); break;
	case 1: component(data + 1, size - 1, 1); break;
	case 2: scheduler(data + 1, size - 1); break;
	}
	return 0;
}
