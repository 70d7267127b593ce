/*
 * train/output.c - what a training run writes besides its state: the adapter with kohya's ss_* and our
 * sdpipe_* metadata (what kohya's sd-scripts record, so A1111 and ComfyUI show the recipe), preview
 * images made by the tools themselves, and the checks and default names of the run's files.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "sd.h"

int sd_train_run_write(const sd_train_run *r, const char *path, int peft, int *skipped)
{
	const sd_train_recipe *o = r->rc;
	const sd_train_config *c = &o->cfg;
	char v[16][160];
	const char *meta[40];
	int k = 0;
#define META(key, ...) do { snprintf(v[k / 2], sizeof v[0], __VA_ARGS__); meta[k] = key; meta[k + 1] = v[k / 2]; k += 2; } while (0)
	META("ss_network_module", "networks.lora");
	META("ss_network_dim", "%d", c->rank);
	META("ss_network_alpha", "%g", c->alpha);
	META("ss_learning_rate", "%g", c->optim.lr);
	META("ss_num_train_images", "%d", r->ds->n);
	META("ss_max_train_steps", "%lld", r->total);
	META("ss_seed", "%llu", (unsigned long long)c->seed);
	META("ss_resolution", "(%d, %d)", o->res, o->res);
	META("sdpipe_version", "%s", SD_VERSION);
	META("sdpipe_train", "%s%s%s", c->train & SD_TRAIN_UNET ? "unet," : "", c->train & SD_TRAIN_TEXT ? "text," : "",
	     c->train & SD_TRAIN_VAE ? "vae" : "");
	META("sdpipe_steps", "%lld", r->step);
	META("sdpipe_dataset_hash", "%s", r->hash);
	META("sdpipe_optimizer", "%s lr %g wd %g batch %d accum %d", sd_optim_name(c->optim.kind), c->optim.lr,
	     c->optim.weight_decay, o->batch, o->accum);
	META("sdpipe_recipe", "dropout %g pad %s resize %s flip %d noise_offset %g min_snr %g", c->dropout,
	     o->pad77 ? "77" : "longest", o->resize ? "crop" : "squash", o->flip, o->noise_offset, c->min_snr_gamma);
#undef META
	meta[k] = NULL;
	*skipped = 0;
	if (peft) return sd_lora_write_peft(r->tr, c, path, meta);
	return sd_lora_write_kohya(r->tr, c, path, meta, skipped);
}

/*
 * A preview with the current adapters: they are written to a temporary PEFT folder and the tools run
 * as a shell pipe (txt2img: sd-tokenize | sd-text-encode | sd-noise | sd-unet-step | sd-vae-decode |
 * tensortopng), the tools found next to this program first, then on PATH.  Seed fixed (the run's), so
 * previews of different steps compare.  Sets the environment variables SDLT_*.
 */
int sd_train_run_preview(sd_train_run *r, const char *model, const char *prompt, const char *prefix, int steps,
                         char *out, size_t outsz)
{
	const sd_train_recipe *o = r->rc;
	char dir[] = "/tmp/sd-lora-train-preview-XXXXXX", peft[64], cmd[2048];
	int rc = 0;
	if (!mkdtemp(dir)) return sd_seterr("preview: %s", strerror(errno));
	snprintf(peft, sizeof peft, "%s/a", dir);
	snprintf(out, outsz, "%s-step%lld.png", prefix, r->step);
	sd_trainer_set_training(r->tr, 0);
	if (sd_lora_write_peft(r->tr, &o->cfg, peft, NULL)) {
		rc = sd_preerr("preview");
	} else {
		char self[4096];
		ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
		self[n > 0 ? n : 0] = 0;
		char *sl = strrchr(self, '/');
		if (sl) *sl = 0;
		setenv("SDLT_BIN", n > 0 ? self : ".", 1);
		setenv("SDLT_MODEL", model ? model : (getenv("SD_MODEL") ? getenv("SD_MODEL") : ""), 1);
		setenv("SDLT_PROMPT", prompt ? prompt : r->ds->captions[0], 1);
		setenv("SDLT_LORA", peft, 1);
		setenv("SDLT_OUT", out, 1);
		snprintf(cmd, sizeof cmd,
		         "PATH=\"$SDLT_BIN:$PATH\"; sd-tokenize -m \"$SDLT_MODEL\" -- \"$SDLT_PROMPT\" | "
		         "sd-text-encode -m \"$SDLT_MODEL\" --lora \"$SDLT_LORA\" | "
		         "sd-noise -m \"$SDLT_MODEL\" -W %d -H %d --seed %llu --steps %d - | "
		         "sd-unet-step -m \"$SDLT_MODEL\" --lora \"$SDLT_LORA\" | "
		         "sd-vae-decode -m \"$SDLT_MODEL\" --lora \"$SDLT_LORA\" | tensortopng -o \"$SDLT_OUT\"",
		         o->res, o->res, (unsigned long long)o->cfg.seed, steps);
		int st = system(cmd);
		if (st != 0) rc = sd_seterr("preview at step %lld failed (status %d)", r->step, st);
		/* remove the temporary adapter */
		static const char *const sub[] = {"unet", "text_encoder", "vae"};
		for (int k = 0; k < 3; k++) {
			snprintf(cmd, sizeof cmd, "%s/%s/adapter_config.json", peft, sub[k]);
			unlink(cmd);
			snprintf(cmd, sizeof cmd, "%s/%s/adapter_model.safetensors", peft, sub[k]);
			unlink(cmd);
			snprintf(cmd, sizeof cmd, "%s/%s", peft, sub[k]);
			rmdir(cmd);
		}
		rmdir(peft);
	}
	rmdir(dir);
	sd_trainer_set_training(r->tr, 1);
	return rc;
}

int sd_train_check_dir(const char *path)
{
	char *d = strdup(path);
	if (!d) return sd_seterr("out of memory");
	size_t n = strlen(d);
	while (n > 1 && d[n - 1] == '/') d[--n] = 0;
	char *s = strrchr(d, '/');
	const char *dir = s ? (s == d ? "/" : (*s = 0, d)) : ".";
	struct stat st;
	int rc = 0;
	if (stat(dir, &st) != 0) rc = sd_seterr("%s: %s", dir, strerror(errno));
	else if (!S_ISDIR(st.st_mode)) rc = sd_seterr("%s: not a folder", dir);
	else if (access(dir, W_OK) != 0) rc = sd_seterr("%s: cannot write there: %s", dir, strerror(errno));
	free(d);
	return rc;
}

char *sd_train_path(const char *output, const char *suffix, int strip_ext)
{
	size_t n = strlen(output), ns = strlen(suffix);
	while (n > 1 && output[n - 1] == '/') n--;
	if (strip_ext && n > 12 && !strncmp(output + n - 12, ".safetensors", 12)) n -= 12;
	char *p = malloc(n + ns + 1);
	if (!p) return sd_seterr("out of memory"), NULL;
	snprintf(p, n + ns + 1, "%.*s%s", (int)n, output, suffix);
	return p;
}

int sd_train_is_peft(const char *format, const char *path)
{
	if (format) return !strcmp(format, "peft");
	size_t n = strlen(path);
	struct stat st;
	if (n && path[n - 1] == '/') return 1;
	if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) return 1;
	return 0;
}

FILE *sd_train_log_open(const char *path, int append, int recon)
{
	FILE *f = fopen(path, append ? "a" : "w");
	if (!f) return sd_seterr("%s: %s", path, strerror(errno)), NULL;
	if (!append) fprintf(f, "step\tepoch\tloss\tlr\tgrad_norm\tseconds%s\n", recon ? "\trecon" : "");
	return f;
}

void sd_train_log_step(FILE *f, const sd_train_run *r, const sd_train_step_info *s, double seconds, int recon)
{
	fprintf(f, "%lld\t%lld\t%.9g\t%.6g\t%.6g\t%.3f", r->step, s->epoch, s->loss, s->lr, s->grad_norm, seconds);
	if (recon) fprintf(f, "\t%.9g", s->recon);
	fputc('\n', f);
}

int sd_train_check_adapter(const char *format, const char *path)
{
	if (sd_train_check_dir(path)) return -1;
	return sd_train_check_output(path, sd_train_is_peft(format, path) ? SD_TRAIN_FILE_PEFT : SD_TRAIN_FILE_KOHYA);
}
