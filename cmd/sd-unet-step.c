/*
 * sd-unet-step - denoise latents with the UNet and a sampler (see sd-unet-step(1)).  A filter:
 *
 *   sd-tokenize "a photo of a cat" | sd-text-encode -m MODEL > cond.st
 *   sd-noise -m MODEL --seed 1 | sd-unet-step -m MODEL -c cond.st | sd-vae-decode -m MODEL | tensortopnm
 *
 * The denoising loop of diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline, with
 * classifier-free guidance, lives in lib/sched/denoise.c (sd_denoise_frame): this file parses the
 * options, loads the UNet (+ LoRA) and the conditioning stream, and runs the frame loop.  The frame's
 * "sampler" map is the plan, continued and written back, so K calls of one step each give the same
 * bytes as one call of K steps.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "sd.h"
#include "sd_cli.h"

struct opts {
	const char *model, *config, *device;
	const char **lora;    /* --lora PATH[:SCALE], repeatable */
	int nlora;
	sd_denoise_job j;     /* the flags of the plan, --seed, --count, --predict, the conditioning (-c) */
};

static void usage(void)
{
	printf("Usage: %s -m MODEL [-c COND] [OPTION]... [FILE]\n"
	       "Denoise the \"latent\" of every frame of a tensor stream with the model's UNet and a\n"
	       "sampler, guided by the text conditioning \"context\" (+ \"uncond_context\") from COND (or\n"
	       "from the frame itself).  The plan (sampler, steps, the step reached) travels in the\n"
	       "frame's \"sampler\" map and the noise in its \"generator\": flags override a plan that has\n"
	       "not started, and a run can be split over calls (--count) with the same result.\n"
	       "With no FILE, or when FILE is -, read standard input.\n"
	       "\n"
	       "  -m, --model PATH     diffusers folder, .safetensors or .ckpt (default: $SD_MODEL)\n"
	       "      --config DIR     diffusers folder whose configs describe a single-file model\n"
	       "  -c, --cond FILE      stream of frames with \"context\" (+ \"uncond_context\"): one frame\n"
	       "                       for every input frame, or one each\n"
	       "      --sampler NAME   pndm, ddim, ddpm, euler, euler_a, dpmpp_2m, lms (default: the\n"
	       "                       plan's, else pndm)\n"
	       "      --steps N        inference steps (default: the plan's, else 50)\n"
	       "      --karras, --no-karras  Karras sigmas (euler, dpmpp_2m, lms; default: the config's)\n"
	       "      --eta E          DDIM's eta (default: the plan's, else 0)\n"
	       "      --spacing S      timestep spacing leading, trailing or linspace (default: the\n"
	       "                       plan's, else the model's scheduler config)\n"
	       "  -g, --guidance G     classifier-free guidance scale (default: the plan's, else 7.5;\n"
	       "                       1 or less runs the conditional pass only)\n"
	       "  -k, --count K        run at most K steps, then stop (default: all that are left)\n"
	       "      --seed S         seed the generator of a frame that carries none (ancestral noise)\n"
	       "      --predict T      write the UNet's raw output at timestep T as \"eps\" (and\n"
	       "                       \"uncond_eps\"); no step is taken\n"
	       "      --lora PATH[:SCALE]  apply a LoRA adapter's UNet part with weight SCALE; repeatable\n"
	       "      --device DEV     cpu, cuda or auto (default: $SD_DEVICE, else auto)\n"
	       "  -v, --verbose        report each step on standard error\n"
	       "  -h, --help           display this help and exit\n"
	       "      --version        output version information and exit\n"
	       "\n"
	       "Example: sd-noise -m tiny --seed 1 | %s -m tiny -c cond.st --sampler ddim --steps 8\n",
	       sd_prog, sd_prog);
	exit(0);
}

/* Every frame of the conditioning stream path into j->cond. */
static void read_cond(const char *path, sd_denoise_job *j)
{
	FILE *f = sd_open_in(path);
	sd_reader *r = sd_reader_new(f, path);
	if (!r) sd_die_lib("%s", path);
	sd_value *fr, **frames = NULL;
	long n = 0;
	int rc;
	while ((rc = sd_reader_next(r, &fr)) == 1) {
		sd_value **p = realloc(frames, (size_t)(n + 1) * sizeof *p);
		if (!p) sd_die("out of memory");
		frames = p;
		frames[n++] = fr;
	}
	if (rc < 0) sd_die("%s", sd_errmsg());
	if (n == 0) sd_die("%s: no frames in the conditioning stream", path);
	sd_reader_free(r);
	if (f != stdin) fclose(f);
	j->cond = frames;
	j->ncond = n;
}

/* -v: the library's remarks, as progress lines. */
static void note(void *user, const char *msg)
{
	(void)user;
	sd_info("%s", msg);
}

int main(int argc, char **argv)
{
	enum { OPT_CONFIG = 256, OPT_DEVICE, OPT_SAMPLER, OPT_STEPS, OPT_KARRAS, OPT_NO_KARRAS, OPT_ETA, OPT_SEED,
	       OPT_PREDICT, OPT_LORA, OPT_SPACING, OPT_VERSION };
	static const struct option longopts[] = {
		{"model", required_argument, NULL, 'm'},
		{"config", required_argument, NULL, OPT_CONFIG},
		{"device", required_argument, NULL, OPT_DEVICE},
		{"cond", required_argument, NULL, 'c'},
		{"sampler", required_argument, NULL, OPT_SAMPLER},
		{"steps", required_argument, NULL, OPT_STEPS},
		{"karras", no_argument, NULL, OPT_KARRAS},
		{"no-karras", no_argument, NULL, OPT_NO_KARRAS},
		{"eta", required_argument, NULL, OPT_ETA},
		{"guidance", required_argument, NULL, 'g'},
		{"count", required_argument, NULL, 'k'},
		{"seed", required_argument, NULL, OPT_SEED},
		{"predict", required_argument, NULL, OPT_PREDICT},
		{"lora", required_argument, NULL, OPT_LORA},
		{"spacing", required_argument, NULL, OPT_SPACING},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, OPT_VERSION},
		{NULL, 0, NULL, 0},
	};
	static struct opts o; /* static: what it points to stays reachable until exit */
	sd_denoise_job *j = &o.j;
	sd_plan_flags *pf = &j->plan;
	pf->karras = -1;
	int c;
	enum sd_sampler_kind kind;

	sd_cli_init_compute(argc, argv);
	if (!(o.lora = calloc(argc, sizeof *o.lora))) sd_die("out of memory");
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":m:c:g:k:vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'm': o.model = optarg; break;
		case OPT_CONFIG: o.config = optarg; break;
		case OPT_DEVICE: o.device = optarg; break;
		case 'c': j->cond_name = optarg; break;
		case OPT_SAMPLER:
			if (sd_sampler_parse(optarg, &kind)) sd_usage_error("--sampler: %s", sd_errmsg());
			pf->sampler = sd_sampler_name(kind);
			break;
		case OPT_STEPS: pf->steps = (int)sd_parse_int("--steps", optarg, 1, 1000); break;
		case OPT_KARRAS: pf->karras = 1; break;
		case OPT_NO_KARRAS: pf->karras = 0; break;
		case OPT_ETA: pf->eta = sd_parse_float("--eta", optarg, 0, 1e6); pf->has_eta = 1; break;
		case 'g': pf->guidance = sd_parse_float("--guidance", optarg, 0, 1e6); pf->has_guidance = 1; break;
		case 'k': j->count = (int)sd_parse_int("--count", optarg, 1, 100000); break;
		case OPT_SEED: j->seed = (uint64_t)sd_parse_int("--seed", optarg, 0, INT64_MAX); j->has_seed = 1; break;
		case OPT_PREDICT: j->predict = sd_parse_float("--predict", optarg, 0, 1e6); j->has_predict = 1; break;
		case OPT_LORA: o.lora[o.nlora++] = optarg; break;
		case OPT_SPACING:
			if (sd_spacing_check(optarg)) sd_usage_error("--spacing: %s", sd_errmsg());
			pf->spacing = optarg;
			break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case OPT_VERSION: sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}
	if (argc - optind > 1) sd_usage_error("too many files (one stream at a time)");
	if (j->has_predict && j->count) sd_usage_error("--predict takes no step: --count does not apply");
	const char *env = getenv("SD_MODEL");
	if (!o.model && !(env && *env)) sd_usage_error("no model: give -m MODEL or set SD_MODEL");
	if (o.model && !*o.model) sd_usage_error("--model: the path is empty");
	if (o.device && strcasecmp(o.device, "cpu") && strcasecmp(o.device, "cuda") && strcasecmp(o.device, "auto"))
		sd_usage_error("--device: unknown device '%s' (expected cpu, cuda or auto)", o.device);
	enum sd_device dev;
	if (sd_device_parse(o.device, &dev) < 0) sd_die("--device: %s", sd_errmsg());

	double t0 = sd_now();
	sd_model *m = sd_model_open(o.model, o.config);
	if (!m) sd_die("%s", sd_errmsg());
	j->sched_json = sd_model_scheduler_json(m);
	if (pf->sampler || pf->steps || pf->karras > 0 || pf->has_eta) {
		/* a bad combination of flags is a usage error, found before the model is loaded */
		char *cj = sd_sched_config_spacing(j->sched_json, pf->spacing);
		if (!cj) sd_die_lib("%s: scheduler config", sd_model_path(m));
		sd_sched *t = sd_sched_new(cj, pf->sampler ? kind : SD_SAMPLER_PNDM, pf->steps ? pf->steps : 50,
		                           pf->karras, pf->has_eta ? pf->eta : 0);
		if (!t && (pf->sampler || !(pf->karras > 0 || pf->has_eta))) sd_usage_error("%s", sd_errmsg());
		sd_sched_free(t);
		free(cj);
	}
	if (j->cond_name) read_cond(j->cond_name, j);
	if (!sd_model_has(m, SD_UNET)) sd_die("%s: the model has no UNet", sd_model_path(m));
	sd_weights *w = sd_weights_load_stored(m, SD_UNET, dev);
	if (!w) sd_die("%s", sd_errmsg());
	sd_unet *unet = sd_unet_new(w);
	if (!unet) sd_die("%s: %s", sd_model_path(m), sd_errmsg());
	sd_lora *lora = sd_lora_load(o.lora, o.nlora);
	if (!lora || sd_lora_attach_unet(lora, unet, w) < 0) sd_die("--lora: %s", sd_errmsg());
	if (o.nlora && !sd_lora_count(lora, SD_UNET)) sd_info("--lora: no UNet adapter in the files given");
	const sd_unet_config *uc = sd_unet_get_config(unet);
	sd_info("%s (%s): UNet of %lld parameters, %d blocks, %d LoRA layers, on %s, %.2f s", sd_model_path(m),
	        sd_model_format(m), (long long)sd_weights_params(w), uc->nblocks, sd_lora_count(lora, SD_UNET),
	        sd_device_name(dev), sd_now() - t0);
	j->unet = unet;
	j->note = note;

	const char *path = optind < argc ? argv[optind] : NULL;
	const char *name = !path || !strcmp(path, "-") ? "stdin" : path;
	FILE *in = sd_open_in(path);
	sd_reader *rd = sd_reader_new(in, name);
	if (!rd) sd_die_lib("%s", name);
	sd_value *frame;
	long nframes = 0;
	int rc;
	while ((rc = sd_reader_next(rd, &frame)) == 1) {
		const sd_value *cf;
		if (sd_denoise_frame(j, frame, name, sd_reader_index(rd), &cf)) sd_die("%s", sd_errmsg());
		sd_frame_note_generation(frame, cf, o.model, (const char *const *)o.lora, o.nlora);
		sd_write_frame_or_die(frame);
		sd_value_free(frame);
		nframes++;
	}
	if (rc < 0) sd_die("%s", sd_errmsg());
	if (nframes == 0) sd_die("%s: no frames on input", name);
	if (j->ncond > 1 && nframes != j->ncond)
		sd_die("%s: %s holds %ld conditioning frames for %ld input frames", name, j->cond_name, j->ncond, nframes);
	sd_reader_free(rd);
	for (long i = 0; i < j->ncond; i++) sd_value_free(j->cond[i]);
	free((void *)j->cond);
	sd_unet_free(unet);
	sd_lora_free(lora);
	free(o.lora);
	sd_weights_free(w);
	sd_model_close(m);
	sd_info("%ld frame%s", nframes, nframes == 1 ? "" : "s");
	sd_close_stdout();
	return 0;
}
