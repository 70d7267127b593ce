/*
 * sd-lora-train - few-shot style LoRA training (see sd-lora-train(1)): the study's recipe (diffusers'
 * train_text_to_image_lora.py with PEFT adapters on the UNet, the text encoder and the VAE) by default.
 * A sink: reads a folder, an archive or a stream of images, writes a kohya file or PEFT folders.
 *
 *   sd-lora-train -m sd15 --caption "A photo of in the style of **" -o style.safetensors images/
 *
 * The work lives in libsd (lib/train/): this file draws the batches (shuffle, noise, timesteps), runs
 * the steps, logs, saves and resumes.
 */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sd.h"
#include "sd_cli.h"

struct opts {
	const char *model, *config, *device, *output, *format, *caption, *log, *resume, *state;
	const char *outputs[4];
	int nout;
	const char *train, *sched, *sample_prompt, *sample_prefix;
	int sample_every, sample_steps;
	int res, resize, flip, batch, epochs, accum, warmup, pad77, save_every, eval;
	long long max_steps;
	double noise_offset, vae_recon;
	uint64_t seed;
	sd_train_config cfg;
	char **targets[3];
};

static void usage(void)
{
	printf("Usage: %s [OPTION]... -o OUTPUT DATA\n"
	       "Train a LoRA adapter on the images of DATA: a folder or an archive (tar, tar.gz, zip) of PNG, JPEG\n"
	       "or PNM images with optional same-name .txt captions, or - for a tensor stream of \"image\" (+ \"prompt\")\n"
	       "frames on standard input.  The defaults are the study's recipe (see sd-lora-train(1)).\n"
	       "\n"
	       "  -m, --model PATH        diffusers folder, single-file .safetensors or .ckpt (default $SD_MODEL)\n"
	       "      --config DIR        diffusers folder whose configs describe a single-file model\n"
	       "      --device DEV        cpu, cuda or auto (default $SD_DEVICE, else auto)\n"
	       "  -o, --output PATH       FILE.safetensors: kohya format; DIR/: PEFT folders unet/ text_encoder/ vae/\n"
	       "                          (repeatable: the same adapter in several places or formats)\n"
	       "      --format F          kohya or peft (default: from OUTPUT)\n"
	       "      --caption TEXT      the caption of every image (default: the .txt files, or the frames' prompt)\n"
	       "      --resolution N      train at NxN pixels (default: the model's own size, 512 for SD 1.x)\n"
	       "      --resize MODE       squash (default, the study's) or crop\n"
	       "      --flip              flip each image horizontally with probability 1/2\n"
	       "      --train LIST        components to train: unet,text,vae (default all three)\n"
	       "      --targets C=M,M...  LoRA target modules of component C (unet, text, vae); repeatable\n"
	       "      --rank R            LoRA rank (default 8)\n"
	       "      --alpha A           LoRA alpha (default 16; scale alpha/rank)\n"
	       "      --dropout P         LoRA dropout (default 0.05)\n"
	       "      --batch N           images per batch (default 4)\n"
	       "      --epochs N          passes over the data set (default 100)\n"
	       "      --max-steps N       stop after N optimizer steps (default: epochs)\n"
	       "      --lr LR             learning rate (default 1e-4)\n"
	       "      --optimizer NAME    adam (default) or adamw\n"
	       "      --weight-decay WD   (default 0)\n"
	       "      --lr-warmup N       linear warm-up over N steps (default 0)\n"
	       "      --lr-schedule S     constant (default) or cosine\n"
	       "      --grad-accum N      micro-batches per optimizer step (default 1)\n"
	       "      --max-grad-norm X   clip the gradient norm to X (default: no clipping)\n"
	       "      --min-snr-gamma G   min-SNR-gamma loss weights (default: none)\n"
	       "      --noise-offset X    add X times per-channel noise (default 0)\n"
	       "      --pad-tokens P      77 or longest (default longest, the study's)\n"
	       "      --v-prediction      train on the v target\n"
	       "      --checkpointing     recompute UNet blocks in the backward (less memory)\n"
	       "      --seed S            seed of every random draw (default 0)\n"
	       "      --eval              report the loss on a fixed batch before and after training\n"
	       "      --log FILE          write step, epoch, loss, lr, grad_norm, seconds as TSV\n"
	       "      --state FILE        training state file (default OUTPUT.state)\n"
	       "      --save-every N      save the training state and the adapter every N steps\n"
	       "      --resume FILE       continue from a saved training state\n"
	       "      --sample-every N    write a preview image every N steps (and at the end)\n"
	       "      --sample-prompt T   the previews' prompt (default: the first caption)\n"
	       "      --sample-steps N    sampler steps of a preview (default 20)\n"
	       "      --sample-prefix P   previews go to P-stepN.png (default OUTPUT-sample)\n"
	       "      --vae-recon-weight W  train the decoder-side VAE LoRA on W * MSE(decode(z), image)\n"
	       "                          (needs vae in --train; default 0: the decoder adapter stays zero)\n"
	       "  -v, --verbose           report the set-up on standard error\n"
	       "  -h, --help              display this help and exit\n"
	       "      --version           output version information and exit\n"
	       "\n"
	       "Example: %s -m sd15 --caption 'A photo of in the style of **' -o style.safetensors images/\n",
	       sd_prog, sd_prog);
	exit(0);
}

static volatile sig_atomic_t stop_signal;
static void on_signal(int s) { stop_signal = s; }

/* "a,b,c" → NULL-terminated malloc'd array. */
static char **split_list(const char *s)
{
	int n = 1;
	for (const char *p = s; *p; p++) n += *p == ',';
	char **v = calloc(n + 1, sizeof *v), *d = strdup(s);
	if (!v || !d) sd_die("out of memory");
	int k = 0;
	for (char *tok = strtok(d, ","); tok; tok = strtok(NULL, ","))
		if (*tok) v[k++] = tok;
	return v;
}

static int parse_train(const char *s)
{
	int f = 0;
	char **v = split_list(s);
	for (int i = 0; v[i]; i++) {
		if (!strcmp(v[i], "unet")) f |= SD_TRAIN_UNET;
		else if (!strcmp(v[i], "text") || !strcmp(v[i], "text_encoder")) f |= SD_TRAIN_TEXT;
		else if (!strcmp(v[i], "vae")) f |= SD_TRAIN_VAE;
		else sd_usage_error("--train: '%s' is not unet, text or vae", v[i]);
	}
	if (!f) sd_usage_error("--train: no component given");
	free(v[0]);
	free(v);
	return f;
}

static void parse_targets(struct opts *o, const char *s)
{
	const char *eq = strchr(s, '=');
	if (!eq || !eq[1]) sd_usage_error("--targets: '%s' is not COMPONENT=MODULE,MODULE...", s);
	size_t n = eq - s;
	int c = !strncmp(s, "unet", n) && n == 4 ? SD_UNET
	        : (n == 4 && !strncmp(s, "text", 4)) || (n == 12 && !strncmp(s, "text_encoder", 12)) ? SD_TEXT_ENCODER
	        : n == 3 && !strncmp(s, "vae", 3) ? SD_VAE : -1;
	if (c < 0) sd_usage_error("--targets: '%.*s' is not unet, text or vae", (int)n, s);
	o->targets[c] = split_list(eq + 1);
	o->cfg.targets[c] = (const char *const *)o->targets[c];
}

/* ==== the run ==== */

struct run {
	struct opts *o;
	sd_dataset *ds;
	sd_tokenizer *tok;
	sd_trainer *tr;
	sd_rng rng;          /* noise, timesteps, posterior samples, flips */
	int nt, lh, lw, lc;  /* training timesteps; latent size */
	float sf;
	sd_tensor **mean, **std; /* cached posterior per image (and flipped, at n + i) when the VAE is frozen */
	char hash[17];
	long long step, total;
};

/* input_ids (N, L) for the captions of idx[0..N), padded to 77 or the longest. */
static sd_tensor *make_ids(struct run *r, const int *idx, int N)
{
	int32_t *all = malloc((size_t)N * 77 * sizeof *all);
	int L = 0;
	if (!all) sd_die("out of memory");
	for (int i = 0; i < N; i++) {
		const char *cap = r->o->caption ? r->o->caption : r->ds->captions[idx[i]];
		int un;
		if (sd_tokenize_padded(r->tok, cap, strlen(cap), all + i * 77, 77, SD_CLIP_EOS, &un))
			sd_die_lib("%s: caption", r->ds->names[idx[i]]);
		if (un > 77) un = 77;
		if (un > L) L = un;
	}
	if (r->o->pad77) L = 77;
	sd_tensor *t = sd_tensor_newv(SD_DTYPE_I32, 2, (int64_t)N, (int64_t)L);
	if (!t) sd_die_lib("input_ids");
	for (int i = 0; i < N; i++) memcpy((int32_t *)t->data + i * L, all + i * 77, L * sizeof(int32_t));
	free(all);
	return t;
}

/* The tensors of one batch; freed by batch_free. */
struct batch {
	sd_train_batch b;
	sd_tensor *px, *eps, *noise, *lat, *ids;
	int64_t ts[256];
};

static void batch_free(struct batch *B)
{
	sd_tensor_free(B->px), sd_tensor_free(B->eps), sd_tensor_free(B->noise), sd_tensor_free(B->lat);
	sd_tensor_free(B->ids);
}

/* Build a batch of images idx[0..N) with draws from rng: flips (--flip), the posterior's eps, the
 * noise (+ offset), the timesteps (fixed_t: evenly spread, for the evaluation batch). */
static void make_batch(struct run *r, struct batch *B, const int *idx, int N, sd_rng *rng, int fixed_t)
{
	memset(B, 0, sizeof *B);
	int res = r->ds->res;
	int flips[256] = {0};
	if (r->o->flip && !fixed_t) {
		float u[256];
		sd_rng_rand(rng, u, N);
		for (int i = 0; i < N; i++) flips[i] = u[i] < 0.5f;
	}
	int64_t per = (int64_t)r->lc * r->lh * r->lw;
	B->eps = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)N, (int64_t)r->lc, (int64_t)r->lh, (int64_t)r->lw);
	B->noise = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)N, (int64_t)r->lc, (int64_t)r->lh, (int64_t)r->lw);
	if (!B->eps || !B->noise) sd_die_lib("batch");
	sd_rng_randn(rng, B->eps->data, N * per);
	sd_rng_randn(rng, B->noise->data, N * per);
	if (r->o->noise_offset > 0 && !fixed_t) {
		float off[1024];
		sd_rng_randn(rng, off, (int64_t)N * r->lc);
		float *z = B->noise->data;
		for (int i = 0; i < N; i++)
			for (int c = 0; c < r->lc; c++)
				for (int64_t k = 0; k < (int64_t)r->lh * r->lw; k++)
					z[(i * r->lc + c) * r->lh * r->lw + k] += (float)r->o->noise_offset * off[i * r->lc + c];
	}
	if (fixed_t) {
		for (int i = 0; i < N; i++) B->ts[i] = (int64_t)((2 * i + 1) * (int64_t)r->nt / (2 * N));
	} else if (sd_rng_randint(rng, 0, r->nt, B->ts, N)) {
		sd_die_lib("timesteps");
	}
	if (r->mean) {
		B->lat = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)N, (int64_t)r->lc, (int64_t)r->lh, (int64_t)r->lw);
		if (!B->lat) sd_die_lib("batch");
		float *l = B->lat->data, *e = B->eps->data;
		for (int i = 0; i < N; i++) {
			int k = idx[i] + (flips[i] ? r->ds->n : 0);
			const float *m = r->mean[k]->data, *s = r->std[k]->data;
			for (int64_t j = 0; j < per; j++) l[i * per + j] = r->sf * (m[j] + s[j] * e[i * per + j]);
		}
		B->b.latents = B->lat;
	} else {
		B->px = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)N, (int64_t)3, (int64_t)res, (int64_t)res);
		if (!B->px) sd_die_lib("batch");
		int64_t pp = 3 * (int64_t)res * res;
		for (int i = 0; i < N; i++) {
			const float *src = r->ds->pixels[idx[i]]->data;
			float *dst = (float *)B->px->data + i * pp;
			if (!flips[i]) {
				memcpy(dst, src, pp * sizeof(float));
			} else {
				for (int64_t y = 0; y < 3 * (int64_t)res; y++)
					for (int x = 0; x < res; x++) dst[y * res + x] = src[y * res + res - 1 - x];
			}
		}
		B->b.pixels = B->px;
		B->b.eps_posterior = B->eps;
	}
	B->ids = make_ids(r, idx, N);
	B->b.input_ids = B->ids;
	B->b.timesteps = B->ts;
	B->b.noise = B->noise;
}

/* The order of the images in epoch e: a Fisher-Yates shuffle from its own generator (seed, e), so a
 * resumed run needs no saved permutation. */
static void epoch_order(struct run *r, long long e, int *perm)
{
	sd_rng g;
	sd_rng_seed(&g, r->o->seed * 1000003ULL + (uint64_t)e + 1);
	int n = r->ds->n;
	for (int i = 0; i < n; i++) perm[i] = i;
	for (int i = n - 1; i > 0; i--) {
		int j = (int)(sd_rng_u64(&g) % (uint64_t)(i + 1));
		int t = perm[i];
		perm[i] = perm[j], perm[j] = t;
	}
}

/* Loss on the fixed evaluation batch (the first images, seed-fixed noise, evenly spread timesteps),
 * without dropout and without touching the training state. */
static double eval_loss(struct run *r)
{
	int N = r->ds->n < r->o->batch ? r->ds->n : r->o->batch, idx[256];
	for (int i = 0; i < N; i++) idx[i] = i;
	sd_rng g;
	sd_rng_seed(&g, 0x5eedULL);
	struct batch B;
	make_batch(r, &B, idx, N, &g, 1);
	uint64_t micro = sd_trainer_micro(r->tr);
	double loss;
	sd_trainer_set_training(r->tr, 0);
	if (sd_trainer_accumulate(r->tr, &B.b, 0.0f, &loss)) sd_die_lib("evaluation batch");
	sd_trainer_set_training(r->tr, 1);
	sd_trainer_set_micro(r->tr, micro);
	sd_trainer_zero_grad(r->tr);
	batch_free(&B);
	return loss;
}

/* ==== training state (--save-every, --resume, signals, NaN) ==== */

static int save_state(struct run *r, const char *path, long long step, uint64_t micro, const sd_rng *rng)
{
	sd_value *f = sd_value_map(), *params = sd_value_map();
	if (!f || !params) return sd_seterr("out of memory");
	sd_map_set_str(f, "format", "sdpipe-lora-train-state");
	sd_map_set_int(f, "version", 1);
	sd_map_set_int(f, "step", step);
	sd_map_set_int(f, "micro", (int64_t)micro);
	sd_map_set_str(f, "dataset_hash", r->hash);
	sd_map_set_int(f, "seed", (int64_t)r->o->seed);
	sd_map_set(f, "rng", sd_rng_to_value(rng));
	for (int i = 0; i < sd_trainer_param_count(r->tr); i++) {
		sd_tensor *h = sd_tensor_to_device(sd_trainer_param(r->tr, i), SD_DEVICE_CPU);
		if (!h || sd_map_set_tensor(params, sd_trainer_param_name(r->tr, i), h)) {
			sd_value_free(params);
			sd_value_free(f);
			return -1;
		}
	}
	sd_map_set(f, "params", params);
	sd_value *ov = sd_optim_to_value(sd_trainer_optim(r->tr));
	if (!ov || sd_map_set(f, "optim", ov)) {
		sd_value_free(f);
		return -1;
	}
	char *buf;
	size_t len;
	int rc = sd_frame_pack(f, &buf, &len);
	sd_value_free(f);
	if (rc) return -1;
	rc = sd_write_file_atomic(path, buf, len);
	free(buf);
	return rc;
}

static void load_state(struct run *r, const char *path, uint64_t *micro)
{
	size_t len;
	char *buf = sd_read_file(path, (size_t)4 << 30, &len);
	sd_value *f;
	if (!buf) sd_die("--resume: %s", sd_errmsg());
	if (sd_frame_unpack(buf, len, &f)) sd_die("--resume: %s: %s", path, sd_errmsg());
	free(buf);
	const char *fmt = sd_map_str(f, "format"), *h = sd_map_str(f, "dataset_hash");
	int64_t step, mi, seed;
	if (!fmt || strcmp(fmt, "sdpipe-lora-train-state") || sd_map_get_int(f, "step", &step) ||
	    sd_map_get_int(f, "micro", &mi) || sd_map_get_int(f, "seed", &seed))
		sd_die("--resume: %s: not an sd-lora-train state file", path);
	if (!h || strcmp(h, r->hash)) sd_die("--resume: %s: saved for another data set (hash %s, now %s)", path, h ? h : "?", r->hash);
	if ((uint64_t)seed != r->o->seed) sd_die("--resume: %s: saved with --seed %lld, not %llu", path, (long long)seed,
	                                         (unsigned long long)r->o->seed);
	const sd_value *params = sd_map_get(f, "params");
	for (int i = 0; i < sd_trainer_param_count(r->tr); i++) {
		const char *n = sd_trainer_param_name(r->tr, i);
		const sd_tensor *t = params ? sd_map_tensor(params, n) : NULL;
		if (!t || !sd_tensor_same_shape(t, sd_trainer_param(r->tr, i)))
			sd_die("--resume: %s: %s is missing or of another shape (other --train/--targets/--rank?)", path, n);
		if (sd_tensor_copy(sd_trainer_param(r->tr, i), t)) sd_die_lib("--resume: %s", path);
	}
	if (params && (int)params->u.m.n != sd_trainer_param_count(r->tr))
		sd_die("--resume: %s: holds %d parameters, this run has %d", path, (int)params->u.m.n,
		       sd_trainer_param_count(r->tr));
	if (sd_optim_from_value(sd_trainer_optim(r->tr), sd_map_get(f, "optim"))) sd_die("--resume: %s: %s", path, sd_errmsg());
	if (sd_rng_from_value(&r->rng, sd_map_get(f, "rng"))) sd_die("--resume: %s: %s", path, sd_errmsg());
	r->step = step;
	*micro = (uint64_t)mi;
	sd_value_free(f);
}

/* ==== output ==== */

static int is_peft(const struct opts *o, const char *out)
{
	if (o->format) return !strcmp(o->format, "peft");
	size_t n = strlen(out);
	struct stat st;
	if (n && out[n - 1] == '/') return 1;
	if (stat(out, &st) == 0 && S_ISDIR(st.st_mode)) return 1;
	return 0;
}

/* Fail early (before training) when OUTPUT's folder cannot be written. */
static void check_writable(const char *path, const char *what)
{
	char *d = strdup(path);
	if (!d) sd_die("out of memory");
	size_t n = strlen(d);
	while (n > 1 && d[n - 1] == '/') d[--n] = 0;
	char *s = strrchr(d, '/');
	const char *dir = s ? (s == d ? "/" : (*s = 0, d)) : ".";
	struct stat st;
	if (stat(dir, &st) != 0) sd_die("%s: %s: %s", what, dir, strerror(errno));
	if (!S_ISDIR(st.st_mode)) sd_die("%s: %s: not a folder", what, dir);
	if (access(dir, W_OK) != 0) sd_die("%s: %s: cannot write there: %s", what, dir, strerror(errno));
	free(d);
}

static void write_output(struct run *r)
{
	struct opts *o = r->o;
	static char v[16][160];
	const char *meta[40];
	int k = 0;
#define META(key, ...) do { snprintf(v[k / 2], sizeof v[0], __VA_ARGS__); meta[k] = key; meta[k + 1] = v[k / 2]; k += 2; } while (0)
	META("ss_network_module", "networks.lora");
	META("ss_network_dim", "%d", o->cfg.rank);
	META("ss_network_alpha", "%g", o->cfg.alpha);
	META("ss_learning_rate", "%g", o->cfg.optim.lr);
	META("ss_num_train_images", "%d", r->ds->n);
	META("ss_max_train_steps", "%lld", r->total);
	META("ss_seed", "%llu", (unsigned long long)o->seed);
	META("ss_resolution", "(%d, %d)", o->res, o->res);
	META("sdpipe_version", "%s", SD_VERSION);
	META("sdpipe_train", "%s%s%s", o->cfg.train & SD_TRAIN_UNET ? "unet," : "", o->cfg.train & SD_TRAIN_TEXT ? "text," : "",
	     o->cfg.train & SD_TRAIN_VAE ? "vae" : "");
	META("sdpipe_steps", "%lld", r->step);
	META("sdpipe_dataset_hash", "%s", r->hash);
	META("sdpipe_optimizer", "%s lr %g wd %g batch %d accum %d", sd_optim_name(o->cfg.optim.kind), o->cfg.optim.lr,
	     o->cfg.optim.weight_decay, o->batch, o->accum);
	META("sdpipe_recipe", "dropout %g pad %s resize %s flip %d noise_offset %g min_snr %g", o->cfg.dropout,
	     o->pad77 ? "77" : "longest", o->resize ? "crop" : "squash", o->flip, o->noise_offset, o->cfg.min_snr_gamma);
#undef META
	meta[k] = NULL;
	(void)v;
	for (int i = 0; i < o->nout; i++) {
		const char *out = o->outputs[i];
		if (is_peft(o, out)) {
			if (sd_lora_write_peft(r->tr, &o->cfg, out, meta)) sd_die("%s", sd_errmsg());
		} else {
			int skipped;
			if (sd_lora_write_kohya(r->tr, &o->cfg, out, meta, &skipped)) sd_die("%s", sd_errmsg());
			static int warned; /* once, not at every --save-every */
			if (skipped && !warned++) sd_warn("%s: the %d VAE adapters are not in the kohya file (no kohya spelling); use a PEFT "
			                     "folder (-o DIR/) to keep them", out, skipped);
		}
		sd_info("wrote %s after %lld steps", out, r->step);
	}
}

/* A failure of the training step: an allocation that cannot succeed says what to lower. */
static void die_step(const struct run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void die_step(const struct run *r, const char *fmt, ...)
{
	char where[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(where, sizeof where, fmt, ap);
	va_end(ap);
	const char *e = sd_errmsg();
	if (strstr(e, "out of memory"))
		sd_die("%s: %s; lower --resolution (now %d) or --batch (now %d)%s", where, e, r->o->res, r->o->batch,
		       r->o->cfg.checkpointing ? "" : ", or add --checkpointing");
	sd_die("%s: %s", where, e);
}

/* ==== previews ==== */

/*
 * A preview with the current adapters: they are written to a temporary PEFT folder and the tools run
 * as a shell pipe (txt2img: sd-tokenize | sd-text-encode | sd-noise | sd-unet-step | sd-vae-decode |
 * tensortopng), the tools found next to this program first, then on PATH.  Seed fixed (--seed), so
 * previews of different steps compare.  A failing preview is a warning, not the end of the run.
 */
static void preview(struct run *r, const char *model, const char *prompt)
{
	struct opts *o = r->o;
	char dir[] = "/tmp/sd-lora-train-preview-XXXXXX", peft[64], out[4096], cmd[2048];
	if (!mkdtemp(dir)) {
		sd_warn("preview: %s", strerror(errno));
		return;
	}
	snprintf(peft, sizeof peft, "%s/a", dir);
	snprintf(out, sizeof out, "%s-step%lld.png", o->sample_prefix, r->step);
	if (sd_lora_write_peft(r->tr, &o->cfg, peft, NULL)) {
		sd_warn("preview: %s", sd_errmsg());
	} else {
		char self[4096];
		ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
		self[n > 0 ? n : 0] = 0;
		char *sl = strrchr(self, '/');
		if (sl) *sl = 0;
		setenv("SDLT_BIN", n > 0 ? self : ".", 1);
		setenv("SDLT_MODEL", model ? model : (getenv("SD_MODEL") ? getenv("SD_MODEL") : ""), 1);
		setenv("SDLT_PROMPT", prompt, 1);
		setenv("SDLT_LORA", peft, 1);
		setenv("SDLT_OUT", out, 1);
		snprintf(cmd, sizeof cmd,
		         "PATH=\"$SDLT_BIN:$PATH\"; sd-tokenize -m \"$SDLT_MODEL\" -- \"$SDLT_PROMPT\" | "
		         "sd-text-encode -m \"$SDLT_MODEL\" --lora \"$SDLT_LORA\" | "
		         "sd-noise -m \"$SDLT_MODEL\" -W %d -H %d --seed %llu --steps %d - | "
		         "sd-unet-step -m \"$SDLT_MODEL\" --lora \"$SDLT_LORA\" | "
		         "sd-vae-decode -m \"$SDLT_MODEL\" --lora \"$SDLT_LORA\" | tensortopng -o \"$SDLT_OUT\"",
		         o->res, o->res, (unsigned long long)o->seed, o->sample_steps);
		int rc = system(cmd);
		if (rc != 0) {
			sd_warn("preview at step %lld failed (status %d)", r->step, rc);
		} else {
			sd_info("preview: %s", out);
		}
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
}

/* ==== main ==== */

int main(int argc, char **argv)
{
	enum { O_CONFIG = 256, O_DEVICE, O_FORMAT, O_CAPTION, O_RES, O_RESIZE, O_FLIP, O_TRAIN, O_TARGETS, O_RANK,
	       O_ALPHA, O_DROPOUT, O_BATCH, O_EPOCHS, O_MAXSTEPS, O_LR, O_OPTIM, O_WD, O_WARMUP, O_SCHED, O_ACCUM,
	       O_MAXNORM, O_SNR, O_OFFSET, O_PAD, O_VPRED, O_CKPT, O_SEED, O_EVAL, O_LOG, O_STATE, O_SAVE, O_RESUME,
	       O_RECON, O_SEVERY, O_SPROMPT, O_SSTEPS, O_SPREFIX, O_VERSION };
	static const struct option longopts[] = {
		{"model", required_argument, NULL, 'm'}, {"config", required_argument, NULL, O_CONFIG},
		{"device", required_argument, NULL, O_DEVICE}, {"output", required_argument, NULL, 'o'},
		{"format", required_argument, NULL, O_FORMAT}, {"caption", required_argument, NULL, O_CAPTION},
		{"resolution", required_argument, NULL, O_RES}, {"resize", required_argument, NULL, O_RESIZE},
		{"flip", no_argument, NULL, O_FLIP}, {"train", required_argument, NULL, O_TRAIN},
		{"targets", required_argument, NULL, O_TARGETS}, {"rank", required_argument, NULL, O_RANK},
		{"alpha", required_argument, NULL, O_ALPHA}, {"dropout", required_argument, NULL, O_DROPOUT},
		{"batch", required_argument, NULL, O_BATCH}, {"epochs", required_argument, NULL, O_EPOCHS},
		{"max-steps", required_argument, NULL, O_MAXSTEPS}, {"lr", required_argument, NULL, O_LR},
		{"optimizer", required_argument, NULL, O_OPTIM}, {"weight-decay", required_argument, NULL, O_WD},
		{"lr-warmup", required_argument, NULL, O_WARMUP}, {"lr-schedule", required_argument, NULL, O_SCHED},
		{"grad-accum", required_argument, NULL, O_ACCUM}, {"max-grad-norm", required_argument, NULL, O_MAXNORM},
		{"min-snr-gamma", required_argument, NULL, O_SNR}, {"noise-offset", required_argument, NULL, O_OFFSET},
		{"pad-tokens", required_argument, NULL, O_PAD}, {"v-prediction", no_argument, NULL, O_VPRED},
		{"checkpointing", no_argument, NULL, O_CKPT}, {"seed", required_argument, NULL, O_SEED},
		{"eval", no_argument, NULL, O_EVAL}, {"log", required_argument, NULL, O_LOG},
		{"state", required_argument, NULL, O_STATE}, {"save-every", required_argument, NULL, O_SAVE},
		{"resume", required_argument, NULL, O_RESUME}, {"vae-recon-weight", required_argument, NULL, O_RECON},
		{"sample-every", required_argument, NULL, O_SEVERY}, {"sample-prompt", required_argument, NULL, O_SPROMPT},
		{"sample-steps", required_argument, NULL, O_SSTEPS}, {"sample-prefix", required_argument, NULL, O_SPREFIX},
		{"verbose", no_argument, NULL, 'v'}, {"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, O_VERSION}, {NULL, 0, NULL, 0},
	};
	static struct opts o;
	static struct run r;
	int c;
	double wd = -1;

	sd_cli_init_compute(argc, argv);
	sd_train_defaults(&o.cfg);
	o.res = 0, o.batch = 4, o.epochs = 100, o.accum = 1;
	o.sched = "constant";
	o.sample_steps = 20;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":m:o:vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'm': o.model = optarg; break;
		case O_CONFIG: o.config = optarg; break;
		case O_DEVICE: o.device = optarg; break;
		case 'o':
			if (o.nout == 4) sd_usage_error("-o: at most 4 outputs");
			o.outputs[o.nout++] = optarg;
			if (!o.output) o.output = optarg;
			break;
		case O_FORMAT:
			if (strcmp(optarg, "kohya") && strcmp(optarg, "peft")) sd_usage_error("--format: '%s' is not kohya or peft", optarg);
			o.format = optarg;
			break;
		case O_CAPTION: o.caption = optarg; break;
		case O_RES: o.res = (int)sd_parse_int("--resolution", optarg, 8, 4096); break;
		case O_RESIZE:
			if (!strcmp(optarg, "squash")) o.resize = SD_RESIZE_SQUASH;
			else if (!strcmp(optarg, "crop")) o.resize = SD_RESIZE_CROP;
			else sd_usage_error("--resize: '%s' is not squash or crop", optarg);
			break;
		case O_FLIP: o.flip = 1; break;
		case O_TRAIN: o.cfg.train = parse_train(optarg); break;
		case O_TARGETS: parse_targets(&o, optarg); break;
		case O_RANK: o.cfg.rank = (int)sd_parse_int("--rank", optarg, 1, 1024); break;
		case O_ALPHA: o.cfg.alpha = (float)sd_parse_float("--alpha", optarg, 1e-6, 1e6); break;
		case O_DROPOUT: o.cfg.dropout = (float)sd_parse_float("--dropout", optarg, 0, 0.99); break;
		case O_BATCH: o.batch = (int)sd_parse_int("--batch", optarg, 1, 256); break;
		case O_EPOCHS: o.epochs = (int)sd_parse_int("--epochs", optarg, 1, 1000000); break;
		case O_MAXSTEPS: o.max_steps = sd_parse_int("--max-steps", optarg, 1, 1000000000); break;
		case O_LR: o.cfg.optim.lr = sd_parse_float("--lr", optarg, 0, 1e38); break;
		case O_OPTIM: {
			enum sd_optim_kind k;
			if (sd_optim_parse(optarg, &k)) sd_usage_error("--optimizer: '%s' is not adam or adamw", optarg);
			double lr = o.cfg.optim.lr;
			sd_optim_defaults(&o.cfg.optim, k);
			o.cfg.optim.lr = lr;
			o.cfg.optim.weight_decay = 0;
			break;
		}
		case O_WD: wd = sd_parse_float("--weight-decay", optarg, 0, 10); break;
		case O_WARMUP: o.warmup = (int)sd_parse_int("--lr-warmup", optarg, 0, 1000000000); break;
		case O_SCHED:
			if (strcmp(optarg, "constant") && strcmp(optarg, "cosine"))
				sd_usage_error("--lr-schedule: '%s' is not constant or cosine", optarg);
			o.sched = optarg;
			break;
		case O_ACCUM: o.accum = (int)sd_parse_int("--grad-accum", optarg, 1, 10000); break;
		case O_MAXNORM: o.cfg.max_grad_norm = (float)sd_parse_float("--max-grad-norm", optarg, 0, 1e30); break;
		case O_SNR: o.cfg.min_snr_gamma = (float)sd_parse_float("--min-snr-gamma", optarg, 0, 1e6); break;
		case O_OFFSET: o.noise_offset = sd_parse_float("--noise-offset", optarg, 0, 10); break;
		case O_PAD:
			if (!strcmp(optarg, "77")) o.pad77 = 1;
			else if (!strcmp(optarg, "longest")) o.pad77 = 0;
			else sd_usage_error("--pad-tokens: '%s' is not 77 or longest", optarg);
			break;
		case O_VPRED: o.cfg.v_prediction = 1; break;
		case O_CKPT: o.cfg.checkpointing = 1; break;
		case O_SEED: o.seed = (uint64_t)sd_parse_int("--seed", optarg, 0, INT64_MAX); break;
		case O_EVAL: o.eval = 1; break;
		case O_LOG: o.log = optarg; break;
		case O_STATE: o.state = optarg; break;
		case O_SAVE: o.save_every = (int)sd_parse_int("--save-every", optarg, 1, 1000000000); break;
		case O_RESUME: o.resume = optarg; break;
		case O_RECON: o.vae_recon = sd_parse_float("--vae-recon-weight", optarg, 0, 1e6); break;
		case O_SEVERY: o.sample_every = (int)sd_parse_int("--sample-every", optarg, 1, 1000000000); break;
		case O_SPROMPT: o.sample_prompt = optarg; break;
		case O_SSTEPS: o.sample_steps = (int)sd_parse_int("--sample-steps", optarg, 1, 1000); break;
		case O_SPREFIX: o.sample_prefix = optarg; break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case O_VERSION: sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}
	if (wd >= 0) o.cfg.optim.weight_decay = wd;
	if (argc - optind != 1) sd_usage_error(argc == optind ? "no DATA (a folder, an archive or - for a stream)" : "too many operands");
	if (!o.output) sd_usage_error("no output: -o FILE.safetensors or -o DIR/");
	if (o.vae_recon > 0 && !(o.cfg.train & SD_TRAIN_VAE)) sd_usage_error("--vae-recon-weight: needs vae in --train");
	o.cfg.vae_recon_weight = (float)o.vae_recon;
	if (o.res && o.res % 8) sd_usage_error("--resolution: %d is not a multiple of 8", o.res);
	o.cfg.seed = o.seed;
	if (o.format && !strcmp(o.format, "kohya") && o.cfg.train == SD_TRAIN_VAE)
		sd_usage_error("--format kohya cannot hold VAE adapters; use --format peft");
	char *state_path = NULL;
	if (o.state) {
		state_path = strdup(o.state);
	} else {
		size_t n = strlen(o.output);
		while (n > 1 && o.output[n - 1] == '/') n--;
		if ((state_path = malloc(n + 7))) snprintf(state_path, n + 7, "%.*s.state", (int)n, o.output);
	}
	if (!state_path) sd_die("out of memory");
	char *sample_prefix = NULL;
	if (o.sample_every && !o.sample_prefix) {
		size_t n = strlen(o.output);
		while (n > 1 && o.output[n - 1] == '/') n--;
		if (n > 12 && !strncmp(o.output + n - 12, ".safetensors", 12)) n -= 12;
		if (!(sample_prefix = malloc(n + 8))) sd_die("out of memory");
		snprintf(sample_prefix, n + 8, "%.*s-sample", (int)n, o.output);
		o.sample_prefix = sample_prefix;
	}

	/* outputs first: a file in the way fails before anything is read, and nothing the trainer did not
	 * write is ever replaced (the adapters, the state, the log) */
	for (int i = 0; i < o.nout; i++) {
		check_writable(o.outputs[i], "-o");
		if (sd_train_check_output(o.outputs[i], is_peft(&o, o.outputs[i]) ? SD_TRAIN_FILE_PEFT : SD_TRAIN_FILE_KOHYA))
			sd_die("-o: %s", sd_errmsg());
	}
	check_writable(state_path, "--state");
	if (sd_train_check_output(state_path, SD_TRAIN_FILE_STATE)) sd_die("--state: %s", sd_errmsg());
	if (o.log && sd_train_check_output(o.log, SD_TRAIN_FILE_LOG)) sd_die("--log: %s", sd_errmsg());
	enum sd_device dev;
	if (sd_device_parse(o.device, &dev)) sd_usage_error("--device: %s", sd_errmsg());
	r.o = &o;
	double t0 = sd_now();

	/* the model's index and sizes (no weights yet), then the data set at the model's own size */
	sd_model *m = sd_model_open(o.model, o.config);
	if (!m) sd_die("%s", sd_errmsg());
	sd_geometry geo;
	if (sd_model_geometry(m, &geo)) sd_die("%s", sd_errmsg());
	if (!o.res) o.res = geo.sample_size * geo.factor;
	if (o.res % geo.factor)
		sd_usage_error("--resolution: %d is not a multiple of the VAE's factor %d", o.res, geo.factor);
	if (!(r.ds = sd_dataset_read(argv[optind], o.res, (enum sd_resize_mode)o.resize))) sd_die("%s", sd_errmsg());
	if (o.caption) {
		/* --caption wins over the data set's own captions, and is what the hash (and --resume) sees */
		int had = 0;
		for (int i = 0; i < r.ds->n; i++) {
			had += r.ds->captions[i] != NULL;
			free(r.ds->captions[i]);
			if (!(r.ds->captions[i] = strdup(o.caption))) sd_die("out of memory");
		}
		if (had)
			sd_warn("--caption replaces the captions of %d of the %d images (their .txt files or frame prompts)", had,
			        r.ds->n);
	}
	for (int i = 0; i < r.ds->n; i++)
		if (!r.ds->captions[i])
			sd_die("%s: no caption (a same-name .txt file, a \"prompt\" in the frame, or --caption TEXT)", r.ds->names[i]);
	sd_dataset_hash(r.ds, r.hash);
	sd_info("%s: %d images at %dx%d (%.2f s), hash %s", argv[optind], r.ds->n, o.res, o.res, sd_now() - t0, r.hash);
	sd_weights *w[3] = {NULL, NULL, NULL};
	for (int k = 0; k < 3; k++)
		if (!(w[k] = sd_weights_load(m, (enum sd_component)k, dev))) sd_die("%s", sd_errmsg());
	sd_clip *te = sd_clip_new(w[SD_TEXT_ENCODER]);
	sd_vae *vae = sd_vae_new(w[SD_VAE]);
	sd_unet *u = sd_unet_new(w[SD_UNET]);
	if (!te || !vae || !u) sd_die("%s: %s", sd_model_path(m), sd_errmsg());
	if (!(r.tok = sd_tokenizer_load(sd_model_tokenizer_dir(m)))) sd_die("tokenizer: %s", sd_errmsg());
	const sd_vae_config *vc = sd_vae_get_config(vae);
	int f = sd_vae_factor(vae);
	r.lc = vc->latent_channels, r.lh = r.lw = o.res / f, r.sf = vc->scaling_factor, r.nt = 1000;
	int64_t ntt;
	/* the number of training timesteps from the model's scheduler config, when it says */
	{
		const char *sj = sd_model_scheduler_json(m);
		const char *p = sj ? strstr(sj, "\"num_train_timesteps\"") : NULL;
		if (p && (p = strchr(p, ':')) && (ntt = strtoll(p + 1, NULL, 10)) > 0 && ntt <= 100000) r.nt = (int)ntt;
		o.cfg.sched_json = sj;
	}

	/* cached posteriors when the VAE is frozen (the same draws as encoding every step) */
	if (!(o.cfg.train & SD_TRAIN_VAE)) {
		int n = r.ds->n, nn = o.flip ? 2 * n : n;
		r.mean = calloc(nn, sizeof *r.mean);
		r.std = calloc(nn, sizeof *r.std);
		if (!r.mean || !r.std) sd_die("out of memory");
		double t1 = sd_now();
		for (int k = 0; k < nn; k++) {
			const sd_tensor *px = r.ds->pixels[k % n];
			sd_tensor *x = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)1, (int64_t)3, (int64_t)o.res, (int64_t)o.res);
			sd_tensor *mom = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)1, (int64_t)2 * r.lc, (int64_t)r.lh, (int64_t)r.lw);
			r.mean[k] = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)1, (int64_t)r.lc, (int64_t)r.lh, (int64_t)r.lw);
			r.std[k] = sd_tensor_newv(SD_DTYPE_F32, 4, (int64_t)1, (int64_t)r.lc, (int64_t)r.lh, (int64_t)r.lw);
			if (!x || !mom || !r.mean[k] || !r.std[k]) sd_die_lib("latent cache");
			const float *s = px->data;
			float *d = x->data;
			for (int64_t y = 0; y < 3 * (int64_t)o.res; y++)
				for (int xx = 0; xx < o.res; xx++) d[y * o.res + xx] = s[y * o.res + (k < n ? xx : o.res - 1 - xx)];
			sd_vae_tiling nt = {-1, 0};
			if (sd_vae_encode(vae, mom, x, &nt) || sd_vae_posterior(r.mean[k], NULL, r.std[k], mom))
				die_step(&r, "%s: encoding", r.ds->names[k % n]);
			sd_tensor_free(x);
			sd_tensor_free(mom);
		}
		sd_info("cached %d latents (%.2f s)", nn, sd_now() - t1);
	}

	if (!(r.tr = sd_trainer_new(&o.cfg, u, te, (o.cfg.train & SD_TRAIN_VAE) ? vae : NULL))) die_step(&r, "set-up");
	sd_info("%d LoRA tensors on %s, rank %d, alpha %g", sd_trainer_param_count(r.tr), sd_device_name(dev), o.cfg.rank,
	        o.cfg.alpha);
	sd_rng_seed(&r.rng, o.seed);
	uint64_t micro = 0;
	int nb = (r.ds->n + o.batch - 1) / o.batch;
	r.total = o.max_steps ? o.max_steps : ((long long)o.epochs * nb + o.accum - 1) / o.accum;
	if (o.resume) {
		load_state(&r, o.resume, &micro);
		sd_trainer_set_micro(r.tr, micro);
		sd_info("resumed at step %lld of %lld from %s", r.step, r.total, o.resume);
		if (r.step > r.total) sd_die("--resume: %s: already at step %lld, past the %lld of this run", o.resume, r.step, r.total);
	}
	double eval0 = o.eval ? eval_loss(&r) : 0;

	FILE *logf = NULL;
	if (o.log) {
		if (!(logf = fopen(o.log, o.resume ? "a" : "w"))) sd_die("--log: %s: %s", o.log, strerror(errno));
		if (!o.resume) fprintf(logf, "step\tepoch\tloss\tlr\tgrad_norm\tseconds%s\n", o.vae_recon > 0 ? "\trecon" : "");
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	int tty = sd_stderr_tty(), every = r.total >= 20 ? (int)(r.total / 20) : 1;
	int *perm = malloc(r.ds->n * sizeof *perm), idx[256];
	long long perm_epoch = -1;
	double tstart = sd_now();
	long long s0 = r.step;
	if (!perm) sd_die("out of memory");
	while (r.step < r.total) {
		/* the learning rate of this step: warm-up, then constant or cosine */
		double lr = o.cfg.optim.lr;
		if (o.warmup && r.step < o.warmup) lr *= (double)(r.step + 1) / o.warmup;
		else if (!strcmp(o.sched, "cosine")) {
			double p = (double)(r.step - o.warmup) / (r.total - o.warmup > 0 ? r.total - o.warmup : 1);
			lr *= 0.5 * (1 + cos(M_PI * p));
		}
		sd_optim_set_lr(sd_trainer_optim(r.tr), lr);
		sd_rng rng0 = r.rng;
		uint64_t micro0 = sd_trainer_micro(r.tr);
		double loss = 0, recon = 0;
		long long epoch = 0;
		if (sd_trainer_zero_grad(r.tr)) sd_die_lib("step %lld", r.step + 1);
		for (int a = 0; a < o.accum; a++) {
			long long mi = r.step * o.accum + a;
			epoch = mi / nb;
			int bi = (int)(mi % nb);
			if (epoch != perm_epoch) epoch_order(&r, epoch, perm), perm_epoch = epoch;
			int N = 0;
			for (int i = bi * o.batch; i < r.ds->n && N < o.batch; i++) idx[N++] = perm[i];
			struct batch B;
			make_batch(&r, &B, idx, N, &r.rng, 0);
			double l;
			if (sd_trainer_accumulate(r.tr, &B.b, 1.0f / o.accum, &l)) die_step(&r, "step %lld", r.step + 1);
			batch_free(&B);
			loss += l / o.accum;
			recon += sd_trainer_recon_loss(r.tr) / o.accum;
		}
		if (!isfinite(loss) || !isfinite(recon)) {
			if (tty) fputc('\n', stderr);
			if (save_state(&r, state_path, r.step, micro0, &rng0))
				sd_die("step %lld: the loss is %g; stopping, and the state could not be saved: %s", r.step + 1, loss, sd_errmsg());
			sd_die("step %lld: the loss is %g; stopping (the last good state, step %lld, is in %s)", r.step + 1, loss,
			       r.step, state_path);
		}
		if (sd_trainer_apply(r.tr)) die_step(&r, "step %lld", r.step + 1);
		r.step++;
		double el = sd_now() - tstart, ips = (r.step - s0) / (el > 0 ? el : 1e-9);
		if (logf) {
			fprintf(logf, "%lld\t%lld\t%.9g\t%.6g\t%.6g\t%.3f", r.step, epoch, loss, lr,
			        (double)sd_trainer_grad_norm(r.tr), el);
			if (o.vae_recon > 0) fprintf(logf, "\t%.9g", recon);
			fputc('\n', logf);
		}
		char rs[48] = "";
		if (o.vae_recon > 0) snprintf(rs, sizeof rs, " recon %.4f", recon);
		if (tty) {
			double eta = (r.total - r.step) / (ips > 0 ? ips : 1);
			fprintf(stderr, "\r%s: step %lld/%lld  loss %.4f%s  %.2f it/s  ETA %d:%02d ", sd_prog, r.step, r.total, loss, rs,
			        ips, (int)eta / 60, (int)eta % 60);
			if (r.step == r.total) fputc('\n', stderr);
		} else if (r.step % every == 0 || r.step == r.total) {
			fprintf(stderr, "%s: step %lld/%lld loss %.6f%s lr %.3g %.2f it/s\n", sd_prog, r.step, r.total, loss, rs, lr, ips);
		}
		if (o.save_every && r.step % o.save_every == 0 && r.step < r.total) {
			if (save_state(&r, state_path, r.step, sd_trainer_micro(r.tr), &r.rng))
				sd_die("--save-every: %s: %s", state_path, sd_errmsg());
			write_output(&r); /* the adapter so far, loadable by --lora while training goes on */
		}
		if (o.sample_every && (r.step % o.sample_every == 0 || r.step == r.total)) {
			sd_trainer_set_training(r.tr, 0);
			preview(&r, o.model, o.sample_prompt ? o.sample_prompt : o.caption ? o.caption : r.ds->captions[0]);
			sd_trainer_set_training(r.tr, 1);
		}
		if (stop_signal) {
			if (tty) fputc('\n', stderr);
			if (save_state(&r, state_path, r.step, sd_trainer_micro(r.tr), &r.rng))
				sd_die("%s: the state could not be saved: %s", strsignal(stop_signal), sd_errmsg());
			sd_die("%s at step %lld: state saved to %s (continue with --resume %s)",
			       stop_signal == SIGINT ? "interrupted" : "terminated", r.step, state_path, state_path);
		}
	}
	if (logf && fclose(logf)) sd_die("--log: %s: write error", o.log);
	if (o.eval) {
		double eval1 = eval_loss(&r);
		fprintf(stderr, "%s: eval loss %.6f -> %.6f\n", sd_prog, eval0, eval1);
	}
	write_output(&r);
	sd_info("done in %.1f s", sd_now() - t0);

	free(perm);
	sd_trainer_free(r.tr);
	if (r.mean)
		for (int k = 0; k < (o.flip ? 2 : 1) * r.ds->n; k++) sd_tensor_free(r.mean[k]), sd_tensor_free(r.std[k]);
	free(r.mean), free(r.std);
	sd_unet_free(u);
	sd_vae_free(vae);
	sd_clip_free(te);
	for (int k = 0; k < 3; k++) sd_weights_free(w[k]);
	sd_tokenizer_free(r.tok);
	sd_model_close(m);
	sd_dataset_free(r.ds);
	free(state_path);
	free(sample_prefix);
	sd_close_stdout();
	return 0;
}
