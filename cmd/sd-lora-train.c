/*
 * sd-lora-train - few-shot style LoRA training (see sd-lora-train(1)): the study's recipe (diffusers'
 * train_text_to_image_lora.py with PEFT adapters on the UNet, the text encoder and the VAE) by default.
 * A sink: reads a folder, an archive or a stream of images, writes a kohya file or PEFT folders.
 *
 *   sd-lora-train -m sd15 --caption "A photo of in the style of **" -o style.safetensors images/
 *
 * The work lives in libsd (lib/train/: run.c batches and steps, state.c the state file, output.c the
 * adapters, previews and log): this file parses the options, opens the model, reports, saves and stops.
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "sd.h"
#include "sd_cli.h"

struct opts {
	const char *model, *config, *device, *output, *format, *log, *resume, *state;
	const char *outputs[4], *sample_prompt, *sample_prefix;
	int nout, sample_every, sample_steps, save_every, eval;
	double vae_recon;
	sd_train_recipe rc;       /* the batches and schedule, and the trainer's config */
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

/* 0 for a, 1 for b, else the usage error "OPT: 'V' is not A or B". */
static int oneof(const char *opt, const char *v, const char *a, const char *b)
{
	if (strcmp(v, a) && strcmp(v, b)) sd_usage_error("%s: '%s' is not %s or %s", opt, v, a, b);
	return !strcmp(v, b);
}

/* A failure of the run: one of the training step (SD_TRAIN_ESTEP) that ran out of memory says what to lower. */
static _Noreturn void die_run(const struct opts *o, int rc)
{
	const char *e = sd_errmsg();
	if (rc == SD_TRAIN_ESTEP && strstr(e, "out of memory"))
		sd_die("%s; lower --resolution (now %d) or --batch (now %d)%s", e, o->rc.res, o->rc.batch,
		       o->rc.cfg.checkpointing ? "" : ", or add --checkpointing");
	sd_die("%s", e);
}

/* Every -o, with the adapters so far. */
static void write_outputs(const struct opts *o, const sd_train_run *r)
{
	static int warned; /* once, not at every --save-every */
	for (int i = 0, skipped; i < o->nout; i++) {
		if (sd_train_run_write(r, o->outputs[i], sd_train_is_peft(o->format, o->outputs[i]), &skipped)) sd_die("%s", sd_errmsg());
		if (skipped && !warned++) sd_warn("%s: the %d VAE adapters are not in the kohya file (no kohya spelling); use a PEFT "
		                                  "folder (-o DIR/) to keep them", o->outputs[i], skipped);
		sd_info("wrote %s after %lld steps", o->outputs[i], r->step);
	}
}

int main(int argc, char **argv)
{
	enum { O_CONFIG = 256, O_DEVICE, O_CAPTION, O_LOG, O_STATE, O_RESUME, O_SPROMPT, O_SPREFIX, /* the strings */
	       O_FORMAT, O_RES, O_RESIZE, O_FLIP, O_TRAIN, O_TARGETS, O_RANK, O_ALPHA, O_DROPOUT, O_BATCH, O_EPOCHS,
	       O_MAXSTEPS, O_LR, O_OPTIM, O_WD, O_WARMUP, O_SCHED, O_ACCUM, O_MAXNORM, O_SNR, O_OFFSET, O_PAD, O_VPRED,
	       O_CKPT, O_SEED, O_EVAL, O_SAVE, O_RECON, O_SEVERY, O_SSTEPS, O_VERSION };
	/* has_arg: 1 required, 0 none */
	static const struct option longopts[] = {
		{"model", 1, 0, 'm'}, {"config", 1, 0, O_CONFIG}, {"device", 1, 0, O_DEVICE}, {"output", 1, 0, 'o'},
		{"format", 1, 0, O_FORMAT}, {"caption", 1, 0, O_CAPTION}, {"resolution", 1, 0, O_RES},
		{"resize", 1, 0, O_RESIZE}, {"flip", 0, 0, O_FLIP}, {"train", 1, 0, O_TRAIN},
		{"targets", 1, 0, O_TARGETS}, {"rank", 1, 0, O_RANK}, {"alpha", 1, 0, O_ALPHA},
		{"dropout", 1, 0, O_DROPOUT}, {"batch", 1, 0, O_BATCH}, {"epochs", 1, 0, O_EPOCHS},
		{"max-steps", 1, 0, O_MAXSTEPS}, {"lr", 1, 0, O_LR}, {"optimizer", 1, 0, O_OPTIM},
		{"weight-decay", 1, 0, O_WD}, {"lr-warmup", 1, 0, O_WARMUP}, {"lr-schedule", 1, 0, O_SCHED},
		{"grad-accum", 1, 0, O_ACCUM}, {"max-grad-norm", 1, 0, O_MAXNORM}, {"min-snr-gamma", 1, 0, O_SNR},
		{"noise-offset", 1, 0, O_OFFSET}, {"pad-tokens", 1, 0, O_PAD}, {"v-prediction", 0, 0, O_VPRED},
		{"checkpointing", 0, 0, O_CKPT}, {"seed", 1, 0, O_SEED}, {"eval", 0, 0, O_EVAL}, {"log", 1, 0, O_LOG},
		{"state", 1, 0, O_STATE}, {"save-every", 1, 0, O_SAVE}, {"resume", 1, 0, O_RESUME},
		{"vae-recon-weight", 1, 0, O_RECON}, {"sample-every", 1, 0, O_SEVERY},
		{"sample-prompt", 1, 0, O_SPROMPT}, {"sample-steps", 1, 0, O_SSTEPS},
		{"sample-prefix", 1, 0, O_SPREFIX}, {"verbose", 0, 0, 'v'}, {"help", 0, 0, 'h'},
		{"version", 0, 0, O_VERSION}, {NULL, 0, 0, 0},
	};
	static struct opts o;
	static sd_train_run r;
	sd_train_config *cfg = &o.rc.cfg;
	const char **strs[] = {&o.config, &o.device, &o.rc.caption, &o.log, &o.state, &o.resume, &o.sample_prompt,
	                       &o.sample_prefix}; /* O_CONFIG… O_SPREFIX */
	int c, had;
	double wd = -1, t0, eval0 = 0, eval1;

	sd_cli_init_compute(argc, argv);
	sd_train_defaults(cfg);
	o.rc.batch = 4, o.rc.epochs = 100, o.rc.accum = 1, o.sample_steps = 20;
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":m:o:vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'm': o.model = optarg; break;
		case 'o': if (o.nout == 4) sd_usage_error("-o: at most 4 outputs"); o.outputs[o.nout++] = optarg; break;
		case O_FORMAT: oneof("--format", optarg, "kohya", "peft"), o.format = optarg; break;
		case O_RES: o.rc.res = (int)sd_parse_int("--resolution", optarg, 8, 4096); break;
		case O_RESIZE: o.rc.resize = oneof("--resize", optarg, "squash", "crop") ? SD_RESIZE_CROP : SD_RESIZE_SQUASH; break;
		case O_FLIP: o.rc.flip = 1; break;
		case O_TRAIN:
			if ((cfg->train = sd_train_parse_components(optarg)) < 0) sd_usage_error("--train: %s", sd_errmsg());
			break;
		case O_TARGETS: if (sd_train_parse_targets(cfg, optarg)) sd_usage_error("--targets: %s", sd_errmsg()); break;
		case O_RANK: cfg->rank = (int)sd_parse_int("--rank", optarg, 1, 1024); break;
		case O_ALPHA: cfg->alpha = (float)sd_parse_float("--alpha", optarg, 1e-6, 1e6); break;
		case O_DROPOUT: cfg->dropout = (float)sd_parse_float("--dropout", optarg, 0, 0.99); break;
		case O_BATCH: o.rc.batch = (int)sd_parse_int("--batch", optarg, 1, 256); break;
		case O_EPOCHS: o.rc.epochs = (int)sd_parse_int("--epochs", optarg, 1, 1000000); break;
		case O_MAXSTEPS: o.rc.max_steps = sd_parse_int("--max-steps", optarg, 1, 1000000000); break;
		case O_LR: cfg->optim.lr = sd_parse_float("--lr", optarg, 0, 1e38); break;
		case O_OPTIM: if (sd_train_set_optimizer(cfg, optarg)) sd_usage_error("--optimizer: %s", sd_errmsg()); break;
		case O_WD: wd = sd_parse_float("--weight-decay", optarg, 0, 10); break;
		case O_WARMUP: o.rc.warmup = (int)sd_parse_int("--lr-warmup", optarg, 0, 1000000000); break;
		case O_SCHED: o.rc.cosine = oneof("--lr-schedule", optarg, "constant", "cosine"); break;
		case O_ACCUM: o.rc.accum = (int)sd_parse_int("--grad-accum", optarg, 1, 10000); break;
		case O_MAXNORM: cfg->max_grad_norm = (float)sd_parse_float("--max-grad-norm", optarg, 0, 1e30); break;
		case O_SNR: cfg->min_snr_gamma = (float)sd_parse_float("--min-snr-gamma", optarg, 0, 1e6); break;
		case O_OFFSET: o.rc.noise_offset = sd_parse_float("--noise-offset", optarg, 0, 10); break;
		case O_PAD: o.rc.pad77 = !oneof("--pad-tokens", optarg, "77", "longest"); break;
		case O_VPRED: cfg->v_prediction = 1; break;
		case O_CKPT: cfg->checkpointing = 1; break;
		case O_SEED: cfg->seed = (uint64_t)sd_parse_int("--seed", optarg, 0, INT64_MAX); break;
		case O_EVAL: o.eval = 1; break;
		case O_SAVE: o.save_every = (int)sd_parse_int("--save-every", optarg, 1, 1000000000); break;
		case O_RECON: o.vae_recon = sd_parse_float("--vae-recon-weight", optarg, 0, 1e6); break;
		case O_SEVERY: o.sample_every = (int)sd_parse_int("--sample-every", optarg, 1, 1000000000); break;
		case O_SSTEPS: o.sample_steps = (int)sd_parse_int("--sample-steps", optarg, 1, 1000); break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case O_VERSION: sd_print_version(); break;
		default:
			if (c >= O_CONFIG && c <= O_SPREFIX) *strs[c - O_CONFIG] = optarg;
			else sd_bad_option(c, argv);
		}
	}
	if (wd >= 0) cfg->optim.weight_decay = wd;
	if (argc - optind != 1) sd_usage_error(argc == optind ? "no DATA (a folder, an archive or - for a stream)" : "too many operands");
	if (!(o.output = o.outputs[0])) sd_usage_error("no output: -o FILE.safetensors or -o DIR/");
	if (o.vae_recon > 0 && !(cfg->train & SD_TRAIN_VAE)) sd_usage_error("--vae-recon-weight: needs vae in --train");
	cfg->vae_recon_weight = (float)o.vae_recon;
	if (o.rc.res && o.rc.res % 8) sd_usage_error("--resolution: %d is not a multiple of 8", o.rc.res);
	if (o.format && !strcmp(o.format, "kohya") && cfg->train == SD_TRAIN_VAE)
		sd_usage_error("--format kohya cannot hold VAE adapters; use --format peft");
	char *state_path = o.state ? strdup(o.state) : sd_train_path(o.output, ".state", 0), *sample_prefix = NULL;
	if (!state_path) sd_die("out of memory");
	if (o.sample_every && !o.sample_prefix && !(o.sample_prefix = sample_prefix = sd_train_path(o.output, "-sample", 1)))
		sd_die("out of memory");

	/* outputs first: a file in the way fails before anything is read; nothing we did not write is replaced */
	for (int i = 0; i < o.nout; i++)
		if (sd_train_check_adapter(o.format, o.outputs[i])) sd_die("-o: %s", sd_errmsg());
	if (sd_train_check_dir(state_path) || sd_train_check_output(state_path, SD_TRAIN_FILE_STATE))
		sd_die("--state: %s", sd_errmsg());
	if (o.log && sd_train_check_output(o.log, SD_TRAIN_FILE_LOG)) sd_die("--log: %s", sd_errmsg());
	enum sd_device dev;
	if (sd_device_parse(o.device, &dev)) sd_usage_error("--device: %s", sd_errmsg());
	t0 = sd_now();

	/* the model's index and sizes (no weights yet), then the data set at the model's own size */
	sd_model *m = sd_model_open(o.model, o.config);
	sd_geometry geo;
	if (!m || sd_model_geometry(m, &geo)) sd_die("%s", sd_errmsg());
	if (!o.rc.res) o.rc.res = geo.sample_size * geo.factor;
	if (o.rc.res % geo.factor)
		sd_usage_error("--resolution: %d is not a multiple of the VAE's factor %d", o.rc.res, geo.factor);
	if (sd_train_run_init(&r, &o.rc, argv[optind], &had)) sd_die("%s", sd_errmsg());
	if (had)
		sd_warn("--caption replaces the captions of %d of the %d images (their .txt files or frame prompts)", had, r.ds->n);
	sd_info("%s: %d images at %dx%d (%.2f s), hash %s", argv[optind], r.ds->n, o.rc.res, o.rc.res, sd_now() - t0, r.hash);
	sd_train_models M;
	if (sd_train_models_load(&M, m, dev) || sd_train_run_setup(&r, M.tok, M.vae, cfg->sched_json = sd_model_scheduler_json(m)))
		sd_die("%s", sd_errmsg());
	double t1 = sd_now();
	if ((c = sd_train_run_cache(&r, M.vae))) die_run(&o, c);
	if (r.mean) sd_info("cached %d latents (%.2f s)", r.ncache, sd_now() - t1);
	if (!(r.tr = sd_trainer_new(cfg, M.unet, M.te, (cfg->train & SD_TRAIN_VAE) ? M.vae : NULL)))
		sd_preerr("set-up"), die_run(&o, SD_TRAIN_ESTEP);
	sd_info("%d LoRA tensors on %s, rank %d, alpha %g", sd_trainer_param_count(r.tr), sd_device_name(dev), cfg->rank,
	        cfg->alpha);
	if (o.resume) {
		if (sd_train_run_load(&r, o.resume)) sd_die("--resume: %s", sd_errmsg());
		sd_info("resumed at step %lld of %lld from %s", r.step, r.total, o.resume);
		if (r.step > r.total) sd_die("--resume: %s: already at step %lld, past the %lld of this run", o.resume, r.step, r.total);
	}
	if (o.eval && sd_train_run_eval(&r, &eval0)) sd_die("%s", sd_errmsg());
	FILE *logf = o.log ? sd_train_log_open(o.log, o.resume != NULL, o.vae_recon > 0) : NULL;
	if (o.log && !logf) sd_die("--log: %s", sd_errmsg());
	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGINT, &sa, NULL), sigaction(SIGTERM, &sa, NULL);
	int tty = sd_stderr_tty(), every = r.total >= 20 ? (int)(r.total / 20) : 1;
	long long s0 = r.step;
	double tstart = sd_now();
	while (r.step < r.total) {
		sd_train_step_info s;
		if ((c = sd_train_run_step(&r, state_path, &s))) {
			if (c == 1 && tty) fputc('\n', stderr); /* the loss is not finite: the last good state is saved */
			die_run(&o, c);
		}
		double el = sd_now() - tstart, ips = (r.step - s0) / (el > 0 ? el : 1e-9);
		if (logf) sd_train_log_step(logf, &r, &s, el, o.vae_recon > 0);
		char rs[48] = "";
		if (o.vae_recon > 0) snprintf(rs, sizeof rs, " recon %.4f", s.recon);
		if (tty) {
			double eta = (r.total - r.step) / (ips > 0 ? ips : 1);
			fprintf(stderr, "\r%s: step %lld/%lld  loss %.4f%s  %.2f it/s  ETA %d:%02d ", sd_prog, r.step, r.total, s.loss, rs,
			        ips, (int)eta / 60, (int)eta % 60);
			if (r.step == r.total) fputc('\n', stderr);
		} else if (r.step % every == 0 || r.step == r.total) {
			fprintf(stderr, "%s: step %lld/%lld loss %.6f%s lr %.3g %.2f it/s\n", sd_prog, r.step, r.total, s.loss, rs, s.lr, ips);
		}
		if (o.save_every && r.step % o.save_every == 0 && r.step < r.total) {
			if (sd_train_run_save(&r, state_path)) sd_die("--save-every: %s: %s", state_path, sd_errmsg());
			write_outputs(&o, &r); /* the adapter so far, loadable by --lora while training goes on */
		}
		if (o.sample_every && (r.step % o.sample_every == 0 || r.step == r.total)) {
			char out[4096];
			if (sd_train_run_preview(&r, o.model, o.sample_prompt, o.sample_prefix, o.sample_steps, out, sizeof out))
				sd_warn("%s", sd_errmsg());
			else sd_info("preview: %s", out);
		}
		if (stop_signal) {
			if (tty) fputc('\n', stderr);
			if (sd_train_run_save(&r, state_path))
				sd_die("%s: the state could not be saved: %s", strsignal(stop_signal), sd_errmsg());
			sd_die("%s at step %lld: state saved to %s (continue with --resume %s)",
			       stop_signal == SIGINT ? "interrupted" : "terminated", r.step, state_path, state_path);
		}
	}
	if (logf && fclose(logf)) sd_die("--log: %s: write error", o.log);
	if (o.eval && sd_train_run_eval(&r, &eval1)) sd_die("%s", sd_errmsg());
	if (o.eval) fprintf(stderr, "%s: eval loss %.6f -> %.6f\n", sd_prog, eval0, eval1);
	write_outputs(&o, &r);
	sd_info("done in %.1f s", sd_now() - t0);
	sd_trainer_free(r.tr), sd_train_run_free(&r), sd_train_models_free(&M), sd_model_close(m);
	free(state_path), free(sample_prefix);
	sd_close_stdout();
	return 0;
}
