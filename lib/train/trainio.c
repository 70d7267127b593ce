/*
 * train/trainio.c - writing a trainer's LoRA adapters: kohya's single file (what A1111, ComfyUI and
 * diffusers' load_lora_weights read: lora_unet_/lora_te_ keys, lora_down/lora_up/alpha) and PEFT's
 * save_pretrained folders (adapter_config.json + adapter_model.safetensors per component, as the study
 * saved unet/, text_encoder/, vae/).  Both are read back by lib/models/lora.c.
 */
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "sd.h"

/* Split a trainer parameter name "unet.<module>.lora_A.weight" into component, module and A/B. */
static int split_name(const char *name, enum sd_component *c, char *module, size_t n, int *is_b)
{
	static const char *const pre[3] = {"text_encoder.", "vae.", "unet."};
	for (int k = 0; k < 3; k++) {
		size_t lp = strlen(pre[k]);
		if (strncmp(name, pre[k], lp)) continue;
		const char *m = name + lp, *s = strstr(m, ".lora_");
		if (!s || (size_t)(s - m) >= n) break;
		memcpy(module, m, s - m);
		module[s - m] = 0;
		*c = (enum sd_component)k;
		*is_b = !strncmp(s, ".lora_B", 7);
		return 0;
	}
	return sd_seterr("trainer parameter '%s' has no component prefix", name);
}

/* CPU copies of the parameters (freed by free_host). */
static sd_tensor **host_params(const sd_trainer *t, int *n)
{
	*n = sd_trainer_param_count(t);
	sd_tensor **h = calloc(*n ? *n : 1, sizeof *h);
	if (!h) return sd_seterr("out of memory"), NULL;
	for (int i = 0; i < *n; i++)
		if (!(h[i] = sd_tensor_to_device(sd_trainer_param((sd_trainer *)t, i), SD_DEVICE_CPU))) {
			for (int j = 0; j < i; j++) sd_tensor_free(h[j]);
			free(h);
			return NULL;
		}
	return h;
}

static void free_host(sd_tensor **h, int n)
{
	if (!h) return;
	for (int i = 0; i < n; i++) sd_tensor_free(h[i]);
	free(h);
}

int sd_lora_write_kohya(const sd_trainer *t, const sd_train_config *c, const char *path, const char *const *meta,
                        int *skipped)
{
	int n, m = 0, rc = -1;
	if (sd_train_check_output(path, SD_TRAIN_FILE_KOHYA)) return -1;
	sd_tensor **h = host_params(t, &n);
	if (!h) return -1;
	char **names = calloc(2 * n + 1, sizeof *names);
	const sd_tensor **ts = calloc(2 * n + 1, sizeof *ts);
	sd_tensor **alphas = calloc(n + 1, sizeof *alphas);
	int na = 0;
	*skipped = 0;
	if (!names || !ts || !alphas) {
		sd_seterr("out of memory");
		goto out;
	}
	for (int i = 0; i < n; i++) {
		enum sd_component comp;
		char mod[400], key[512];
		int is_b;
		if (split_name(sd_trainer_param_name(t, i), &comp, mod, sizeof mod, &is_b)) goto out;
		if (comp == SD_VAE) {
			*skipped += is_b;
			continue;
		}
		for (char *p = mod; *p; p++)
			if (*p == '.') *p = '_';
		const char *pre = comp == SD_UNET ? "lora_unet_" : "lora_te_";
		snprintf(key, sizeof key, "%s%s.%s", pre, mod, is_b ? "lora_up.weight" : "lora_down.weight");
		if (!(names[m] = strdup(key))) goto oom;
		ts[m++] = h[i];
		if (!is_b) {
			snprintf(key, sizeof key, "%s%s.alpha", pre, mod);
			if (!(names[m] = strdup(key)) || !(alphas[na] = sd_tensor_new(SD_DTYPE_F32, 0, NULL))) goto oom;
			*(float *)alphas[na]->data = c->alpha;
			ts[m++] = alphas[na++];
		}
	}
	if (m == 0) {
		sd_seterr("%s: no UNet or text-encoder adapter to write (kohya files cannot hold VAE adapters; use a PEFT "
		          "folder)", path);
		goto out;
	}
	rc = sd_st_write(path, m, (const char *const *)names, ts, meta);
	goto out;
oom:
	sd_seterr("out of memory");
out:
	if (names)
		for (int i = 0; i < m; i++) free(names[i]);
	free(names);
	free(ts);
	if (alphas)
		for (int i = 0; i < na; i++) sd_tensor_free(alphas[i]);
	free(alphas);
	free_host(h, n);
	return rc;
}

/* adapter_config.json as PEFT 0.10's LoraConfig writes it (fields a loader needs, and the usual rest). */
static char *peft_config(const sd_train_config *c, enum sd_component comp, const char *const *targets)
{
	json_t *j = json_object(), *tm = json_array();
	for (int i = 0; targets && targets[i]; i++) json_array_append_new(tm, json_string(targets[i]));
	json_object_set_new(j, "alpha_pattern", json_object());
	json_object_set_new(j, "auto_mapping", json_null());
	json_object_set_new(j, "base_model_name_or_path", json_null());
	json_object_set_new(j, "bias", json_string("none"));
	json_object_set_new(j, "fan_in_fan_out", json_false());
	json_object_set_new(j, "inference_mode", json_true());
	json_object_set_new(j, "init_lora_weights", json_true());
	json_object_set_new(j, "layers_pattern", json_null());
	json_object_set_new(j, "layers_to_transform", json_null());
	json_object_set_new(j, "loftq_config", json_object());
	json_object_set_new(j, "lora_alpha", c->alpha == (int)c->alpha ? json_integer((json_int_t)c->alpha)
	                                                                : json_real(c->alpha));
	json_object_set_new(j, "lora_dropout", json_real(c->dropout));
	json_object_set_new(j, "megatron_config", json_null());
	json_object_set_new(j, "megatron_core", json_string("megatron.core"));
	json_object_set_new(j, "modules_to_save", json_null());
	json_object_set_new(j, "peft_type", json_string("LORA"));
	json_object_set_new(j, "r", json_integer(c->rank));
	json_object_set_new(j, "rank_pattern", json_object());
	json_object_set_new(j, "revision", json_null());
	json_object_set_new(j, "target_modules", tm);
	json_object_set_new(j, "task_type", json_null());
	json_object_set_new(j, "use_dora", json_false());
	json_object_set_new(j, "use_rslora", json_false());
	char *s = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
	json_decref(j);
	(void)comp;
	return s;
}

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *f)
{
	(void)st, (void)flag, (void)f;
	return remove(p);
}

/* ==== what the trainer may replace ==== */

static const char *const peft_sub[3] = {"text_encoder", "vae", "unet"};   /* by enum sd_component */
static const char *const peft_files[2] = {"adapter_config.json", "adapter_model.safetensors"};

/* 1 when path is a .safetensors file whose metadata says sd-lora-train wrote it. */
static int st_is_ours(const char *path)
{
	sd_st *f = sd_st_open(path);
	int ours = f && sd_st_meta(f, "sdpipe_train") != NULL;
	sd_st_close(f);
	return ours;
}

/* 1 when dir (a PEFT component folder) holds nothing but our two files, and the adapter says it is ours. */
static int peft_sub_is_ours(const char *dir)
{
	DIR *d = opendir(dir);
	if (!d) return 0;
	struct dirent *de;
	int ours = 1, has_model = 0;
	while (ours && (de = readdir(d))) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
		if (!strcmp(de->d_name, peft_files[1])) has_model = 1;
		else if (strcmp(de->d_name, peft_files[0])) ours = 0;
	}
	closedir(d);
	if (ours && has_model) {
		char p[4400];
		snprintf(p, sizeof p, "%s/%s", dir, peft_files[1]);
		ours = st_is_ours(p);
	}
	return ours;
}

static int refuse(const char *path, const char *why)
{
	return sd_seterr("%s: %s; sd-lora-train replaces only what it wrote itself (choose another name)", path, why);
}

int sd_train_check_output(const char *path, enum sd_train_file kind)
{
	struct stat st;
	if (lstat(path, &st) != 0) {
		if (errno == ENOENT) return 0;
		return sd_seterr("%s: %s", path, strerror(errno));
	}
	if (kind == SD_TRAIN_FILE_PEFT) {
		if (!S_ISDIR(st.st_mode)) return refuse(path, "exists and is not a folder");
		size_t dl = strlen(path);
		while (dl > 1 && path[dl - 1] == '/') dl--;
		for (int c = 0; c < 3; c++) {
			char p[4200];
			snprintf(p, sizeof p, "%.*s/%s", (int)(dl < 4096 ? dl : 4096), path, peft_sub[c]);
			if (lstat(p, &st) != 0) continue;
			if (!S_ISDIR(st.st_mode) || !peft_sub_is_ours(p))
				return refuse(p, "holds files that sd-lora-train did not write");
		}
		return 0;
	}
	if (!S_ISREG(st.st_mode)) return refuse(path, "exists and is not a regular file");
	int ours = 0;
	if (kind == SD_TRAIN_FILE_KOHYA) {
		ours = st_is_ours(path);
	} else {
		/* the state (msgpack, its first key "format") and the log (a TSV header) say what they are */
		char head[96] = {0};
		FILE *f = fopen(path, "rb");
		size_t n = f ? fread(head, 1, sizeof head - 1, f) : 0;
		if (f) fclose(f);
		if (kind == SD_TRAIN_FILE_STATE) ours = memmem(head, n, "sdpipe-lora-train-state", 23) != NULL;
		else ours = n >= 16 && !memcmp(head, "step\tepoch\tloss\t", 16);
	}
	return ours ? 0 : refuse(path, "exists and was not written by sd-lora-train");
}

/*
 * PEFT folders.  A new dir is built whole in a temporary folder and renamed into place; into an
 * existing one (checked by sd_train_check_output first) only the component folders are written, file
 * by file and each atomically, and a component folder of an earlier run that this one does not train
 * is removed (its two files were ours).  Nothing else in dir is touched: it may hold the training
 * images.
 */
int sd_lora_write_peft(const sd_trainer *t, const sd_train_config *c, const char *dir, const char *const *meta)
{
	static const char *const def[3][5] = {{"q_proj", "v_proj", NULL}, {"to_q", "to_k", "to_v", NULL},
	                                      {"to_q", "to_v", "query", "value", NULL}};
	int n, rc = -1;
	size_t dl = strlen(dir);
	while (dl > 1 && dir[dl - 1] == '/') dl--;
	char tmp[4200], p[4400], top[4096];
	if (dl + 64 > sizeof top) return sd_seterr("%s: path too long", dir);
	snprintf(top, sizeof top, "%.*s", (int)dl, dir);
	if (sd_train_check_output(top, SD_TRAIN_FILE_PEFT)) return -1;
	struct stat st;
	int exists = stat(top, &st) == 0;
	sd_tensor **h = host_params(t, &n);
	if (!h) return -1;
	if (exists) {
		snprintf(tmp, sizeof tmp, "%s", top);
	} else {
		snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", top);
		if (!mkdtemp(tmp)) {
			sd_seterr("%s: cannot create a temporary folder next to it: %s", top, strerror(errno));
			free_host(h, n);
			return -1;
		}
	}
	char **names = calloc(n + 1, sizeof *names);
	const sd_tensor **ts = calloc(n + 1, sizeof *ts);
	if (!names || !ts) {
		sd_seterr("out of memory");
		goto fail;
	}
	for (int comp = 0; comp < 3; comp++) {
		int m = 0;
		for (int i = 0; i < n; i++) {
			enum sd_component cc;
			char mod[400], key[512];
			int is_b;
			if (split_name(sd_trainer_param_name(t, i), &cc, mod, sizeof mod, &is_b)) goto fail;
			if ((int)cc != comp) continue;
			snprintf(key, sizeof key, "base_model.model.%s.%s.weight", mod, is_b ? "lora_B" : "lora_A");
			if (!(names[m] = strdup(key))) {
				sd_seterr("out of memory");
				goto fail;
			}
			ts[m++] = h[i];
		}
		snprintf(p, sizeof p, "%s/%s", tmp, peft_sub[comp]);
		if (m == 0) {
			/* an earlier run's adapter for a component not trained now (checked to be ours) */
			if (exists && stat(p, &st) == 0) {
				for (int k = 0; k < 2; k++) {
					char q[4500];
					snprintf(q, sizeof q, "%s/%s", p, peft_files[k]);
					if (unlink(q) && errno != ENOENT) {
						sd_seterr("%s: %s", q, strerror(errno));
						goto fail;
					}
				}
				if (rmdir(p)) {
					sd_seterr("%s: %s", p, strerror(errno));
					goto fail;
				}
			}
			continue;
		}
		if (mkdir(p, 0777) && errno != EEXIST) {
			sd_seterr("%s: %s", p, strerror(errno));
			goto fail;
		}
		const char *const *tg = c->targets[comp] ? c->targets[comp] : def[comp];
		char *js = peft_config(c, (enum sd_component)comp, tg);
		snprintf(p, sizeof p, "%s/%s/%s", tmp, peft_sub[comp], peft_files[0]);
		int wr = js ? sd_write_file_atomic(p, js, strlen(js)) : sd_seterr("out of memory");
		free(js);
		if (wr) goto fail;
		snprintf(p, sizeof p, "%s/%s/%s", tmp, peft_sub[comp], peft_files[1]);
		wr = sd_st_write(p, m, (const char *const *)names, ts, meta);
		for (int i = 0; i < m; i++) free(names[i]), names[i] = NULL;
		if (wr) goto fail;
	}
	if (!exists && rename(tmp, top)) {
		sd_seterr("%s: %s", top, strerror(errno));
		goto fail;
	}
	rc = 0;
	goto out;
fail:
	if (!exists) nftw(tmp, rm_one, 16, FTW_DEPTH | FTW_PHYS);
out:
	if (names)
		for (int i = 0; i < n; i++) free(names[i]);
	free(names);
	free(ts);
	free_host(h, n);
	return rc;
}
