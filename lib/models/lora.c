/*
 * lora.c - LoRA adapters (the layer's forward is nn/linear.c): reading adapters in the formats users have, and applying
 * them to a model, unmerged (run-time) or merged into its weights.  The numbers are PEFT's
 * (peft/tuners/lora/layer.py: Linear.forward, get_delta_weight, merge): y = W x + b + s·B(A x) with
 * s = alpha / r (alpha / √r with use_rslora), merged W' = W + s·B·A.  The file formats are those of
 * PeftModel.save_pretrained, kohya's sd-scripts (networks/lora.py: lora_unet_* / lora_te_* names with
 * lora_down / lora_up / alpha) and diffusers' save_lora_weights (loaders/lora.py, with the older
 * attention-processor spellings that diffusers still converts).
 *
 * A set holds one entry per A/B pair as read (CPU f32 copies, the component, the module's name and the
 * scale).  kohya names are the module path with '.' turned into '_', so they cannot be split back
 * without the model: they are kept flat and resolved when the set is applied, against the names of the
 * weights, both the diffusers path and the original LDM path (sd_ldm_name), flattened the same way.
 *
 * Applying: adapters on a layer the model can run unmerged (it has a slot: sd_clip_find_linear,
 * sd_vae_find_linear, the UNet's attention projections) are stacked into one sd_lora_layer per layer
 * (A rows pre-scaled, scale 1; one adapter keeps its own A, B and scale), copied to the model's device;
 * any other (feed-forward, resnet convs, kohya's conv LoRA) is merged into the weights, which is exact.
 */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include "sd.h"

/* ==== the set ==== */

struct entry {
	enum sd_component comp;
	char *module;    /* diffusers / transformers module path, or kohya's flat name when flat */
	int flat;
	char *key;       /* the A key as the file spells it (for messages) */
	char *src;       /* the file */
	sd_tensor *a;    /* (r, I) or (r, C, kh, kw), CPU f32 */
	sd_tensor *b;    /* (O, r) or (O, r, 1, 1) */
	float scale;     /* user scale · alpha / r */
};

struct sd_lora {
	struct entry *e;
	int n, cap;
	void **owned;    /* sd_lora_layer and sd_tensor allocations made when applying */
	int *owned_kind; /* 0 layer (free), 1 tensor */
	int no, capo;
};

sd_lora *sd_lora_new(void)
{
	sd_lora *s = calloc(1, sizeof *s);
	if (!s) sd_seterr("out of memory");
	return s;
}

static void entry_free(struct entry *e)
{
	free(e->module);
	free(e->key);
	free(e->src);
	sd_tensor_free(e->a);
	sd_tensor_free(e->b);
}

void sd_lora_free(sd_lora *s)
{
	if (!s) return;
	for (int i = 0; i < s->n; i++) entry_free(&s->e[i]);
	free(s->e);
	for (int i = 0; i < s->no; i++) {
		if (s->owned_kind[i]) sd_tensor_free(s->owned[i]);
		else free(s->owned[i]);
	}
	free(s->owned);
	free(s->owned_kind);
	free(s);
}

int sd_lora_count(const sd_lora *s, enum sd_component c)
{
	int k = 0;
	for (int i = 0; s && i < s->n; i++) k += s->e[i].comp == c;
	return k;
}

/* Keep p (kind 0: malloc'd, 1: a tensor) until sd_lora_free; -1 (and p freed) when out of memory. */
static int own(sd_lora *s, void *p, int kind)
{
	if (s->no == s->capo) {
		int cap = s->capo ? 2 * s->capo : 32;
		void **o = realloc(s->owned, cap * sizeof *o);
		if (o) s->owned = o;
		int *k = o ? realloc(s->owned_kind, cap * sizeof *k) : NULL;
		if (k) s->owned_kind = k;
		if (!o || !k) {
			if (kind) sd_tensor_free(p);
			else free(p);
			return sd_seterr("out of memory");
		}
		s->capo = cap;
	}
	s->owned[s->no] = p;
	s->owned_kind[s->no++] = kind;
	return 0;
}

int sd_lora_parse_arg(const char *arg, char **path, float *scale)
{
	*path = NULL;
	*scale = 1.0f;
	const char *colon = strrchr(arg, ':');
	size_t n = strlen(arg);
	if (colon && colon[1]) {
		char *end;
		errno = 0;
		double v = strtod(colon + 1, &end);
		if (!*end && errno == 0 && isfinite(v)) {
			*scale = (float)v;
			n = (size_t)(colon - arg);
		} else if (access(arg, F_OK) != 0 && !strchr(colon + 1, '/')) {
			/* PATH:SCALE with a scale that is not a number (a path with a colon in it exists) */
			return sd_seterr("--lora '%s': the scale '%s' is not a number (PATH[:SCALE], e.g. style.safetensors:0.8)",
			                 arg, colon + 1);
		}
	}
	if (n == 0) return sd_seterr("--lora '%s': the path is empty", arg);
	if (!(*path = strndup(arg, n))) return sd_seterr("out of memory");
	return 0;
}

sd_lora *sd_lora_load(const char *const *args, int n)
{
	sd_lora *s = sd_lora_new();
	for (int i = 0; s && i < n; i++) {
		char *path;
		float scale;
		if (sd_lora_parse_arg(args[i], &path, &scale) < 0 || sd_lora_add(s, path, scale) < 0) {
			free(path);
			sd_lora_free(s);
			return NULL;
		}
		free(path);
	}
	return s;
}

/* ==== reading ==== */

/* The tensors of one file: safetensors (mmapped) or a torch pickle (.ckpt/.pt/.bin). */
struct file {
	const char *path;
	sd_st *st;
	sd_ckpt *ck;
};

static int f_count(const struct file *f) { return f->st ? sd_st_count(f->st) : sd_ckpt_count(f->ck); }
static const char *f_name(const struct file *f, int i) { return f->st ? sd_st_name(f->st, i) : sd_ckpt_name(f->ck, i); }
static const sd_tensor *f_tensor(const struct file *f, int i) { return f->st ? sd_st_tensor(f->st, i) : sd_ckpt_tensor(f->ck, i); }

static int ends_with(const char *s, const char *suf)
{
	size_t a = strlen(s), b = strlen(suf);
	return a >= b && !strcmp(s + a - b, suf);
}

static int starts_with(const char *s, const char *pre)
{
	return !strncmp(s, pre, strlen(pre));
}

static int f_open(struct file *f, const char *path)
{
	memset(f, 0, sizeof *f);
	f->path = path;
	if (ends_with(path, ".ckpt") || ends_with(path, ".pt") || ends_with(path, ".pth") || ends_with(path, ".bin"))
		f->ck = sd_ckpt_open(path);
	else
		f->st = sd_st_open(path);
	return f->st || f->ck ? 0 : -1;
}

static void f_close(struct file *f)
{
	sd_st_close(f->st);
	sd_ckpt_close(f->ck);
	f->st = NULL;
	f->ck = NULL;
}

/* What a key is: part of the adapter of (comp, module), as A, B or alpha. */
enum role { R_A, R_B, R_ALPHA };

struct part {
	enum sd_component comp;
	char *module;
	enum role role;
	int idx; /* tensor index in the file */
};

struct parts {
	struct part *v;
	int n, cap;
	int flat;
};

static void parts_free(struct parts *P)
{
	for (int i = 0; i < P->n; i++) free(P->v[i].module);
	free(P->v);
	memset(P, 0, sizeof *P);
}

/* Add module = base[0, len) + suffix. */
static int parts_add(struct parts *P, enum sd_component c, const char *base, size_t len, const char *suffix,
                     enum role r, int idx)
{
	if (P->n == P->cap) {
		int cap = P->cap ? 2 * P->cap : 64;
		struct part *v = realloc(P->v, cap * sizeof *v);
		if (!v) return sd_seterr("out of memory");
		P->v = v;
		P->cap = cap;
	}
	size_t ls = suffix ? strlen(suffix) : 0;
	char *m = malloc(len + ls + 1);
	if (!m) return sd_seterr("out of memory");
	memcpy(m, base, len);
	memcpy(m + len, suffix ? suffix : "", ls + 1);
	P->v[P->n++] = (struct part){c, m, r, idx};
	return 0;
}

static int cmp_part(const void *x, const void *y)
{
	const struct part *a = x, *b = y;
	if (a->comp != b->comp) return (int)a->comp - (int)b->comp;
	int r = strcmp(a->module, b->module);
	return r ? r : (int)a->role - (int)b->role;
}

static char *shape_s(const sd_tensor *t, char *buf, size_t n)
{
	return sd_shape_str(t->ndim, t->shape, buf, n);
}

/* Per-module alpha from a PEFT config (NULL: alpha = r unless the file gives one). */
struct peft_cfg {
	json_t *j;
	double alpha;
	int r;
	int rslora;
};

/* PEFT's rank_pattern / alpha_pattern lookup: the first key that is the module's name or a dotted suffix of it. */
static json_t *pattern(json_t *obj, const char *module)
{
	const char *key;
	json_t *v;
	if (!json_is_object(obj)) return NULL;
	json_object_foreach(obj, key, v) {
		size_t a = strlen(module), b = strlen(key);
		if (!strcmp(module, key) || (a > b && module[a - b - 1] == '.' && !strcmp(module + a - b, key))) return v;
	}
	return NULL;
}

/*
 * Turn the grouped parts of one file into entries.  pc: the PEFT config (alpha and r per module), or
 * NULL (kohya / diffusers: the file's alpha, else alpha = r).
 */
static int make_entries(sd_lora *s, struct file *f, struct parts *P, const struct peft_cfg *pc, float user)
{
	qsort(P->v, P->n, sizeof *P->v, cmp_part);
	char s1[96], s2[96];
	for (int i = 0; i < P->n;) {
		int j = i;
		const struct part *pa = NULL, *pb = NULL, *pal = NULL;
		for (; j < P->n && P->v[j].comp == P->v[i].comp && !strcmp(P->v[j].module, P->v[i].module); j++) {
			const struct part *p = &P->v[j];
			const struct part **slot = p->role == R_A ? &pa : p->role == R_B ? &pb : &pal;
			if (*slot)
				return sd_seterr("%s: %s: a second %s for the same layer (as %s)", f->path, f_name(f, p->idx),
				                 p->role == R_A ? "lora_A/lora_down" : p->role == R_B ? "lora_B/lora_up" : "alpha",
				                 f_name(f, (*slot)->idx));
			*slot = p;
		}
		const struct part *any = pa ? pa : pb ? pb : pal;
		if (!pa) return sd_seterr("%s: %s: no matching lora_A/lora_down weight", f->path, f_name(f, any->idx));
		if (!pb) return sd_seterr("%s: %s: no matching lora_B/lora_up weight", f->path, f_name(f, pa->idx));
		const char *ka = f_name(f, pa->idx);
		const sd_tensor *A = f_tensor(f, pa->idx), *B = f_tensor(f, pb->idx);
		if (!sd_dtype_is_float(A->dtype) || !sd_dtype_is_float(B->dtype))
			return sd_seterr("%s: %s: adapter weights must be floating point", f->path, ka);
		if ((A->ndim != 2 && A->ndim != 4) || (B->ndim != 2 && B->ndim != 4) || A->shape[0] < 1 ||
		    B->shape[1] != A->shape[0] || (B->ndim == 4 && (B->shape[2] != 1 || B->shape[3] != 1)))
			return sd_seterr("%s: %s: shapes %s (A) and %s (B) are not a LoRA pair ((r, in) and (out, r))",
			                 f->path, ka, shape_s(A, s1, sizeof s1), shape_s(B, s2, sizeof s2));
		const int r = (int)A->shape[0];
		double alpha = r;
		int rs = 0;
		if (pc) {
			json_t *rp = pattern(json_object_get(pc->j, "rank_pattern"), pa->module);
			json_t *ap = pattern(json_object_get(pc->j, "alpha_pattern"), pa->module);
			int want_r = rp ? (int)json_integer_value(rp) : pc->r;
			if (want_r != r)
				return sd_seterr("%s: %s: rank %d, but the adapter config says r = %d", f->path, ka, r, want_r);
			alpha = ap && json_is_number(ap) ? json_number_value(ap) : pc->alpha;
			rs = pc->rslora;
		}
		if (pal) {
			const sd_tensor *t = f_tensor(f, pal->idx);
			if (!sd_dtype_is_float(t->dtype) || sd_tensor_numel(t) != 1)
				return sd_seterr("%s: %s: alpha must be one number", f->path, f_name(f, pal->idx));
			sd_tensor *c = sd_tensor_convert(t, SD_DTYPE_F32);
			if (!c) return -1;
			alpha = *(float *)c->data;
			sd_tensor_free(c);
		}
		if (s->n == s->cap) {
			int cap = s->cap ? 2 * s->cap : 64;
			struct entry *e = realloc(s->e, cap * sizeof *e);
			if (!e) return sd_seterr("out of memory");
			s->e = e;
			s->cap = cap;
		}
		struct entry *e = &s->e[s->n];
		memset(e, 0, sizeof *e);
		e->comp = pa->comp;
		e->flat = P->flat;
		e->scale = (float)(user * (rs ? alpha / sqrt((double)r) : alpha / r));
		e->module = strdup(pa->module);
		e->key = strdup(ka);
		e->src = strdup(f->path);
		e->a = sd_tensor_convert(A, SD_DTYPE_F32);
		e->b = sd_tensor_convert(B, SD_DTYPE_F32);
		s->n++;
		if (!e->module || !e->key || !e->src || !e->a || !e->b) return sd_seterr("out of memory");
		i = j;
	}
	return 0;
}

/* ---- PEFT ---- */

static enum sd_component guess_component(const char *module)
{
	if (starts_with(module, "text_model.")) return SD_TEXT_ENCODER;
	if (starts_with(module, "encoder.") || starts_with(module, "decoder.") || starts_with(module, "quant_conv") ||
	    starts_with(module, "post_quant_conv"))
		return SD_VAE;
	return SD_UNET;
}

static int component_from_name(const char *s, enum sd_component *c)
{
	for (int k = 0; k < SD_COMPONENT_COUNT; k++)
		if (!strcmp(s, sd_component_name(k))) {
			*c = k;
			return 1;
		}
	return 0;
}

static char *join(const char *a, const char *b)
{
	size_t n = strlen(a) + strlen(b) + 2;
	char *s = malloc(n);
	if (s) snprintf(s, n, "%s/%s", a, b);
	else sd_seterr("out of memory");
	return s;
}

static int is_file(const char *p)
{
	struct stat st;
	return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static int is_dir(const char *p)
{
	struct stat st;
	return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* A PEFT adapter folder (adapter_config.json + adapter_model.safetensors or .bin). */
static int add_peft(sd_lora *s, const char *dir, float user)
{
	char *cfgp = join(dir, "adapter_config.json");
	char *wp = cfgp ? join(dir, "adapter_model.safetensors") : NULL;
	if (!wp) {
		free(cfgp);
		return -1;
	}
	if (!is_file(wp)) {
		free(wp);
		if (!(wp = join(dir, "adapter_model.bin"))) {
			free(cfgp);
			return -1;
		}
	}
	json_error_t jerr;
	struct peft_cfg pc = {0};
	struct parts P = {0};
	struct file f = {0};
	int rc = -1;
	pc.j = json_load_file(cfgp, 0, &jerr);
	if (!pc.j || !json_is_object(pc.j)) {
		sd_seterr("%s: %s", cfgp, pc.j ? "not a JSON object" : jerr.text);
		goto out;
	}
	json_t *v = json_object_get(pc.j, "peft_type");
	if (v && !(json_is_string(v) && !strcmp(json_string_value(v), "LORA"))) {
		sd_seterr("%s: peft_type is not LORA: only LoRA adapters are supported", cfgp);
		goto out;
	}
	if (json_is_true(json_object_get(pc.j, "use_dora"))) {
		sd_seterr("%s: use_dora: DoRA adapters are not supported", cfgp);
		goto out;
	}
	if (json_is_true(json_object_get(pc.j, "fan_in_fan_out"))) {
		sd_seterr("%s: fan_in_fan_out adapters (Conv1D models) are not supported", cfgp);
		goto out;
	}
	v = json_object_get(pc.j, "r");
	if (!json_is_integer(v) || json_integer_value(v) < 1) {
		sd_seterr("%s: 'r' is missing or not a positive integer", cfgp);
		goto out;
	}
	pc.r = (int)json_integer_value(v);
	v = json_object_get(pc.j, "lora_alpha");
	pc.alpha = json_is_number(v) ? json_number_value(v) : 8; /* LoraConfig's default */
	pc.rslora = json_is_true(json_object_get(pc.j, "use_rslora"));

	/* the component: the folder's name, the config's auto_mapping, the module names */
	enum sd_component comp = SD_UNET;
	int known = 0;
	{
		char *d = strdup(dir);
		if (!d) {
			sd_seterr("out of memory");
			goto out;
		}
		size_t n = strlen(d);
		while (n > 1 && d[n - 1] == '/') d[--n] = 0;
		const char *base = strrchr(d, '/') ? strrchr(d, '/') + 1 : d;
		known = component_from_name(base, &comp);
		free(d);
	}
	if (!known) {
		json_t *am = json_object_get(json_object_get(pc.j, "auto_mapping"), "base_model_class");
		const char *cls = json_is_string(am) ? json_string_value(am) : "";
		if (!strcmp(cls, "CLIPTextModel")) comp = SD_TEXT_ENCODER, known = 1;
		else if (!strcmp(cls, "UNet2DConditionModel")) comp = SD_UNET, known = 1;
		else if (!strcmp(cls, "AutoencoderKL")) comp = SD_VAE, known = 1;
	}
	if (f_open(&f, wp) < 0) goto out;
	const char *pre = "base_model.model.";
	for (int i = 0; i < f_count(&f); i++) {
		const char *k = f_name(&f, i);
		static const struct { const char *suf; enum role r; } sfx[] = {
			{".lora_A.weight", R_A}, {".lora_B.weight", R_B},
			{".lora_A.default.weight", R_A}, {".lora_B.default.weight", R_B},
		};
		int done = 0;
		if (starts_with(k, pre)) {
			const char *m = k + strlen(pre);
			for (size_t q = 0; q < sizeof sfx / sizeof sfx[0] && !done; q++)
				if (ends_with(m, sfx[q].suf)) {
					size_t len = strlen(m) - strlen(sfx[q].suf);
					enum sd_component c = known ? comp : guess_component(m);
					if (parts_add(&P, c, m, len, NULL, sfx[q].r, i) < 0) goto out;
					done = 1;
				}
		}
		if (!done) {
			sd_seterr("%s: %s: not a LoRA weight (expected base_model.model.<module>.lora_A.weight or "
			          ".lora_B.weight%s)", wp, k,
			          strstr(k, "lora_embedding") ? "; embedding adapters are not supported"
			          : strstr(k, "lora_magnitude") ? "; DoRA is not supported" : "");
			goto out;
		}
	}
	if (P.n == 0) {
		sd_seterr("%s: no adapter weights", wp);
		goto out;
	}
	rc = make_entries(s, &f, &P, &pc, user);
out:
	parts_free(&P);
	f_close(&f);
	json_decref(pc.j);
	free(cfgp);
	free(wp);
	return rc;
}

/* ---- kohya / A1111 ---- */

static int kohya_key(struct parts *P, const struct file *f, int i)
{
	const char *k = f_name(f, i);
	static const struct { const char *pre; enum sd_component c; } pres[] = {
		{"lora_unet_", SD_UNET}, {"lora_te_", SD_TEXT_ENCODER},
	};
	static const struct { const char *suf; enum role r; } sfx[] = {
		{".lora_down.weight", R_A}, {".lora_up.weight", R_B}, {".alpha", R_ALPHA},
	};
	if (starts_with(k, "lora_te1_") || starts_with(k, "lora_te2_"))
		return sd_seterr("%s: %s: an SDXL adapter (two text encoders): only Stable Diffusion 1.x is supported",
		                 f->path, k);
	for (size_t p = 0; p < sizeof pres / sizeof pres[0]; p++) {
		if (!starts_with(k, pres[p].pre)) continue;
		const char *m = k + strlen(pres[p].pre);
		for (size_t q = 0; q < sizeof sfx / sizeof sfx[0]; q++)
			if (ends_with(m, sfx[q].suf) && strlen(m) > strlen(sfx[q].suf))
				return parts_add(P, pres[p].c, m, strlen(m) - strlen(sfx[q].suf), NULL, sfx[q].r, i);
		if (strstr(m, ".hada_") || strstr(m, ".lokr_") || strstr(m, ".dora_scale") || strstr(m, ".diff"))
			return sd_seterr("%s: %s: a LyCORIS (LoHa/LoKr/DoRA/diff) key: only plain LoRA is supported",
			                 f->path, k);
	}
	return sd_seterr("%s: %s: not a kohya LoRA key (expected lora_unet_… or lora_te_… with .lora_down.weight, "
	                 ".lora_up.weight or .alpha)", f->path, k);
}

/* ---- diffusers ---- */

static int diffusers_key(struct parts *P, const struct file *f, int i)
{
	const char *k = f_name(f, i);
	enum sd_component c;
	const char *m;
	if (starts_with(k, "unet.")) c = SD_UNET, m = k + 5;
	else if (starts_with(k, "text_encoder.")) c = SD_TEXT_ENCODER, m = k + 13;
	else if (starts_with(k, "vae.")) c = SD_VAE, m = k + 4;
	else if (starts_with(k, "text_encoder_2."))
		return sd_seterr("%s: %s: an SDXL adapter (two text encoders): only Stable Diffusion 1.x is supported",
		                 f->path, k);
	else
		return sd_seterr("%s: %s: not a diffusers LoRA key (expected unet.… or text_encoder.…)", f->path, k);
	static const struct { const char *suf; enum role r; } sfx[] = {
		{".lora_A.weight", R_A}, {".lora_B.weight", R_B},
		{".lora.down.weight", R_A}, {".lora.up.weight", R_B},
		{".lora_linear_layer.down.weight", R_A}, {".lora_linear_layer.up.weight", R_B},
		{".alpha", R_ALPHA},
	};
	for (size_t q = 0; q < sizeof sfx / sizeof sfx[0]; q++)
		if (ends_with(m, sfx[q].suf) && strlen(m) > strlen(sfx[q].suf))
			return parts_add(P, c, m, strlen(m) - strlen(sfx[q].suf), NULL, sfx[q].r, i);
	/* attention-processor spellings: <attn>.processor.to_q_lora.down.weight (UNet), and the text
	 * encoder's <self_attn>.to_q_lora.down.weight */
	static const struct { const char *p, *unet, *text; } procs[] = {
		{"to_q_lora", "to_q", "q_proj"}, {"to_k_lora", "to_k", "k_proj"},
		{"to_v_lora", "to_v", "v_proj"}, {"to_out_lora", "to_out.0", "out_proj"},
	};
	for (size_t p = 0; p < sizeof procs / sizeof procs[0]; p++)
		for (int ud = 0; ud < 2; ud++) {
			char suf[64];
			snprintf(suf, sizeof suf, ".%s%s.%s.weight", c == SD_UNET ? "processor." : "", procs[p].p,
			         ud ? "up" : "down");
			if (ends_with(m, suf) && strlen(m) > strlen(suf)) {
				char rep[32];
				snprintf(rep, sizeof rep, ".%s", c == SD_UNET ? procs[p].unet : procs[p].text);
				return parts_add(P, c, m, strlen(m) - strlen(suf), rep, ud ? R_B : R_A, i);
			}
		}
	return sd_seterr("%s: %s: not a LoRA weight (expected <module>.lora_A.weight / .lora_B.weight, "
	                 ".lora.down/.up.weight or .alpha)", f->path, k);
}

/* A single adapter file: kohya or diffusers, told apart by the keys. */
static int add_file(sd_lora *s, const char *path, float user)
{
	struct file f;
	struct parts P = {0};
	if (f_open(&f, path) < 0) return -1;
	int rc = 0, kohya = 0, n = f_count(&f);
	for (int i = 0; i < n && !kohya; i++)
		kohya = starts_with(f_name(&f, i), "lora_unet_") || starts_with(f_name(&f, i), "lora_te");
	if (n == 0) rc = sd_seterr("%s: no tensors: not a LoRA adapter", path);
	for (int i = 0; i < n && rc == 0; i++) {
		const char *k = f_name(&f, i);
		if (!kohya && starts_with(k, "base_model.model."))
			rc = sd_seterr("%s: %s: a PEFT adapter file: give its folder (with adapter_config.json)", path, k);
		else
			rc = kohya ? kohya_key(&P, &f, i) : diffusers_key(&P, &f, i);
	}
	P.flat = kohya;
	if (rc == 0) rc = make_entries(s, &f, &P, NULL, user);
	parts_free(&P);
	f_close(&f);
	return rc;
}

int sd_lora_add(sd_lora *s, const char *path, float scale)
{
	if (!path || !*path) return sd_seterr("LoRA: no path given");
	struct stat st;
	if (stat(path, &st) < 0) return sd_seterr("%s: %s", path, strerror(errno));
	if (!S_ISDIR(st.st_mode)) return add_file(s, path, scale);
	char *p = join(path, "adapter_config.json");
	if (!p) return -1;
	int peft = is_file(p);
	free(p);
	if (peft) return add_peft(s, path, scale);
	/* a parent folder: unet/, text_encoder/, vae/ (each a PEFT folder) */
	int found = 0;
	for (int c = 0; c < SD_COMPONENT_COUNT; c++) {
		char *d = join(path, sd_component_name(c)), *cf = d ? join(d, "adapter_config.json") : NULL;
		int rc = 0;
		if (!cf) rc = -1;
		else if (is_dir(d) && is_file(cf)) {
			found++;
			rc = add_peft(s, d, scale);
		}
		free(cf);
		free(d);
		if (rc < 0) return -1;
	}
	if (found) return 0;
	if (!(p = join(path, "pytorch_lora_weights.safetensors"))) return -1;
	if (is_file(p)) {
		int rc = add_file(s, p, scale);
		free(p);
		return rc;
	}
	free(p);
	return sd_seterr("%s: not a LoRA adapter folder (no adapter_config.json; no unet/, text_encoder/ or vae/ "
	                 "PEFT folder; no pytorch_lora_weights.safetensors)", path);
}

/* ==== applying ==== */

/* The flattened form of a module path ('.' → '_'), into out. */
static void flatten(const char *m, char *out, size_t n)
{
	size_t i = 0;
	for (; m[i] && i + 1 < n; i++) out[i] = m[i] == '.' ? '_' : m[i];
	out[i] = 0;
}

/* The module a kohya name means in w: a weight "<module>.weight" whose diffusers path or LDM path,
 * flattened, is the name.  NULL when none. */
static const char *resolve_flat(const sd_weights *w, const char *flat, char *buf, size_t n)
{
	static const char *const pre[SD_COMPONENT_COUNT] = {
		[SD_TEXT_ENCODER] = "cond_stage_model.transformer.", [SD_VAE] = "first_stage_model.",
		[SD_UNET] = "model.diffusion_model.",
	};
	char f1[512], ldm[512];
	enum sd_component c = sd_weights_component(w);
	for (int i = 0; i < sd_weights_count(w); i++) {
		const char *name = sd_weights_name(w, i);
		if (!ends_with(name, ".weight")) continue;
		size_t len = strlen(name) - 7;
		if (len >= n) continue;
		memcpy(buf, name, len);
		buf[len] = 0;
		flatten(buf, f1, sizeof f1);
		if (!strcmp(f1, flat)) return buf;
		int unsq;
		if (sd_ldm_name(w, name, ldm, sizeof ldm, &unsq) == 1 && starts_with(ldm, pre[c])) {
			size_t l2 = strlen(ldm) - 7;
			ldm[l2] = 0;
			flatten(ldm + strlen(pre[c]), f1, sizeof f1);
			if (!strcmp(f1, flat)) return buf;
			/* kohya's text-encoder names keep transformers' text_model. nesting */
		}
	}
	return NULL;
}

/* A copy of t on dev, owned by s, reshaped to (d0, d1). */
static sd_tensor *dev_copy(sd_lora *s, const sd_tensor *t, enum sd_device dev, int64_t d0, int64_t d1)
{
	sd_tensor *c = sd_tensor_to_device(t, dev);
	if (!c || own(s, c, 1) < 0) return NULL;
	c->ndim = 2;
	c->shape[0] = d0;
	c->shape[1] = d1;
	return c;
}

/* W (O, I) or (O, C, kh, kw) += scale · B (O, r) · A (r, I…) on W's device. */
static int merge_one(sd_lora *s, sd_tensor *W, const struct entry *e)
{
	const int64_t O = W->shape[0], K = sd_tensor_numel(W) / (O ? O : 1), r = e->a->shape[0];
	sd_tensor Wv = *W;
	Wv.ndim = 2;
	Wv.shape[1] = K;
	Wv.owns = 0;
	sd_tensor *A = sd_tensor_to_device(e->a, W->device), *B = A ? sd_tensor_to_device(e->b, W->device) : NULL;
	int rc = -1;
	if (A && B) {
		A->ndim = B->ndim = 2;
		A->shape[1] = K;
		B->shape[0] = O;
		B->shape[1] = r;
		rc = sd_matmul(&Wv, B, A, 0, 0, e->scale, 1.0f);
	}
	sd_tensor_free(A);
	sd_tensor_free(B);
	(void)s;
	return rc;
}

/* Which module a slot can take at run time, found by the model. */
typedef struct slot {
	const sd_tensor **a, **b; /* the UNet's fields */
	float *scale;
	const struct sd_lora_layer **layer; /* CLIP / VAE */
} slot;

typedef int (*find_fn)(void *model, const char *module, slot *out);

static int find_clip(void *model, const char *module, slot *o)
{
	sd_clip_linear *l = sd_clip_find_linear(model, module);
	if (l) o->layer = &l->lora;
	return l != NULL;
}

static int find_vae(void *model, const char *module, slot *o)
{
	sd_vae_conv *l = sd_vae_find_linear(model, module);
	if (l) o->layer = &l->lora;
	return l != NULL;
}

static int find_unet(void *model, const char *module, slot *o)
{
	/* unet.c runs adapters on the attention projections only; the rest is merged */
	if (!strstr(module, ".attn1.") && !strstr(module, ".attn2.")) return 0;
	if (!ends_with(module, ".to_q") && !ends_with(module, ".to_k") && !ends_with(module, ".to_v") &&
	    !ends_with(module, ".to_out.0"))
		return 0;
	sd_unet_linear *l = sd_unet_find_linear(model, module);
	if (!l) return 0;
	o->a = &l->lora_a;
	o->b = &l->lora_b;
	o->scale = &l->lora_scale;
	return 1;
}

struct resolved {
	int e;            /* entry index */
	char module[512]; /* the module's diffusers name */
	sd_tensor *W;
};

static int cmp_res(const void *x, const void *y)
{
	const struct resolved *a = x, *b = y;
	int r = strcmp(a->module, b->module);
	return r ? r : a->e - b->e;
}

/* Resolve and check every entry of w's component; *out (malloc'd) gets them sorted by module. */
static int resolve_all(sd_lora *s, sd_weights *w, struct resolved **out, int *nout)
{
	enum sd_component c = sd_weights_component(w);
	int n = sd_lora_count(s, c), k = 0;
	struct resolved *R = calloc(n ? n : 1, sizeof *R);
	if (!R) return sd_seterr("out of memory");
	char s1[96], s2[96], s3[96];
	for (int i = 0; i < s->n; i++) {
		const struct entry *e = &s->e[i];
		if (e->comp != c) continue;
		struct resolved *r = &R[k++];
		r->e = i;
		const char *mod = e->flat ? resolve_flat(w, e->module, r->module, sizeof r->module) : e->module;
		if (mod && mod != r->module) snprintf(r->module, sizeof r->module, "%s", mod);
		char wn[600];
		snprintf(wn, sizeof wn, "%s.weight", mod ? r->module : "");
		const sd_tensor *W = mod ? sd_weights_get(w, wn) : NULL;
		if (!W) {
			free(R);
			return sd_seterr("%s: %s: the %s has no layer '%s' for this adapter", e->src, e->key,
			                 sd_component_name(c), e->module);
		}
		r->W = (sd_tensor *)W; /* w owns a writable copy (sd_weights_load; widened before a merge) */
		const sd_tensor *A = e->a, *B = e->b;
		int ok;
		if (W->ndim == 2)
			ok = A->shape[1] == W->shape[1] && B->shape[0] == W->shape[0] &&
			     (A->ndim == 2 || (A->shape[2] == 1 && A->shape[3] == 1));
		else if (W->ndim == 4)
			ok = B->shape[0] == W->shape[0] && A->shape[1] == W->shape[1] &&
			     (A->ndim == 4 ? A->shape[2] == W->shape[2] && A->shape[3] == W->shape[3]
			                   : W->shape[2] == 1 && W->shape[3] == 1);
		else
			ok = 0;
		if (!ok || !sd_dtype_is_float(W->dtype)) {
			free(R);
			return sd_seterr("%s: %s: adapter shapes %s (A) and %s (B) do not fit the %s weight '%s' %s", e->src,
			                 e->key, shape_s(A, s1, sizeof s1), shape_s(B, s2, sizeof s2), sd_component_name(c),
			                 wn, shape_s(W, s3, sizeof s3));
		}
	}
	qsort(R, k, sizeof *R, cmp_res);
	*out = R;
	*nout = k;
	return 0;
}

/* Apply: slots where find says so (find NULL: merge everything). */
static int apply(sd_lora *s, sd_weights *w, void *model, find_fn find)
{
	struct resolved *R;
	int n;
	if (resolve_all(s, w, &R, &n) < 0) return -1;
	int rc = 0;
	for (int i = 0; i < n && rc == 0;) {
		int j = i;
		while (j < n && !strcmp(R[j].module, R[i].module)) j++;
		sd_tensor *W = R[i].W;
		slot sl = {0};
		if (W->ndim == 2 && find && find(model, R[i].module, &sl)) {
			const int64_t O = W->shape[0], I = W->shape[1];
			if ((sl.layer && *sl.layer) || (sl.a && *sl.a)) {
				rc = sd_seterr("%s: %s: layer '%s' has an adapter already (give every adapter to one set)",
				               s->e[R[i].e].src, s->e[R[i].e].key, R[i].module);
				break;
			}
			int64_t rank = 0;
			for (int k = i; k < j; k++) rank += s->e[R[k].e].a->shape[0];
			sd_lora_layer *L = calloc(1, sizeof *L);
			if (!L || own(s, L, 0) < 0) {
				rc = sd_seterr("out of memory");
				break;
			}
			if (j - i == 1) { /* one adapter: its own A, B and scale (what a trainer sees) */
				const struct entry *e = &s->e[R[i].e];
				L->a = dev_copy(s, e->a, W->device, rank, I);
				L->b = dev_copy(s, e->b, W->device, O, rank);
				L->scale = e->scale;
			} else { /* stacked along r, each A block scaled */
				sd_tensor *A = sd_tensor_newv(SD_DTYPE_F32, 2, rank, I), *B = sd_tensor_newv(SD_DTYPE_F32, 2, O, rank);
				if (!A || !B) {
					sd_tensor_free(A);
					sd_tensor_free(B);
					rc = -1;
					break;
				}
				float *pa = A->data, *pb = B->data;
				int64_t off = 0;
				for (int k = i; k < j; k++) {
					const struct entry *e = &s->e[R[k].e];
					const int64_t r = e->a->shape[0];
					const float *ea = e->a->data, *eb = e->b->data;
					for (int64_t q = 0; q < r * I; q++) pa[off * I + q] = e->scale * ea[q];
					for (int64_t o = 0; o < O; o++)
						for (int64_t q = 0; q < r; q++) pb[o * rank + off + q] = eb[o * r + q];
					off += r;
				}
				L->a = dev_copy(s, A, W->device, rank, I);
				L->b = dev_copy(s, B, W->device, O, rank);
				L->scale = 1.0f;
				sd_tensor_free(A);
				sd_tensor_free(B);
			}
			if (!L->a || !L->b) {
				rc = -1;
				break;
			}
			if (sl.layer) *sl.layer = L;
			else {
				*sl.a = L->a;
				*sl.b = L->b;
				*sl.scale = L->scale;
			}
		} else {
			/* a weight kept as stored (f16, bf16) becomes f32 to take the sum, as diffusers' fuse_lora */
			if (sd_tensor_widen(W) < 0) rc = sd_preerr("%s: %s", s->e[R[i].e].src, s->e[R[i].e].key);
			for (int k = i; k < j && rc == 0; k++)
				if (merge_one(s, W, &s->e[R[k].e]) < 0)
					rc = sd_preerr("%s: %s", s->e[R[k].e].src, s->e[R[k].e].key);
		}
		i = j;
	}
	free(R);
	return rc;
}

static int check_comp(const sd_weights *w, enum sd_component c, const char *fn)
{
	if (!w || sd_weights_component(w) != c)
		return sd_seterr("%s: the weights are not the %s's", fn, sd_component_name(c));
	return 0;
}

int sd_lora_attach_clip(sd_lora *s, sd_clip *c, sd_weights *w)
{
	if (w && sd_weights_component(w) == SD_TEXT_ENCODER_2) return apply(s, w, c, find_clip);
	if (check_comp(w, SD_TEXT_ENCODER, "sd_lora_attach_clip") < 0) return -1;
	return apply(s, w, c, find_clip);
}

int sd_lora_attach_vae(sd_lora *s, sd_vae *v, sd_weights *w)
{
	if (check_comp(w, SD_VAE, "sd_lora_attach_vae") < 0) return -1;
	return apply(s, w, v, find_vae);
}

int sd_lora_attach_unet(sd_lora *s, sd_unet *u, sd_weights *w)
{
	if (check_comp(w, SD_UNET, "sd_lora_attach_unet") < 0) return -1;
	return apply(s, w, u, find_unet);
}

int sd_lora_merge(sd_lora *s, sd_weights *w)
{
	return apply(s, w, NULL, NULL);
}
