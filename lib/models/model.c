/*
 * model.c - opening a Stable Diffusion 1.x checkpoint in any of its three layouts and loading one
 * component's weights under diffusers' names, as diffusers does it:
 *
 *   - a diffusers folder (DiffusionPipeline.from_pretrained): <component>/config.json and
 *     <component>/{model,diffusion_pytorch_model}[.fp16].safetensors (a .bin as the last resort);
 *   - a single-file original checkpoint (.safetensors) and a torch .ckpt (StableDiffusionPipeline.
 *     from_single_file, src/diffusers/pipelines/stable_diffusion/convert_from_ckpt.py): the names are
 *     rewritten by ldm-names.c, and the config is rebuilt from the tensor shapes, or taken from a
 *     diffusers folder given as config_dir (from_single_file(config=…)) and checked against the shapes.
 *
 * Opening reads only the index (file names and safetensors headers, which are mmapped; a .ckpt has to
 * be unpickled whole, so that is put off until its first use and then kept).  sd_weights_load copies
 * the tensors out, converted to f32, so the weights stay valid after sd_model_close.
 *
 * Decisions: text_model.embeddings.position_ids (an int64 arange buffer that some files carry and
 * transformers >= 4.31 no longer saves) is dropped in every layout, so the three layouts give the same
 * names and the parameter counts of transformers' num_parameters(); non-float tensors other than that
 * keep their dtype; the weights of a component are sorted by name.
 */
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "sd.h"
#include "model.h"

static const char *const component_names[SD_COMPONENT_COUNT] = {
	[SD_TEXT_ENCODER] = "text_encoder", [SD_VAE] = "vae", [SD_UNET] = "unet", [SD_TEXT_ENCODER_2] = "text_encoder_2",
};

static int is_text(enum sd_component c)
{
	return c == SD_TEXT_ENCODER || c == SD_TEXT_ENCODER_2;
}

const char *sd_component_name(enum sd_component c)
{
	return (unsigned)c < SD_COMPONENT_COUNT ? component_names[c] : "unknown component";
}

/* ==== small helpers ==== */

/* "a/b" in new memory (NULL when out of memory, with a message). */
static char *join(const char *dir, const char *name)
{
	size_t a = strlen(dir), b = strlen(name);
	char *s = malloc(a + b + 2);
	if (!s) {
		sd_seterr("out of memory");
		return NULL;
	}
	memcpy(s, dir, a);
	s[a] = '/';
	memcpy(s + a + 1, name, b + 1);
	return s;
}

static char *dupstr(const char *s)
{
	char *d = s ? strdup(s) : NULL;
	if (s && !d) sd_seterr("out of memory");
	return d;
}

static int is_dir(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int is_file(const char *path)
{
	struct stat st;
	return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int ends_with(const char *s, const char *suf)
{
	size_t a = strlen(s), b = strlen(suf);
	return a >= b && strcmp(s + a - b, suf) == 0;
}

/* A JSON object from a file; NULL with "<path>: line N: what" when it is missing or not an object. */
static json_t *load_json(const char *path)
{
	json_error_t err;
	json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &err);
	if (!j) {
		if (!is_file(path)) sd_seterr("%s: %s", path, is_dir(path) ? "is a folder" : strerror(ENOENT));
		else sd_seterr("%s: line %d: %s", path, err.line, err.text);
		return NULL;
	}
	if (!json_is_object(j)) {
		json_decref(j);
		sd_seterr("%s: not a JSON object", path);
		return NULL;
	}
	return j;
}

/* ==== a set of named tensors: a safetensors file or a .ckpt ==== */

struct src {
	sd_st *st;
	sd_ckpt *ck;
};

static int src_count(const struct src *s)
{
	return s->st ? sd_st_count(s->st) : s->ck ? sd_ckpt_count(s->ck) : 0;
}

static const char *src_name(const struct src *s, int i)
{
	return s->st ? sd_st_name(s->st, i) : sd_ckpt_name(s->ck, i);
}

static const sd_tensor *src_tensor(const struct src *s, int i)
{
	return s->st ? sd_st_tensor(s->st, i) : sd_ckpt_tensor(s->ck, i);
}

static const char *src_name_cb(const void *ctx, int i)
{
	return src_name(ctx, i);
}

static void src_close(struct src *s)
{
	sd_st_close(s->st);
	sd_ckpt_close(s->ck);
	s->st = NULL;
	s->ck = NULL;
}

/* ==== the model ==== */

enum layout { DIFFUSERS, SINGLE_FILE, CKPT };

struct sd_model {
	enum layout layout;
	char *path;
	char *config_dir;                       /* single files: a diffusers folder describing them */
	/* diffusers: one file per component */
	char *comp_dir[SD_COMPONENT_COUNT];     /* <path>/<component> */
	char *comp_file[SD_COMPONENT_COUNT];    /* its weights file, NULL when it has none */
	struct src comp[SD_COMPONENT_COUNT];    /* open (a .bin only once loaded) */
	/* single file and ckpt: one file for all */
	struct src all;                         /* a .ckpt is read on first use */
	int has[SD_COMPONENT_COUNT];            /* -1: not known until the .ckpt is read */
	char *tokenizer_dir, *tokenizer_2_dir;
	char *scheduler_json;
	int force_zeros;                        /* model_index.json force_zeros_for_empty_prompt */
};

/* Weights file names tried in a component folder, in order (safetensors first, plain before fp16). */
static const char *const weight_files[] = {
	"model.safetensors", "diffusion_pytorch_model.safetensors",
	"model.fp16.safetensors", "diffusion_pytorch_model.fp16.safetensors",
	"pytorch_model.bin", "diffusion_pytorch_model.bin",
	"pytorch_model.fp16.bin", "diffusion_pytorch_model.fp16.bin",
};

/* Does the single file hold tensors of component c (position_ids alone do not count)? */
static int single_has(const struct src *s, enum sd_component c)
{
	struct ldm_geom g = { .unet_lpb = 1, .vae_up_blocks = 1 << 16 };
	char buf[512];
	int flags;
	for (int i = 0; i < src_count(s); i++)
		if (ldm_map_name(c, &g, src_name(s, i), buf, sizeof buf, &flags) == 1) return 1;
	return 0;
}

/* Read the .ckpt the first time it is needed (the unpickling reads the whole archive). */
static int ensure_ckpt(sd_model *m)
{
	if (m->layout != CKPT || m->all.ck) return 0;
	m->all.ck = sd_ckpt_open(m->path);
	if (!m->all.ck) return -1;
	for (int c = 0; c < SD_COMPONENT_COUNT; c++) m->has[c] = single_has(&m->all, c);
	return 0;
}

/* The tokenizer and scheduler of a diffusers folder (the model's own, or config_dir's for single files). */
static int read_extras(sd_model *m, const char *dir)
{
	char *tok = join(dir, "tokenizer"), *vocab = tok ? join(tok, "vocab.json") : NULL;
	char *tok2 = join(dir, "tokenizer_2"), *vocab2 = tok2 ? join(tok2, "vocab.json") : NULL;
	char *sched = join(dir, "scheduler/scheduler_config.json"), *index = join(dir, "model_index.json");
	int rc = 0;
	if (!tok || !vocab || !sched || !tok2 || !vocab2 || !index) {
		rc = -1;
	} else {
		if (is_file(vocab)) {
			m->tokenizer_dir = tok;
			tok = NULL;
		}
		if (is_file(vocab2)) {
			m->tokenizer_2_dir = tok2;
			tok2 = NULL;
		}
		json_t *ix = is_file(index) ? json_load_file(index, 0, NULL) : NULL;
		m->force_zeros = json_is_true(json_object_get(ix, "force_zeros_for_empty_prompt"));
		json_decref(ix);
		if (is_file(sched)) {
			size_t len;
			m->scheduler_json = sd_read_file(sched, 1 << 20, &len);
			if (!m->scheduler_json) rc = -1;
		}
	}
	free(tok);
	free(vocab);
	free(tok2);
	free(vocab2);
	free(sched);
	free(index);
	return rc;
}

/* A diffusers folder: find each component's weights file and open its header. */
static int open_diffusers(sd_model *m)
{
	char *index = join(m->path, "model_index.json");
	if (!index) return -1;
	int found = is_file(index);
	free(index);
	for (int c = 0; c < SD_COMPONENT_COUNT; c++) {
		if (!(m->comp_dir[c] = join(m->path, component_names[c]))) return -1;
		if (!is_dir(m->comp_dir[c])) continue;
		found = 1;
		for (size_t k = 0; k < sizeof weight_files / sizeof weight_files[0] && !m->comp_file[c]; k++) {
			char *f = join(m->comp_dir[c], weight_files[k]);
			if (!f) return -1;
			if (is_file(f)) m->comp_file[c] = f;
			else free(f);
		}
		m->has[c] = m->comp_file[c] != NULL;
		if (m->comp_file[c] && ends_with(m->comp_file[c], ".safetensors") &&
		    !(m->comp[c].st = sd_st_open(m->comp_file[c])))
			return -1;
	}
	if (!found)
		return sd_seterr("%s: not a model: a folder without model_index.json and without text_encoder/, "
		                 "unet/ or vae/", m->path);
	return read_extras(m, m->path);
}

/* Is the file a zip (a torch.save archive)? */
static int zip_magic(const char *path)
{
	unsigned char b[4] = { 0 };
	FILE *f = fopen(path, "rb");
	if (!f) return 0;
	size_t n = fread(b, 1, 4, f);
	fclose(f);
	return n == 4 && b[0] == 'P' && b[1] == 'K' && b[2] == 3 && b[3] == 4;
}

sd_model *sd_model_open(const char *path, const char *config_dir)
{
	if (!path || !*path) path = getenv("SD_MODEL");
	if (!path || !*path) {
		sd_seterr("$SD_MODEL is not set and no -m given");
		return NULL;
	}
	if (!config_dir || !*config_dir) config_dir = getenv("SD_MODEL_CONFIG");
	if (config_dir && !*config_dir) config_dir = NULL;
	struct stat st;
	if (stat(path, &st) < 0) {
		sd_seterr("%s: %s", path, strerror(errno));
		return NULL;
	}
	sd_model *m = calloc(1, sizeof *m);
	if (!m) {
		sd_seterr("out of memory");
		return NULL;
	}
	if (!(m->path = dupstr(path))) goto fail;
	if (S_ISDIR(st.st_mode)) {
		m->layout = DIFFUSERS;
		if (open_diffusers(m) < 0) goto fail;
		return m; /* a folder carries its own configs: config_dir does not apply */
	}
	if (!S_ISREG(st.st_mode)) {
		sd_seterr("%s: not a model: neither a folder nor a file", path);
		goto fail;
	}
	if (config_dir && !is_dir(config_dir)) {
		struct stat cs;
		sd_seterr("%s: config folder: %s", config_dir,
		          stat(config_dir, &cs) < 0 ? strerror(errno) : "not a folder (want a diffusers model folder)");
		goto fail;
	}
	if (config_dir && (!(m->config_dir = dupstr(config_dir)) || read_extras(m, config_dir) < 0)) goto fail;
	if (ends_with(path, ".safetensors")) {
		m->layout = SINGLE_FILE;
		if (!(m->all.st = sd_st_open(path))) goto fail;
		int any = 0;
		for (int c = 0; c < SD_COMPONENT_COUNT; c++) any |= m->has[c] = single_has(&m->all, c);
		if (!any) {
			sd_seterr("%s: not a Stable Diffusion checkpoint: no cond_stage_model.transformer.*, "
			          "first_stage_model.* or model.diffusion_model.* tensors (for one diffusers "
			          "component, give its model folder)", path);
			goto fail;
		}
		return m;
	}
	if (ends_with(path, ".ckpt") || ends_with(path, ".pt") || ends_with(path, ".pth") || zip_magic(path)) {
		m->layout = CKPT;
		for (int c = 0; c < SD_COMPONENT_COUNT; c++) m->has[c] = -1;
		return m;
	}
	sd_seterr("%s: not a model: expected a diffusers folder, a .safetensors or a .ckpt file", path);
fail:
	sd_model_close(m);
	return NULL;
}

void sd_model_close(sd_model *m)
{
	if (!m) return;
	for (int c = 0; c < SD_COMPONENT_COUNT; c++) {
		free(m->comp_dir[c]);
		free(m->comp_file[c]);
		src_close(&m->comp[c]);
	}
	src_close(&m->all);
	free(m->path);
	free(m->config_dir);
	free(m->tokenizer_dir);
	free(m->tokenizer_2_dir);
	free(m->scheduler_json);
	free(m);
}

const char *sd_model_format(const sd_model *m)
{
	static const char *const names[] = { [DIFFUSERS] = "diffusers", [SINGLE_FILE] = "single-file",
	                                     [CKPT] = "ckpt" };
	return names[m->layout];
}

const char *sd_model_path(const sd_model *m)
{
	return m->path;
}

int sd_model_has(const sd_model *m, enum sd_component c)
{
	if ((unsigned)c >= SD_COMPONENT_COUNT) return 0;
	/* a cache filled on first use: the model is logically unchanged */
	if (m->has[c] < 0 && ensure_ckpt((sd_model *)m) < 0) return 0;
	return m->has[c] > 0;
}

const char *sd_model_tokenizer_dir(const sd_model *m)
{
	return m->tokenizer_dir;
}

const char *sd_model_tokenizer_2_dir(const sd_model *m)
{
	return m->tokenizer_2_dir;
}

int sd_model_force_zeros(const sd_model *m)
{
	return m->force_zeros;
}

const char *sd_model_scheduler_json(const sd_model *m)
{
	return m->scheduler_json;
}

/* ==== the tensors of one component, before they are copied ==== */

struct ent {
	char *name;            /* diffusers name (owned) */
	const sd_tensor *src;  /* borrowed from the file */
	int ndim;              /* the shape it gets (same element count as src) */
	int64_t shape[SD_MAX_DIMS];
};

struct ents {
	struct ent *v;
	int n, cap;
};

static void ents_free(struct ents *L)
{
	for (int i = 0; i < L->n; i++) free(L->v[i].name);
	free(L->v);
	L->v = NULL;
	L->n = L->cap = 0;
}

static int ents_add(struct ents *L, const char *name, const sd_tensor *t)
{
	if (L->n == L->cap) {
		int cap = L->cap ? 2 * L->cap : 256;
		struct ent *v = realloc(L->v, cap * sizeof *v);
		if (!v) return sd_seterr("out of memory");
		L->v = v;
		L->cap = cap;
	}
	struct ent *e = &L->v[L->n];
	if (!(e->name = dupstr(name))) return -1;
	e->src = t;
	e->ndim = t->ndim;
	memcpy(e->shape, t->shape, sizeof e->shape);
	L->n++;
	return 0;
}

/* The entry named by the printf-style name, or NULL. */
static const struct ent *ents_get(const struct ents *L, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static const struct ent *ents_get(const struct ents *L, const char *fmt, ...)
{
	char name[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(name, sizeof name, fmt, ap);
	va_end(ap);
	for (int i = 0; i < L->n; i++)
		if (strcmp(L->v[i].name, name) == 0) return &L->v[i];
	return NULL;
}

/* Is there an entry whose name starts with the printf-style prefix? */
static int ents_any(const struct ents *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int ents_any(const struct ents *L, const char *fmt, ...)
{
	char pre[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(pre, sizeof pre, fmt, ap);
	va_end(ap);
	size_t n = strlen(pre);
	for (int i = 0; i < L->n; i++)
		if (strncmp(L->v[i].name, pre, n) == 0) return 1;
	return 0;
}

/* How many of "<pre>0.", "<pre>1.", … exist, counting up from 0 until one is missing. */
static int ents_count(const struct ents *L, const char *pre)
{
	int k = 0;
	while (k < 100000 && ents_any(L, "%s%d.", pre, k)) k++;
	return k;
}

/* Drop trailing 1-sized dimensions of e until it has `want` (a 1×1 conv kept as a linear layer). */
static int squeeze(struct ent *e, int want)
{
	while (e->ndim > want && e->shape[e->ndim - 1] == 1) e->ndim--;
	if (e->ndim != want) {
		char s[128];
		return sd_seterr("'%s' of shape %s cannot be used as a linear layer's", e->name,
		                 sd_shape_str(e->src->ndim, e->src->shape, s, sizeof s));
	}
	return 0;
}

/* ==== configs: inferred from the shapes ==== */

/* The shape-determined keys of each component, the ones compared with a given config.json. */
static const char *const shape_keys[SD_COMPONENT_COUNT][10] = {
	[SD_TEXT_ENCODER] = { "hidden_size", "intermediate_size", "num_hidden_layers",
	                      "max_position_embeddings", "vocab_size" },
	[SD_TEXT_ENCODER_2] = { "hidden_size", "intermediate_size", "num_hidden_layers",
	                        "max_position_embeddings", "vocab_size" },
	[SD_VAE] = { "in_channels", "out_channels", "block_out_channels", "layers_per_block",
	             "latent_channels", "down_block_types", "up_block_types" },
	[SD_UNET] = { "in_channels", "out_channels", "block_out_channels", "layers_per_block",
	              "cross_attention_dim", "down_block_types", "up_block_types",
	              "transformer_layers_per_block" },
};

/* The entry `name` with `ndim` dimensions, or NULL with "<component>: missing weight" / "bad shape". */
static const struct ent *need(const struct ents *L, enum sd_component c, const char *name, int ndim)
{
	const struct ent *e = ents_get(L, "%s", name);
	if (!e) sd_seterr("%s: missing weight '%s'", component_names[c], name);
	else if (e->ndim != ndim) sd_seterr("%s: '%s' has %d dimensions, not %d", component_names[c], name,
	                                    e->ndim, ndim);
	else return e;
	return NULL;
}

static int set(json_t *o, const char *key, json_t *v)
{
	if (!v || json_object_set_new(o, key, v) < 0) return sd_seterr("out of memory");
	return 0;
}

/* An array of n strings, each "<a>" or "<b>" as pick(i) says. */
static json_t *types(int n, const char *a, const char *b, const int *pick)
{
	json_t *arr = json_array();
	for (int i = 0; arr && i < n; i++)
		if (json_array_append_new(arr, json_string(pick[i] ? a : b)) < 0) {
			json_decref(arr);
			return NULL;
		}
	return arr;
}

#define MAX_BLOCKS 64

/*
 * A config for component c from the shapes of its (diffusers-named) tensors, with the keys diffusers
 * and transformers use, plus the Stable Diffusion 1.x conventions for what shapes do not show (norm
 * groups, epsilons, activations, the VAE's scaling factor).  Head counts are left out here (see
 * fill_heads).  NULL with a message when a tensor it needs is missing.
 */
static json_t *infer_config(const struct ents *L, enum sd_component c)
{
	json_t *o = json_object();
	const struct ent *e, *f;
	int ok = o != NULL, n, pick[MAX_BLOCKS];
	if (!o) sd_seterr("out of memory");
	if (ok && is_text(c)) {
		ok = (e = need(L, c, "text_model.embeddings.token_embedding.weight", 2)) &&
		     (f = need(L, c, "text_model.embeddings.position_embedding.weight", 2)) &&
		     set(o, "vocab_size", json_integer(e->shape[0])) == 0 &&
		     set(o, "hidden_size", json_integer(e->shape[1])) == 0 &&
		     set(o, "max_position_embeddings", json_integer(f->shape[0])) == 0 &&
		     set(o, "num_hidden_layers", json_integer(ents_count(L, "text_model.encoder.layers."))) == 0 &&
		     (e = need(L, c, "text_model.encoder.layers.0.mlp.fc1.weight", 2)) &&
		     set(o, "intermediate_size", json_integer(e->shape[0])) == 0 &&
		     set(o, "layer_norm_eps", json_real(1e-5)) == 0 &&
		     set(o, "hidden_act", json_string("quick_gelu")) == 0;
	} else if (ok && c == SD_VAE) {
		n = ents_count(L, "encoder.down_blocks.");
		json_t *bo = json_array();
		ok = bo && set(o, "block_out_channels", bo) == 0 && n > 0 && n <= MAX_BLOCKS;
		if (!ok && bo && !n) sd_seterr("vae: no encoder.down_blocks");
		else if (!ok && bo) sd_seterr("vae: %d blocks, more than %d", n, MAX_BLOCKS);
		for (int b = 0; ok && b < n; b++) {
			char name[128];
			snprintf(name, sizeof name, "encoder.down_blocks.%d.resnets.0.conv1.weight", b);
			ok = (e = need(L, c, name, 4)) && json_array_append_new(bo, json_integer(e->shape[0])) == 0;
			pick[b] = 1;
		}
		/* the latent: post_quant_conv (C, C, 1, 1), else what the decoder takes in */
		int post = ents_get(L, "post_quant_conv.weight") != NULL;
		ok = ok && (e = need(L, c, post ? "post_quant_conv.weight" : "decoder.conv_in.weight", 4)) &&
		     set(o, "latent_channels", json_integer(e->shape[post ? 0 : 1])) == 0 &&
		     (e = need(L, c, "encoder.conv_in.weight", 4)) &&
		     set(o, "in_channels", json_integer(e->shape[1])) == 0 &&
		     (e = need(L, c, "decoder.conv_out.weight", 4)) &&
		     set(o, "out_channels", json_integer(e->shape[0])) == 0 &&
		     set(o, "layers_per_block", json_integer(ents_count(L, "encoder.down_blocks.0.resnets."))) == 0 &&
		     set(o, "down_block_types", types(n, "DownEncoderBlock2D", "", pick)) == 0 &&
		     set(o, "up_block_types", types(n, "UpDecoderBlock2D", "", pick)) == 0 &&
		     set(o, "act_fn", json_string("silu")) == 0 &&
		     set(o, "norm_num_groups", json_integer(32)) == 0 &&
		     set(o, "scaling_factor", json_real(0.18215)) == 0;
	} else if (ok && c == SD_UNET) {
		n = ents_count(L, "down_blocks.");
		int nu = ents_count(L, "up_blocks.");
		json_t *bo = json_array();
		ok = bo && set(o, "block_out_channels", bo) == 0 && n > 0 && n <= MAX_BLOCKS && nu <= MAX_BLOCKS;
		if (!ok && bo && !n) sd_seterr("unet: no down_blocks");
		else if (!ok && bo) sd_seterr("unet: %d blocks, more than %d", n > nu ? n : nu, MAX_BLOCKS);
		for (int b = 0; ok && b < n; b++) {
			char name[128];
			snprintf(name, sizeof name, "down_blocks.%d.resnets.0.conv1.weight", b);
			ok = (e = need(L, c, name, 4)) && json_array_append_new(bo, json_integer(e->shape[0])) == 0;
			pick[b] = ents_any(L, "down_blocks.%d.attentions.", b);
		}
		ok = ok && set(o, "down_block_types", types(n, "CrossAttnDownBlock2D", "DownBlock2D", pick)) == 0;
		for (int b = 0; ok && b < nu; b++) pick[b] = ents_any(L, "up_blocks.%d.attentions.", b);
		ok = ok && set(o, "up_block_types", types(nu, "CrossAttnUpBlock2D", "UpBlock2D", pick)) == 0 &&
		     (e = need(L, c, "conv_in.weight", 4)) &&
		     set(o, "in_channels", json_integer(e->shape[1])) == 0 &&
		     (e = need(L, c, "conv_out.weight", 4)) &&
		     set(o, "out_channels", json_integer(e->shape[0])) == 0 &&
		     set(o, "layers_per_block", json_integer(ents_count(L, "down_blocks.0.resnets."))) == 0;
		/* the first transformer: its cross-attention input, projection kind and depth */
		char first[128] = "";
		for (int b = 0; b < n && !*first; b++)
			if (ents_any(L, "down_blocks.%d.attentions.0.", b))
				snprintf(first, sizeof first, "down_blocks.%d.attentions.0.", b);
		if (!*first && ents_any(L, "mid_block.attentions.0.")) snprintf(first, sizeof first, "mid_block.attentions.0.");
		if (ok && *first) {
			char pre[160];
			snprintf(pre, sizeof pre, "%stransformer_blocks.", first);
			ok = (e = ents_get(L, "%stransformer_blocks.0.attn2.to_k.weight", first)) != NULL &&
			     e->ndim == 2 && (f = ents_get(L, "%sproj_in.weight", first)) != NULL;
			if (!ok) sd_seterr("unet: %s: no attn2.to_k or proj_in weight", first);
			ok = ok && set(o, "cross_attention_dim", json_integer(e->shape[1])) == 0 &&
			     set(o, "use_linear_projection", json_boolean(f->ndim == 2)) == 0 &&
			     set(o, "transformer_layers_per_block", json_integer(ents_count(L, pre))) == 0;
		}
		if (ok && ents_any(L, "mid_block.attentions."))
			ok = set(o, "mid_block_type", json_string("UNetMidBlock2DCrossAttn")) == 0;
		ok = ok && set(o, "act_fn", json_string("silu")) == 0 &&
		     set(o, "norm_num_groups", json_integer(32)) == 0 &&
		     set(o, "norm_eps", json_real(1e-5)) == 0 &&
		     set(o, "flip_sin_to_cos", json_true()) == 0 &&
		     set(o, "freq_shift", json_integer(0)) == 0;
	}
	if (!ok) {
		json_decref(o);
		return NULL;
	}
	return o;
}

/* Compact JSON of a value into buf (for messages). */
static const char *show(const json_t *v, char *buf, size_t n)
{
	char *s = v ? json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
	snprintf(buf, n, "%s", s ? s : "null");
	free(s);
	return buf;
}

/*
 * Check a given config (from config_dir) against the one inferred from the shapes: every shape key
 * present in both must agree (an integer in the inferred config also matches an array of that value
 * in the given one, e.g. transformer_layers_per_block); a linear projection in the weights needs
 * use_linear_projection.  -1 with a message naming the key and both values.
 */
static int check_config(enum sd_component c, const json_t *given, const json_t *inferred, const char *file)
{
	char a[256], b[256];
	for (int k = 0; k < 10 && shape_keys[c][k]; k++) {
		const char *key = shape_keys[c][k];
		json_t *g = json_object_get(given, key), *w = json_object_get(inferred, key);
		if (!g || json_is_null(g) || !w || json_equal(g, w)) continue;
		int same = json_is_array(g) && json_is_integer(w) && json_array_size(g) > 0;
		for (size_t i = 0; same && i < json_array_size(g); i++) same = json_equal(json_array_get(g, i), w);
		if (!same)
			return sd_seterr("%s: %s does not fit the weights: %s is %s there but %s in the weights",
			                 component_names[c], file, key, show(g, a, sizeof a), show(w, b, sizeof b));
	}
	json_t *lin = json_object_get(inferred, "use_linear_projection");
	if (c == SD_UNET && json_is_true(lin) && !json_is_true(json_object_get(given, "use_linear_projection")))
		return sd_seterr("unet: %s does not fit the weights: they have linear proj_in/proj_out layers but "
		                 "use_linear_projection is not true", file);
	return 0;
}

/*
 * Head counts, which shapes cannot tell, when the config lacks them: CLIP's num_attention_heads =
 * hidden_size / 64 (the SD 1.x text encoder: 768 / 64 = 12), an error when hidden_size is not a
 * multiple of 64; the UNet's attention_head_dim = 8 (SD 1.x; diffusers' name for the head count).
 */
static int fill_heads(json_t *cfg, enum sd_component c, const char *path)
{
	if (is_text(c)) {
		json_int_t hidden = json_integer_value(json_object_get(cfg, "hidden_size"));
		json_t *h = json_object_get(cfg, "num_attention_heads");
		if (!h || json_is_null(h)) {
			if (hidden <= 0 || hidden % 64)
				return sd_seterr("%s: text_encoder: cannot tell num_attention_heads from the weights "
				                 "(hidden_size %lld is not a multiple of 64): give the model's diffusers "
				                 "config folder with --config (or $SD_MODEL_CONFIG)", path, (long long)hidden);
			return set(cfg, "num_attention_heads", json_integer(hidden / 64));
		}
		if (!json_is_integer(h) || json_integer_value(h) <= 0 || hidden % json_integer_value(h))
			return sd_seterr("%s: text_encoder: num_attention_heads %s does not divide hidden_size %lld",
			                 path, show(h, (char[64]){ 0 }, 64), (long long)hidden);
	}
	if (c == SD_UNET && !json_object_get(cfg, "attention_head_dim"))
		return set(cfg, "attention_head_dim", json_integer(8));
	return 0;
}

/* ==== loading ==== */

struct wt {
	char *name;
	sd_tensor *t;
};

struct sd_weights {
	enum sd_component comp;
	int n;
	struct wt *v;       /* sorted by name */
	json_t *config;
	char *config_text;
	int64_t params;
};

static int cmp_ent(const void *a, const void *b)
{
	return strcmp(((const struct ent *)a)->name, ((const struct ent *)b)->name);
}

/* The entries of a diffusers component file: its names as they are, less position_ids. */
static int collect_diffusers(sd_model *m, enum sd_component c, struct ents *L, json_t **cfg)
{
	struct src *s = &m->comp[c];
	if (!s->st && !s->ck && !(s->ck = sd_ckpt_open(m->comp_file[c]))) return -1;
	for (int i = 0; i < src_count(s); i++) {
		const char *name = src_name(s, i);
		if (is_text(c) && strcmp(name, "text_model.embeddings.position_ids") == 0) continue;
		if (ents_add(L, name, src_tensor(s, i)) < 0) return -1;
	}
	char *file = join(m->comp_dir[c], "config.json");
	if (!file) return -1;
	*cfg = load_json(file);
	free(file);
	return *cfg ? 0 : -1;
}

/* The entries of one component of a single file or .ckpt, renamed, and its config (see above). */
static int collect_single(sd_model *m, enum sd_component c, struct ents *L, json_t **cfg)
{
	if (ensure_ckpt(m) < 0) return -1;
	const struct src *s = &m->all;
	struct ldm_geom g;
	if (ldm_geom_scan(&g, c, src_count(s), src_name_cb, s) < 0) return sd_preerr("%s", m->path);
	for (int i = 0; i < src_count(s); i++) {
		char name[512];
		int flags, r = ldm_map_name(c, &g, src_name(s, i), name, sizeof name, &flags);
		if (r < 0) return sd_seterr("%s: tensor name too long: %.100s…", m->path, src_name(s, i));
		if (r == 0) continue;
		if (ents_add(L, name, src_tensor(s, i)) < 0) return -1;
		if ((flags & LDM_SQUEEZE) && squeeze(&L->v[L->n - 1], ends_with(name, ".bias") ? 1 : 2) < 0)
			return sd_preerr("%s: %s", m->path, component_names[c]);
	}
	if (L->n == 0) {
		for (int i = 0; c == SD_TEXT_ENCODER && i < src_count(s); i++)
			if (!strncmp(src_name(s, i), "cond_stage_model.model.", 23))
				return sd_seterr("%s: the text encoder is OpenCLIP's (Stable Diffusion 2.x), which is "
				                 "not supported", m->path);
		if (!ldm_prefix(c))
			return sd_seterr("%s: model has no %s (single files hold no second text encoder here: "
			                 "SDXL single-file checkpoints are not supported)", m->path, component_names[c]);
		return sd_seterr("%s: model has no %s (no %s* tensors)", m->path, component_names[c],
		                 ldm_prefix(c));
	}
	json_t *inferred = infer_config(L, c);
	if (!inferred) return sd_preerr("%s", m->path);
	if (!m->config_dir) {
		*cfg = inferred;
	} else {
		char *dir = join(m->config_dir, component_names[c]), *file = dir ? join(dir, "config.json") : NULL;
		free(dir);
		if (!file) {
			json_decref(inferred);
			return -1;
		}
		*cfg = load_json(file);
		int rc = *cfg ? check_config(c, *cfg, inferred, file) : -1;
		if (rc == 0 && json_object_update_missing(*cfg, inferred) < 0) rc = sd_seterr("out of memory");
		free(file);
		json_decref(inferred);
		if (rc < 0) return rc;
	}
	if (fill_heads(*cfg, c, m->path) < 0) return -1;
	/* SD 2.x-style configs with conv-shaped projections: diffusers takes [:, :, 0, 0] */
	if (c == SD_UNET && json_is_true(json_object_get(*cfg, "use_linear_projection")))
		for (int i = 0; i < L->n; i++) {
			struct ent *e = &L->v[i];
			if (e->ndim == 4 && strstr(e->name, "attentions.") &&
			    (ends_with(e->name, ".proj_in.weight") || ends_with(e->name, ".proj_out.weight")) &&
			    squeeze(e, 2) < 0)
				return sd_preerr("%s: unet", m->path);
		}
	return 0;
}

static sd_weights *load(sd_model *m, enum sd_component c, enum sd_device dev, int stored);

sd_weights *sd_weights_load(sd_model *m, enum sd_component c, enum sd_device dev)
{
	return load(m, c, dev, 0);
}

sd_weights *sd_weights_load_stored(sd_model *m, enum sd_component c, enum sd_device dev)
{
	return load(m, c, dev, dev == SD_DEVICE_CPU);
}

/* The dtype a tensor is kept in: f32, or (stored) an f16/bf16 matrix or kernel as the file holds it. */
static enum sd_dtype kept_dtype(const sd_tensor *src, int ndim, int stored)
{
	if (!sd_dtype_is_float(src->dtype)) return src->dtype;
	if (stored && ndim >= 2 && (src->dtype == SD_DTYPE_F16 || src->dtype == SD_DTYPE_BF16)) return src->dtype;
	return SD_DTYPE_F32;
}

static sd_weights *load(sd_model *m, enum sd_component c, enum sd_device dev, int stored)
{
	if ((unsigned)c >= SD_COMPONENT_COUNT) {
		sd_seterr("sd_weights_load: no component %d", (int)c);
		return NULL;
	}
	struct ents L = { 0 };
	json_t *cfg = NULL;
	sd_weights *w = NULL;
	int rc;
	if (m->layout == DIFFUSERS) {
		if (!m->comp_file[c]) {
			sd_seterr("%s: model has no %s (no weights file in %s)", m->path, component_names[c],
			          m->comp_dir[c]);
			return NULL;
		}
		rc = collect_diffusers(m, c, &L, &cfg);
		if (rc == 0 && L.n == 0) rc = sd_seterr("%s: no tensors", m->comp_file[c]);
	} else {
		rc = collect_single(m, c, &L, &cfg);
	}
	if (rc < 0) goto fail;

	qsort(L.v, L.n, sizeof *L.v, cmp_ent);
	for (int i = 1; i < L.n; i++)
		if (strcmp(L.v[i - 1].name, L.v[i].name) == 0) {
			sd_seterr("%s: %s: two tensors are named (or renamed to) '%s'", m->path, component_names[c],
			          L.v[i].name);
			goto fail;
		}
	if (!(w = calloc(1, sizeof *w)) || !(w->v = calloc(L.n ? L.n : 1, sizeof *w->v)) ||
	    !(w->config_text = json_dumps(cfg, JSON_COMPACT | JSON_REAL_PRECISION(16)))) {
		sd_seterr("out of memory");
		goto fail;
	}
	w->comp = c;
	w->config = cfg;
	cfg = NULL;
	for (int i = 0; i < L.n; i++) {
		const struct ent *e = &L.v[i];
		enum sd_dtype kd = kept_dtype(e->src, e->ndim, stored);
		/* a weight kept as stored is used where the file maps it (no copy: its pages are read once, on
		 * first use, and shared with the page cache); an unaligned one is copied */
		int view = stored && kd != SD_DTYPE_F32 && kd == e->src->dtype && !e->src->owns &&
		           (uintptr_t)e->src->data % sd_dtype_size(kd) == 0;
		sd_tensor *t = view ? sd_tensor_wrap(kd, e->ndim, e->shape, e->src->data) : sd_tensor_convert(e->src, kd);
		if (!t) goto fail_tensor;
		t->ndim = e->ndim;
		memcpy(t->shape, e->shape, sizeof t->shape);
		if (dev != SD_DEVICE_CPU) {
			sd_tensor *d = sd_tensor_to_device(t, dev);
			sd_tensor_free(t);
			if (!(t = d)) goto fail_tensor;
		}
		w->v[i].t = t;
		w->v[i].name = e->name;
		L.v[i].name = NULL;
		w->n = i + 1;
		w->params += sd_tensor_numel(t);
	}
	ents_free(&L);
	return w;
fail_tensor:
	sd_preerr("%s: %s: %s", m->path, component_names[c], L.v[w->n].name);
fail:
	ents_free(&L);
	json_decref(cfg);
	sd_weights_free(w);
	return NULL;
}

void sd_weights_free(sd_weights *w)
{
	if (!w) return;
	for (int i = 0; i < w->n; i++) {
		free(w->v[i].name);
		sd_tensor_free(w->v[i].t);
	}
	free(w->v);
	json_decref(w->config);
	free(w->config_text);
	free(w);
}

enum sd_component sd_weights_component(const sd_weights *w)
{
	return w->comp;
}

int sd_weights_count(const sd_weights *w)
{
	return w->n;
}

const char *sd_weights_name(const sd_weights *w, int i)
{
	return i >= 0 && i < w->n ? w->v[i].name : NULL;
}

const sd_tensor *sd_weights_at(const sd_weights *w, int i)
{
	return i >= 0 && i < w->n ? w->v[i].t : NULL;
}

const sd_tensor *sd_weights_get(const sd_weights *w, const char *name)
{
	int lo = 0, hi = w->n - 1;
	while (lo <= hi) {
		int mid = lo + (hi - lo) / 2, r = strcmp(w->v[mid].name, name);
		if (r == 0) return w->v[mid].t;
		if (r < 0) lo = mid + 1;
		else hi = mid - 1;
	}
	return NULL;
}

const sd_tensor *sd_weights_need(const sd_weights *w, const char *fmt, ...)
{
	char name[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(name, sizeof name, fmt, ap);
	va_end(ap);
	const sd_tensor *t = sd_weights_get(w, name);
	if (!t) sd_seterr("%s: missing weight '%s'", component_names[w->comp], name);
	return t;
}

int64_t sd_weights_params(const sd_weights *w)
{
	return w->params;
}

/* ==== config getters ==== */

/* The value of key, NULL when absent or JSON null (diffusers' None: "use the default"). */
static json_t *cfg_get(const sd_weights *w, const char *key)
{
	json_t *v = json_object_get(w->config, key);
	return v && !json_is_null(v) ? v : NULL;
}

static int to_int(const sd_weights *w, const char *key, const json_t *v, int64_t *out)
{
	if (json_is_integer(v)) {
		*out = json_integer_value(v);
		return 0;
	}
	if (json_is_real(v)) {
		double d = json_real_value(v);
		/* the range check first: converting a double outside int64's range (1e210) is undefined */
		if (d >= -0x1p63 && d < 0x1p63 && d == (double)(int64_t)d) {
			*out = (int64_t)d;
			return 0;
		}
	}
	char b[64];
	return sd_seterr("%s: config '%s' is %s, not an integer", component_names[w->comp], key,
	                 show(v, b, sizeof b));
}

int sd_config_int(const sd_weights *w, const char *key, int64_t *out)
{
	json_t *v = cfg_get(w, key);
	return v ? to_int(w, key, v, out) : 1;
}

int sd_config_float(const sd_weights *w, const char *key, double *out)
{
	json_t *v = cfg_get(w, key);
	if (!v) return 1;
	if (!json_is_number(v))
		return sd_seterr("%s: config '%s' is not a number", component_names[w->comp], key);
	*out = json_number_value(v);
	return 0;
}

int sd_config_bool(const sd_weights *w, const char *key, int *out)
{
	json_t *v = cfg_get(w, key);
	if (!v) return 1;
	if (!json_is_boolean(v))
		return sd_seterr("%s: config '%s' is not true or false", component_names[w->comp], key);
	*out = json_is_true(v);
	return 0;
}

int sd_config_str(const sd_weights *w, const char *key, const char **out)
{
	json_t *v = cfg_get(w, key);
	if (!v) return 1;
	if (!json_is_string(v))
		return sd_seterr("%s: config '%s' is not a string", component_names[w->comp], key);
	*out = json_string_value(v);
	return 0;
}

/* The entries of an array value (or the one scalar), checked against max. */
static int array_items(const sd_weights *w, const char *key, json_t *v, int max, int *n)
{
	size_t k = json_is_array(v) ? json_array_size(v) : 1;
	if (k > (size_t)max)
		return sd_seterr("%s: config '%s' has %zu entries, more than %d", component_names[w->comp], key, k,
		                 max);
	*n = (int)k;
	return 0;
}

int sd_config_int_array(const sd_weights *w, const char *key, int64_t *out, int max, int *n)
{
	json_t *v = cfg_get(w, key);
	int k = 0;
	if (!v) return 1;
	if (array_items(w, key, v, max, &k) < 0) return -1;
	for (int i = 0; i < k; i++)
		if (to_int(w, key, json_is_array(v) ? json_array_get(v, i) : v, &out[i]) < 0) return -1;
	*n = k;
	return 0;
}

int sd_config_str_array(const sd_weights *w, const char *key, const char **out, int max, int *n)
{
	json_t *v = cfg_get(w, key);
	int k = 0;
	if (!v) return 1;
	if (array_items(w, key, v, max, &k) < 0) return -1;
	for (int i = 0; i < k; i++) {
		json_t *s = json_is_array(v) ? json_array_get(v, i) : v;
		if (!json_is_string(s))
			return sd_seterr("%s: config '%s' holds a non-string", component_names[w->comp], key);
		out[i] = json_string_value(s);
	}
	*n = k;
	return 0;
}

const char *sd_config_json(const sd_weights *w)
{
	return w->config_text;
}

/* ==== geometry (sd_model_geometry) ==== */

static int json_geometry(const char *dir, sd_geometry *g)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/vae/config.json", dir);
	json_error_t e;
	json_t *v = json_load_file(path, 0, &e);
	if (!v) return -1;
	json_t *boc = json_object_get(v, "block_out_channels"), *lc = json_object_get(v, "latent_channels");
	int ok = json_is_array(boc) && json_array_size(boc) >= 1 && json_array_size(boc) <= 16;
	if (ok) {
		g->factor = 1 << (json_array_size(boc) - 1);
		g->channels = json_is_integer(lc) ? (int)json_integer_value(lc) : 4;
	}
	json_decref(v);
	if (!ok || g->channels < 1 || g->channels > 1024) return -1;
	snprintf(path, sizeof path, "%s/unet/config.json", dir);
	json_t *u = json_load_file(path, 0, &e);
	json_t *ss = u ? json_object_get(u, "sample_size") : NULL;
	if (json_is_integer(ss) && json_integer_value(ss) > 0 && json_integer_value(ss) < 65536)
		g->sample_size = (int)json_integer_value(ss);
	json_decref(u);
	return 0;
}

int sd_model_geometry(sd_model *m, sd_geometry *g)
{
	memset(g, 0, sizeof *g);
	if (!strcmp(sd_model_format(m), "diffusers") && json_geometry(sd_model_path(m), g) == 0) {
		if (!g->sample_size) g->sample_size = 64;
		return 0;
	}
	memset(g, 0, sizeof *g);
	if (!sd_model_has(m, SD_VAE))
		return sd_seterr("%s: the model has no VAE (its factor sets the latent size)", sd_model_path(m));
	sd_weights *w = sd_weights_load(m, SD_VAE, SD_DEVICE_CPU);
	if (!w) return -1;
	int64_t boc[16], lc = 4;
	int n = 0, rc = 0;
	if (sd_config_int_array(w, "block_out_channels", boc, 16, &n) != 0 || n < 1)
		rc = sd_seterr("%s: the VAE's config has no block_out_channels", sd_model_path(m));
	else if (sd_config_int(w, "latent_channels", &lc) < 0)
		rc = sd_preerr("%s", sd_model_path(m));
	else if (lc < 1 || lc > 1024)
		rc = sd_seterr("%s: the VAE's latent_channels %lld is out of range", sd_model_path(m), (long long)lc);
	g->factor = 1 << (n > 0 ? n - 1 : 0);
	g->channels = (int)lc;
	g->sample_size = 64; /* SD 1.x: a single file carries no UNet sample_size */
	sd_weights_free(w);
	return rc;
}
