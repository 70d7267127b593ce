/*
 * merge.c - checkpoint arithmetic and writing, for sd-merge: weighted sums of weights, the names of the
 * original (CompVis/LDM) single-file layout for diffusers-named weights (the inverse of ldm-names.c,
 * as diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py renames them), and writers for
 * a diffusers folder and a single-file .safetensors that sd_model_open reads back.
 *
 * Folders are built under "<dir>.tmp-XXXXXX" and renamed into place, so a folder appears whole or not
 * at all; single files go through sd_st_write (temporary file + fsync + rename).
 */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "sd.h"

/* ==== arithmetic ==== */

sd_tensor *sd_weights_at_mut(sd_weights *w, int i)
{
	/* the tensors are copies sd_weights_load made and w owns (see model.c) */
	return (sd_tensor *)sd_weights_at(w, i);
}

int sd_weights_axpby(sd_weights *dst, float a, const sd_weights *src, float b)
{
	char s1[96], s2[96];
	const char *comp = sd_component_name(sd_weights_component(dst));
	if (sd_weights_component(dst) != sd_weights_component(src))
		return sd_seterr("cannot merge the %s with the %s", comp, sd_component_name(sd_weights_component(src)));
	int n = sd_weights_count(dst), m = sd_weights_count(src);
	for (int i = 0, j = 0; i < n || j < m; i++, j++) {
		const char *na = i < n ? sd_weights_name(dst, i) : NULL, *nb = j < m ? sd_weights_name(src, j) : NULL;
		if (!na || !nb || strcmp(na, nb)) {
			const char *miss = !nb || (na && strcmp(na, nb) < 0) ? na : nb;
			return sd_seterr("%s: tensor '%s' is in one model but not in the other", comp, miss);
		}
		sd_tensor *x = sd_weights_at_mut(dst, i);
		const sd_tensor *y = sd_weights_at(src, j);
		if (!sd_tensor_same_shape(x, y) || x->dtype != y->dtype)
			return sd_seterr("%s: tensor '%s' is %s %s in one model and %s %s in the other", comp, na,
			                 sd_dtype_name(x->dtype), sd_shape_str(x->ndim, x->shape, s1, sizeof s1),
			                 sd_dtype_name(y->dtype), sd_shape_str(y->ndim, y->shape, s2, sizeof s2));
		if (x->dtype == SD_DTYPE_F32) {
			if (sd_add(x, x, y, a, b) < 0) return sd_preerr("%s: %s", comp, na);
		} else if (x->device == SD_DEVICE_CPU && memcmp(x->data, y->data, sd_tensor_nbytes(x))) {
			return sd_seterr("%s: tensor '%s' (%s) differs between the models and cannot be averaged", comp, na,
			                 sd_dtype_name(x->dtype));
		}
	}
	return 0;
}

/* ==== LDM names ==== */

static int eat(const char **s, const char *lit)
{
	size_t n = strlen(lit);
	if (strncmp(*s, lit, n)) return 0;
	*s += n;
	return 1;
}

/* A decimal index followed by '.', stepped past; -1 when there is none. */
static int index_dot(const char **s)
{
	const char *p = *s;
	long v = 0;
	if (*p < '0' || *p > '9') return -1;
	while (*p >= '0' && *p <= '9') {
		v = v * 10 + (*p++ - '0');
		if (v > 100000) return -1;
	}
	if (*p != '.') return -1;
	*s = p + 1;
	return (int)v;
}

static int put(char *out, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int put(char *out, size_t n, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int k = vsnprintf(out, n, fmt, ap);
	va_end(ap);
	return k >= 0 && (size_t)k < n ? 1 : sd_seterr("LDM name too long");
}

/* Resnet sublayers of the UNet: diffusers → LDM's Sequential indices. */
static const char *unet_resnet_part(const char **rest)
{
	static const struct { const char *hf, *ldm; } map[] = {
		{"norm1.", "in_layers.0."},   {"conv1.", "in_layers.2."},  {"norm2.", "out_layers.0."},
		{"conv2.", "out_layers.3."},  {"time_emb_proj.", "emb_layers.1."}, {"conv_shortcut.", "skip_connection."},
	};
	for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
		if (eat(rest, map[i].hf)) return map[i].ldm;
	return NULL;
}

/* Count of entries of an int-array config key, else -1. */
static int cfg_len(const sd_weights *w, const char *key, int64_t *first)
{
	int64_t v[32];
	int n;
	if (sd_config_int_array(w, key, v, 32, &n) != 0 || n < 1) return -1;
	if (first) *first = v[0];
	return n;
}

/* The largest "<pre><k>." index + 1 among w's names (0 when none). */
static int count_prefix(const sd_weights *w, const char *pre)
{
	int m = 0;
	for (int i = 0; i < sd_weights_count(w); i++) {
		const char *s = sd_weights_name(w, i);
		if (!eat(&s, pre)) continue;
		int k = index_dot(&s);
		if (k + 1 > m) m = k + 1;
	}
	return m;
}

static int map_unet(const sd_weights *w, const char *s, char *out, size_t n)
{
	const char *P = "model.diffusion_model.";
	int64_t lpb64;
	int lpb = cfg_len(w, "layers_per_block", &lpb64) > 0 ? (int)lpb64 : count_prefix(w, "down_blocks.0.resnets.");
	int per = lpb + 1, b, l;
	const char *part;
	if (eat(&s, "time_embedding.linear_1.")) return put(out, n, "%stime_embed.0.%s", P, s);
	if (eat(&s, "time_embedding.linear_2.")) return put(out, n, "%stime_embed.2.%s", P, s);
	if (eat(&s, "conv_in.")) return put(out, n, "%sinput_blocks.0.0.%s", P, s);
	if (eat(&s, "conv_norm_out.")) return put(out, n, "%sout.0.%s", P, s);
	if (eat(&s, "conv_out.")) return put(out, n, "%sout.2.%s", P, s);
	if (eat(&s, "down_blocks.")) {
		if ((b = index_dot(&s)) < 0) return 0;
		if (eat(&s, "resnets.")) {
			if ((l = index_dot(&s)) < 0 || !(part = unet_resnet_part(&s))) return 0;
			return put(out, n, "%sinput_blocks.%d.0.%s%s", P, 1 + b * per + l, part, s);
		}
		if (eat(&s, "attentions.")) {
			if ((l = index_dot(&s)) < 0) return 0;
			return put(out, n, "%sinput_blocks.%d.1.%s", P, 1 + b * per + l, s);
		}
		if (eat(&s, "downsamplers.0.conv.")) return put(out, n, "%sinput_blocks.%d.0.op.%s", P, 1 + b * per + lpb, s);
		return 0;
	}
	if (eat(&s, "mid_block.")) {
		if (eat(&s, "attentions.0.")) return put(out, n, "%smiddle_block.1.%s", P, s);
		if (eat(&s, "resnets.")) {
			if ((l = index_dot(&s)) < 0 || l > 1 || !(part = unet_resnet_part(&s))) return 0;
			return put(out, n, "%smiddle_block.%d.%s%s", P, 2 * l, part, s);
		}
		return 0;
	}
	if (eat(&s, "up_blocks.")) {
		if ((b = index_dot(&s)) < 0) return 0;
		if (eat(&s, "resnets.")) {
			if ((l = index_dot(&s)) < 0 || !(part = unet_resnet_part(&s))) return 0;
			return put(out, n, "%soutput_blocks.%d.0.%s%s", P, b * per + l, part, s);
		}
		if (eat(&s, "attentions.")) {
			if ((l = index_dot(&s)) < 0) return 0;
			return put(out, n, "%soutput_blocks.%d.1.%s", P, b * per + l, s);
		}
		if (eat(&s, "upsamplers.0.conv.")) {
			char probe[96];
			snprintf(probe, sizeof probe, "up_blocks.%d.attentions.", b);
			int attn = 0;
			for (int i = 0; i < sd_weights_count(w) && !attn; i++)
				attn = !strncmp(sd_weights_name(w, i), probe, strlen(probe));
			return put(out, n, "%soutput_blocks.%d.%d.conv.%s", P, b * per + lpb, attn ? 2 : 1, s);
		}
		return 0;
	}
	return 0;
}

static int map_vae(const sd_weights *w, const char *s, char *out, size_t n, int *unsq)
{
	const char *P = "first_stage_model.";
	if (eat(&s, "quant_conv.")) return put(out, n, "%squant_conv.%s", P, s);
	if (eat(&s, "post_quant_conv.")) return put(out, n, "%spost_quant_conv.%s", P, s);
	const char *half = eat(&s, "encoder.") ? "encoder" : eat(&s, "decoder.") ? "decoder" : NULL;
	if (!half) return 0;
	int dec = half[0] == 'd', b, j;
	if (eat(&s, "conv_in.")) return put(out, n, "%s%s.conv_in.%s", P, half, s);
	if (eat(&s, "conv_out.")) return put(out, n, "%s%s.conv_out.%s", P, half, s);
	if (eat(&s, "conv_norm_out.")) return put(out, n, "%s%s.norm_out.%s", P, half, s);
	if (eat(&s, dec ? "up_blocks." : "down_blocks.")) {
		if ((b = index_dot(&s)) < 0) return 0;
		int nup = cfg_len(w, "block_out_channels", NULL);
		if (nup < 0) nup = count_prefix(w, "decoder.up_blocks.");
		int i = dec ? nup - 1 - b : b;
		if (i < 0) return 0;
		if (eat(&s, "resnets.")) {
			if ((j = index_dot(&s)) < 0) return 0;
			const char *part = eat(&s, "conv_shortcut.") ? "nin_shortcut." : "";
			return put(out, n, "%s%s.%s.%d.block.%d.%s%s", P, half, dec ? "up" : "down", i, j, part, s);
		}
		if (!dec && eat(&s, "downsamplers.0.conv.")) return put(out, n, "%s%s.down.%d.downsample.conv.%s", P, half, i, s);
		if (dec && eat(&s, "upsamplers.0.conv.")) return put(out, n, "%s%s.up.%d.upsample.conv.%s", P, half, i, s);
		return 0;
	}
	if (eat(&s, "mid_block.resnets.")) {
		if ((j = index_dot(&s)) < 0 || j > 1) return 0;
		const char *part = eat(&s, "conv_shortcut.") ? "nin_shortcut." : "";
		return put(out, n, "%s%s.mid.block_%d.%s%s", P, half, j + 1, part, s);
	}
	if (eat(&s, "mid_block.attentions.0.")) {
		static const struct { const char *hf, *ldm; int lin; } map[] = {
			{"group_norm.", "norm.", 0}, {"to_q.", "q.", 1}, {"to_k.", "k.", 1}, {"to_v.", "v.", 1},
			{"to_out.0.", "proj_out.", 1}, {"query.", "q.", 1}, {"key.", "k.", 1}, {"value.", "v.", 1},
			{"proj_attn.", "proj_out.", 1},
		};
		for (size_t k = 0; k < sizeof map / sizeof map[0]; k++)
			if (eat(&s, map[k].hf)) {
				*unsq = map[k].lin && !strcmp(s, "weight") ? 2 : 0;
				return put(out, n, "%s%s.mid.attn_1.%s%s", P, half, map[k].ldm, s);
			}
		return 0;
	}
	return 0;
}

int sd_ldm_name(const sd_weights *w, const char *name, char *out, size_t n, int *unsqueeze)
{
	*unsqueeze = 0;
	switch (sd_weights_component(w)) {
	case SD_TEXT_ENCODER:
		return !strncmp(name, "text_model.", 11) ? put(out, n, "cond_stage_model.transformer.%s", name) : 0;
	case SD_VAE:
		return map_vae(w, name, out, n, unsqueeze);
	case SD_UNET:
		return map_unet(w, name, out, n);
	default:
		return 0;
	}
}

/* ==== writing ==== */

/* Tensors of one output file: names and headers (data converted when asked). */
struct outset {
	char **names;
	sd_tensor **t;     /* headers (views) or converted copies */
	int *owned;
	int n, cap;
};

static void outset_free(struct outset *o)
{
	for (int i = 0; i < o->n; i++) {
		free(o->names[i]);
		if (o->owned[i]) sd_tensor_free(o->t[i]);
		else free(o->t[i]);
	}
	free(o->names);
	free(o->t);
	free(o->owned);
	memset(o, 0, sizeof *o);
}

/* Add src as name, converted to dtype when it is a float tensor, with `unsq` trailing 1-dims added to a
 * 2-D tensor. */
static int outset_add(struct outset *o, const char *name, const sd_tensor *src, enum sd_dtype dtype, int unsq)
{
	if (src->device != SD_DEVICE_CPU) return sd_seterr("%s: weights must be on the CPU to be written", name);
	if (o->n == o->cap) {
		int cap = o->cap ? 2 * o->cap : 256;
		char **nm = realloc(o->names, cap * sizeof *nm);
		if (nm) o->names = nm;
		sd_tensor **t = nm ? realloc(o->t, cap * sizeof *t) : NULL;
		if (t) o->t = t;
		int *ow = t ? realloc(o->owned, cap * sizeof *ow) : NULL;
		if (ow) o->owned = ow;
		if (!ow) return sd_seterr("out of memory");
		o->cap = cap;
	}
	sd_tensor *t;
	int owned = 0;
	if (sd_dtype_is_float(src->dtype) && src->dtype != dtype) {
		if (!(t = sd_tensor_convert(src, dtype))) return -1;
		owned = 1;
	} else {
		if (!(t = malloc(sizeof *t))) return sd_seterr("out of memory");
		*t = *src;
		t->owns = 0;
	}
	if (unsq && t->ndim == 2) {
		t->shape[2] = t->shape[3] = 1;
		t->ndim = 4;
	}
	char *nm = strdup(name);
	if (!nm) {
		if (owned) sd_tensor_free(t);
		else free(t);
		return sd_seterr("out of memory");
	}
	o->names[o->n] = nm;
	o->t[o->n] = t;
	o->owned[o->n++] = owned;
	return 0;
}

static int outset_write(struct outset *o, const char *path, const char *const *meta)
{
	return sd_st_write(path, o->n, (const char *const *)o->names, (const sd_tensor *const *)o->t, meta);
}

static int check_dtype(enum sd_dtype d)
{
	if (d != SD_DTYPE_F32 && d != SD_DTYPE_F16 && d != SD_DTYPE_BF16)
		return sd_seterr("output dtype %s: only f32, f16 and bf16 are written", sd_dtype_name(d));
	return 0;
}

int sd_model_write_single(const char *path, sd_weights *const ws[SD_COMPONENT_COUNT], enum sd_dtype dtype)
{
	if (check_dtype(dtype) < 0) return -1;
	struct stat st;
	if (lstat(path, &st) == 0) return sd_seterr("%s: already exists (remove it first)", path);
	struct outset o = {0};
	int rc = 0, any = 0;
	for (int c = 0; c < SD_COMPONENT_COUNT && rc == 0; c++) {
		const sd_weights *w = ws[c];
		if (!w) continue;
		any = 1;
		for (int i = 0; i < sd_weights_count(w) && rc == 0; i++) {
			char name[600];
			int unsq, m = sd_ldm_name(w, sd_weights_name(w, i), name, sizeof name, &unsq);
			if (m < 0) rc = -1;
			else if (m == 0)
				rc = sd_seterr("%s: weight '%s' has no name in the single-file layout", sd_component_name(c),
				               sd_weights_name(w, i));
			else
				rc = outset_add(&o, name, sd_weights_at(w, i), dtype, unsq);
		}
		if (rc == 0 && c == SD_TEXT_ENCODER) {
			/* the position_ids buffer the original files carry (int64 arange) */
			const sd_tensor *pe = sd_weights_get(w, "text_model.embeddings.position_embedding.weight");
			int64_t P = pe ? pe->shape[0] : 77;
			sd_tensor *ids = sd_tensor_newv(SD_DTYPE_I64, 2, (int64_t)1, P);
			if (!ids) rc = -1;
			else {
				for (int64_t k = 0; k < P; k++) ((int64_t *)ids->data)[k] = k;
				rc = outset_add(&o, "cond_stage_model.transformer.text_model.embeddings.position_ids", ids, dtype, 0);
				if (rc == 0) { /* hand the tensor itself to the set */
					free(o.t[o.n - 1]);
					o.t[o.n - 1] = ids;
					o.owned[o.n - 1] = 1;
				} else
					sd_tensor_free(ids);
			}
		}
	}
	if (rc == 0 && !any) rc = sd_seterr("%s: nothing to write (no component)", path);
	if (rc == 0) rc = outset_write(&o, path, NULL);
	outset_free(&o);
	return rc;
}

static const char *const weight_file[SD_COMPONENT_COUNT] = {
	[SD_TEXT_ENCODER] = "model.safetensors", [SD_VAE] = "diffusion_pytorch_model.safetensors",
	[SD_UNET] = "diffusion_pytorch_model.safetensors", [SD_TEXT_ENCODER_2] = "model.safetensors",
};
static const char *const class_name[SD_COMPONENT_COUNT] = {
	[SD_TEXT_ENCODER] = "CLIPTextModel", [SD_VAE] = "AutoencoderKL", [SD_UNET] = "UNet2DConditionModel",
	[SD_TEXT_ENCODER_2] = "CLIPTextModelWithProjection",
};

static const char default_scheduler[] =
	"{\"_class_name\": \"PNDMScheduler\", \"_diffusers_version\": \"0.25.1\", \"beta_end\": 0.012, "
	"\"beta_schedule\": \"scaled_linear\", \"beta_start\": 0.00085, \"clip_sample\": false, "
	"\"num_train_timesteps\": 1000, \"prediction_type\": \"epsilon\", \"set_alpha_to_one\": false, "
	"\"skip_prk_steps\": true, \"steps_offset\": 1, \"timestep_spacing\": \"leading\", \"trained_betas\": null}\n";

static char *path2(const char *a, const char *b)
{
	size_t n = strlen(a) + strlen(b) + 2;
	char *s = malloc(n);
	if (!s) sd_seterr("out of memory");
	else snprintf(s, n, "%s/%s", a, b);
	return s;
}

static int write_text(const char *dir, const char *name, const char *text)
{
	char *p = path2(dir, name);
	if (!p) return -1;
	int rc = sd_write_file_atomic(p, text, strlen(text));
	free(p);
	return rc;
}

static int write_json(const char *dir, const char *name, json_t *j)
{
	char *text = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(17));
	if (!text) return sd_seterr("out of memory");
	size_t n = strlen(text);
	char *t2 = realloc(text, n + 2);
	if (!t2) {
		free(text);
		return sd_seterr("out of memory");
	}
	t2[n] = '\n', t2[n + 1] = 0;
	int rc = write_text(dir, name, t2);
	free(t2);
	return rc;
}

static int make_dir(const char *dir, const char *name)
{
	char *p = path2(dir, name);
	if (!p) return -1;
	int rc = mkdir(p, 0777) == 0 || errno == EEXIST ? 0 : sd_seterr("%s: %s", p, strerror(errno));
	free(p);
	return rc;
}

/* Remove a folder we made, with the files (and folders one level down) in it. */
static void remove_tree(const char *dir, int depth)
{
	DIR *d = opendir(dir);
	if (d) {
		struct dirent *e;
		while ((e = readdir(d))) {
			if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
			char *p = path2(dir, e->d_name);
			if (!p) continue;
			struct stat st;
			if (depth > 0 && lstat(p, &st) == 0 && S_ISDIR(st.st_mode)) remove_tree(p, depth - 1);
			else unlink(p);
			free(p);
		}
		closedir(d);
	}
	rmdir(dir);
}

/* Copy every regular file of src into dst (a folder that exists). */
static int copy_files(const char *src, const char *dst)
{
	DIR *d = opendir(src);
	if (!d) return sd_seterr("%s: %s", src, strerror(errno));
	struct dirent *e;
	int rc = 0;
	while (rc == 0 && (e = readdir(d))) {
		if (e->d_name[0] == '.') continue;
		char *p = path2(src, e->d_name);
		struct stat st;
		if (!p) rc = -1;
		else if (stat(p, &st) == 0 && S_ISREG(st.st_mode)) {
			size_t len;
			char *data = sd_read_file(p, 0, &len);
			char *q = data ? path2(dst, e->d_name) : NULL;
			rc = q ? sd_write_file_atomic(q, data, len) : -1;
			free(q);
			free(data);
		}
		free(p);
	}
	closedir(d);
	return rc;
}

/* One component folder: config.json (the weights' config, with the class names diffusers and
 * transformers write) and the weights. */
static int write_component(const char *root, enum sd_component c, const sd_weights *w, enum sd_dtype dtype)
{
	const char *cn = sd_component_name(c);
	if (make_dir(root, cn) < 0) return -1;
	char *dir = path2(root, cn);
	if (!dir) return -1;
	json_error_t err;
	json_t *cfg = json_loads(sd_config_json(w), 0, &err);
	int rc = 0;
	if (!cfg || !json_is_object(cfg)) rc = sd_seterr("%s: config: %s", cn, cfg ? "not an object" : err.text);
	if (rc == 0) {
		if (c == SD_TEXT_ENCODER || c == SD_TEXT_ENCODER_2) {
			if (!json_object_get(cfg, "architectures"))
				json_object_set_new(cfg, "architectures", json_pack("[s]", class_name[c]));
			if (!json_object_get(cfg, "model_type")) json_object_set_new(cfg, "model_type", json_string("clip_text_model"));
			if (!json_object_get(cfg, "torch_dtype"))
				json_object_set_new(cfg, "torch_dtype", json_string(dtype == SD_DTYPE_F16 ? "float16"
				                                                    : dtype == SD_DTYPE_BF16 ? "bfloat16" : "float32"));
		} else {
			if (!json_object_get(cfg, "_class_name")) json_object_set_new(cfg, "_class_name", json_string(class_name[c]));
			if (!json_object_get(cfg, "_diffusers_version"))
				json_object_set_new(cfg, "_diffusers_version", json_string("0.25.1"));
		}
		rc = write_json(dir, "config.json", cfg);
	}
	json_decref(cfg);
	struct outset o = {0};
	for (int i = 0; rc == 0 && i < sd_weights_count(w); i++)
		rc = outset_add(&o, sd_weights_name(w, i), sd_weights_at(w, i), dtype, 0);
	char *file = rc == 0 ? path2(dir, weight_file[c]) : NULL;
	if (rc == 0 && !file) rc = -1;
	static const char *const meta[] = {"format", "pt", NULL};
	if (rc == 0) rc = outset_write(&o, file, meta);
	free(file);
	outset_free(&o);
	free(dir);
	return rc;
}

int sd_model_write_diffusers(const char *dir, sd_weights *const ws[SD_COMPONENT_COUNT], enum sd_dtype dtype,
                             const char *tokenizer_dir, const char *scheduler_json)
{
	if (check_dtype(dtype) < 0) return -1;
	struct stat st;
	if (stat(dir, &st) == 0) return sd_seterr("%s: already exists (remove it first)", dir);
	/* "<dir>.tmp-XXXXXX" next to it (trailing slashes dropped), renamed into place at the end */
	size_t n = strlen(dir);
	while (n > 1 && dir[n - 1] == '/') n--;
	char *tmp = malloc(n + 16);
	if (!tmp) return sd_seterr("out of memory");
	snprintf(tmp, n + 16, "%.*s.tmp-XXXXXX", (int)n, dir);
	if (!mkdtemp(tmp)) {
		int e = errno;
		free(tmp);
		return sd_seterr("%s: cannot make a temporary folder: %s", dir, strerror(e));
	}
	{ /* mkdtemp makes it 0700: give it what mkdir would */
		mode_t mask = umask(022);
		umask(mask);
		chmod(tmp, 0777 & ~mask);
	}
	int rc = 0;
	json_t *index = json_object();
	if (!index) rc = sd_seterr("out of memory");
	if (rc == 0) {
		json_object_set_new(index, "_class_name", json_string("StableDiffusionPipeline"));
		json_object_set_new(index, "_diffusers_version", json_string("0.25.1"));
		json_object_set_new(index, "feature_extractor", json_pack("[nn]"));
		json_object_set_new(index, "safety_checker", json_pack("[nn]"));
		json_object_set_new(index, "requires_safety_checker", json_false());
	}
	for (int c = 0; c < SD_COMPONENT_COUNT && rc == 0; c++) {
		if (!ws[c]) continue;
		rc = write_component(tmp, c, ws[c], dtype);
		if (rc == 0)
			json_object_set_new(index, sd_component_name(c),
			                    json_pack("[ss]", c == SD_TEXT_ENCODER || c == SD_TEXT_ENCODER_2 ? "transformers" : "diffusers",
			                              class_name[c]));
	}
	if (rc == 0) { /* scheduler */
		const char *text = scheduler_json && *scheduler_json ? scheduler_json : default_scheduler;
		json_error_t err;
		json_t *j = json_loads(text, 0, &err);
		json_t *cls = j ? json_object_get(j, "_class_name") : NULL;
		rc = make_dir(tmp, "scheduler");
		if (rc == 0) {
			char *sd = path2(tmp, "scheduler");
			rc = sd ? write_text(sd, "scheduler_config.json", text) : -1;
			free(sd);
		}
		if (rc == 0)
			json_object_set_new(index, "scheduler",
			                    json_pack("[ss]", "diffusers", json_is_string(cls) ? json_string_value(cls) : "PNDMScheduler"));
		json_decref(j);
	}
	if (rc == 0 && tokenizer_dir) {
		rc = make_dir(tmp, "tokenizer");
		char *td = rc == 0 ? path2(tmp, "tokenizer") : NULL;
		if (rc == 0) rc = td ? copy_files(tokenizer_dir, td) : -1;
		free(td);
		if (rc == 0) json_object_set_new(index, "tokenizer", json_pack("[ss]", "transformers", "CLIPTokenizer"));
	}
	if (rc == 0) rc = write_json(tmp, "model_index.json", index);
	json_decref(index);
	if (rc == 0 && rename(tmp, dir) < 0) rc = sd_seterr("%s: %s", dir, strerror(errno));
	if (rc < 0) remove_tree(tmp, 2);
	free(tmp);
	return rc;
}
