/*
 * sd-noise - the starting latent of a Stable Diffusion run, drawn as diffusers draws it (see sd-noise(1)).
 *
 *   sd-noise -m MODEL -W 512 -H 512 --seed 1234 | sd-unet-step -m MODEL -c cond.st | …        (text to image)
 *   pnmtotensor in.ppm | sd-vae-encode -m MODEL --sample --seed 1 |
 *       sd-noise -m MODEL --strength 0.7 --sampler pndm --steps 50 | sd-unet-step -m MODEL -c cond.st  (image to image)
 *
 * Text to image (StableDiffusionPipeline.prepare_latents): "latent" = torch.randn([B,C,H/f,W/f]) from a
 * torch CPU generator seeded with --seed, B samples in one draw; sd-unet-step multiplies it by its
 * sampler's init_noise_sigma.  Image to image (StableDiffusionImg2ImgPipeline.prepare_latents): the
 * frame's clean "latent" (sd-vae-encode's, already × scaling_factor) is noised with torch.randn of its
 * shape, drawn from the generator the frame carries (after the VAE's posterior sample), to timestep
 * index t_start = steps − int(steps × strength) with the sampler's own add_noise.  Both write the
 * generator state ("generator") and the plan ("sampler") that sd-unet-step carries on.  The work is
 * lib/sched/noise.c's (sd_noise_txt2img, sd_noise_img2img); this file is the options and the frame loop.
 */
#include <stdlib.h>
#include <string.h>

#include "sd.h"
#include "sd_cli.h"

struct opts {
	const char *model, *config, *device;
	int has_strength;
	const char *file;            /* NULL = source (text to image without input) */
	sd_noise_job j;              /* the plan flags, size, batch, seed and strength */
};

static void usage(void)
{
	printf("Usage: %s -m MODEL [-W WIDTH] [-H HEIGHT] [--seed S] [--batch B] [FILE]\n"
	       "  or:  %s -m MODEL --strength S [--sampler NAME] [--steps N] [--seed S] [FILE]\n"
	       "Make the starting latent of a Stable Diffusion run, with the noise torch's CPU generator\n"
	       "draws for diffusers.  Text to image: write one frame with \"latent\" = N(0,1) noise\n"
	       "f32 [B,4,H/8,W/8] (with FILE, add it to every frame of that stream instead).  Image to\n"
	       "image (--strength): read frames with a clean \"latent\" (sd-vae-encode) and noise it to\n"
	       "the start step as StableDiffusionImg2ImgPipeline does.  Both write the generator state\n"
	       "(\"generator\") and the sampler plan (\"sampler\") that sd-unet-step continues.\n"
	       "\n"
	       "  -m, --model PATH     diffusers folder, .safetensors or .ckpt (default: $SD_MODEL)\n"
	       "      --config DIR     diffusers folder whose configs describe a single-file model\n"
	       "  -W, --width N        image width in pixels (default: the UNet's sample_size x 8)\n"
	       "  -H, --height N       image height in pixels (default: likewise)\n"
	       "  -b, --batch B        B samples drawn in one go (default 1)\n"
	       "      --seed S         seed torch's generator (default: continue the frame's\n"
	       "                       \"generator\", else a random seed, recorded in the frame)\n"
	       "      --strength S     image to image: how much of the schedule to run, in [0, 1]\n"
	       "      --sampler NAME   pndm, ddim, ddpm, euler, euler_a, dpmpp_2m, lms (default pndm)\n"
	       "      --steps N        inference steps of the whole schedule (default 50)\n"
	       "      --karras, --no-karras  Karras sigmas (euler, dpmpp_2m, lms; default: the config's)\n"
	       "      --eta E          DDIM's eta (default 0)\n"
	       "      --spacing S      timestep spacing leading, trailing or linspace (default: the\n"
	       "                       model's scheduler config)\n"
	       "      --device DEV     accepted for uniformity (sd-noise runs no model)\n"
	       "  -v, --verbose        report each frame on standard error\n"
	       "  -h, --help           display this help and exit\n"
	       "      --version        output version information and exit\n"
	       "\n"
	       "Example: sd-noise -m tiny -W 64 -H 64 --seed 1234 | sd-unet-step -m tiny -c cond.st\n",
	       sd_prog, sd_prog);
	exit(0);
}

/* -v: the library's remarks, as progress lines. */
static void note(void *user, const char *msg)
{
	(void)user;
	sd_info("%s", msg);
}

int main(int argc, char **argv)
{
	enum { OPT_CONFIG = 256, OPT_DEVICE, OPT_SEED, OPT_STRENGTH, OPT_SAMPLER, OPT_STEPS, OPT_KARRAS,
	       OPT_NO_KARRAS, OPT_ETA, OPT_SPACING, OPT_VERSION };
	static const struct option longopts[] = {
		{"model", required_argument, NULL, 'm'},
		{"config", required_argument, NULL, OPT_CONFIG},
		{"device", required_argument, NULL, OPT_DEVICE},
		{"width", required_argument, NULL, 'W'},
		{"height", required_argument, NULL, 'H'},
		{"batch", required_argument, NULL, 'b'},
		{"seed", required_argument, NULL, OPT_SEED},
		{"strength", required_argument, NULL, OPT_STRENGTH},
		{"sampler", required_argument, NULL, OPT_SAMPLER},
		{"steps", required_argument, NULL, OPT_STEPS},
		{"karras", no_argument, NULL, OPT_KARRAS},
		{"no-karras", no_argument, NULL, OPT_NO_KARRAS},
		{"eta", required_argument, NULL, OPT_ETA},
		{"spacing", required_argument, NULL, OPT_SPACING},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, OPT_VERSION},
		{NULL, 0, NULL, 0},
	};
	struct opts o = {0};
	sd_noise_job *j = &o.j;
	sd_plan_flags *pf = &j->plan;
	pf->karras = -1;
	int c;
	enum sd_sampler_kind kind;

	sd_cli_init(argc, argv);
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":m:W:H:b:vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'm': o.model = optarg; break;
		case OPT_CONFIG: o.config = optarg; break;
		case OPT_DEVICE: o.device = optarg; break;
		case 'W': j->width = (int)sd_parse_int("--width", optarg, 1, 1 << 16); break;
		case 'H': j->height = (int)sd_parse_int("--height", optarg, 1, 1 << 16); break;
		case 'b': j->batch = (int)sd_parse_int("--batch", optarg, 1, 4096); break;
		case OPT_SEED: j->seed = (uint64_t)sd_parse_int("--seed", optarg, 0, INT64_MAX); j->has_seed = 1; break;
		case OPT_STRENGTH: j->strength = sd_parse_float("--strength", optarg, 0, 1); o.has_strength = 1; break;
		case OPT_SAMPLER:
			if (sd_sampler_parse(optarg, &kind)) sd_usage_error("--sampler: %s", sd_errmsg());
			pf->sampler = sd_sampler_name(kind);
			break;
		case OPT_STEPS: pf->steps = (int)sd_parse_int("--steps", optarg, 1, 1000); break;
		case OPT_KARRAS: pf->karras = 1; break;
		case OPT_NO_KARRAS: pf->karras = 0; break;
		case OPT_ETA: pf->eta = sd_parse_float("--eta", optarg, 0, 1e6); pf->has_eta = 1; break;
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
	o.file = optind < argc ? argv[optind] : NULL;
	if (o.has_strength && (j->width || j->height || j->batch))
		sd_usage_error("-W, -H and --batch make text-to-image noise; with --strength the latent's shape is used");
	if (o.has_strength && !o.file) o.file = "-";
	if (!j->batch) j->batch = 1;
	const char *env = getenv("SD_MODEL");
	if (!o.model && !(env && *env)) sd_usage_error("no model: give -m MODEL or set SD_MODEL");
	if (o.model && !*o.model) sd_usage_error("--model: the path is empty");
	enum sd_device dev;
	if (sd_device_parse(o.device, &dev) < 0) sd_usage_error("--device: %s", sd_errmsg());

	sd_model *m = sd_model_open(o.model, o.config);
	if (!m) sd_die("%s", sd_errmsg());
	sd_geometry g = {0};
	j->geometry = &g;
	j->sched_json = sd_model_scheduler_json(m);
	j->note = note;
	if (!o.has_strength) {
		if (sd_model_geometry(m, &g)) sd_die("%s", sd_errmsg());
		int def = g.sample_size ? g.sample_size * g.factor : 512;
		if (!j->width) j->width = def;
		if (!j->height) j->height = def;
		if (j->width % g.factor || j->height % g.factor)
			sd_usage_error("the size %dx%d is not a multiple of the VAE's factor %d", j->width, j->height, g.factor);
		sd_info("%s: latent %d channels, factor %d, image %dx%d", sd_model_path(m), g.channels, g.factor,
		        j->width, j->height);
	}
	if (pf->sampler || pf->steps || pf->karras > 0 || pf->has_eta) {
		/* check the combination once, before any frame is read */
		char *cj = sd_sched_config_spacing(sd_model_scheduler_json(m), pf->spacing);
		if (!cj) sd_die_lib("%s: scheduler config", sd_model_path(m));
		sd_sched *t = sd_sched_new(cj, pf->sampler ? kind : SD_SAMPLER_PNDM, pf->steps ? pf->steps : 50, pf->karras,
		                           pf->has_eta ? pf->eta : 0);
		if (!t && pf->sampler) sd_usage_error("%s", sd_errmsg());
		sd_sched_free(t);
		free(cj);
	}

	if (!o.file) { /* a source: one frame */
		sd_value *frame = sd_value_map();
		if (!frame) sd_die_lib("frame");
		if (sd_noise_txt2img(j, frame, "sd-noise", 0)) sd_die("%s", sd_errmsg());
		sd_write_frame_or_die(frame);
		sd_value_free(frame);
	} else {
		const char *name = !strcmp(o.file, "-") ? "stdin" : o.file;
		FILE *in = sd_open_in(o.file);
		sd_reader *r = sd_reader_new(in, name);
		if (!r) sd_die_lib("%s", name);
		sd_value *frame;
		long nframes = 0;
		int rc;
		while ((rc = sd_reader_next(r, &frame)) == 1) {
			long idx = sd_reader_index(r);
			int bad = o.has_strength ? sd_noise_img2img(j, frame, name, idx) : sd_noise_txt2img(j, frame, name, idx);
			if (bad) sd_die("%s", sd_errmsg());
			sd_write_frame_or_die(frame);
			sd_value_free(frame);
			nframes++;
		}
		if (rc < 0) sd_die("%s", sd_errmsg());
		if (nframes == 0) sd_die("%s: no frames on input", name);
		sd_reader_free(r);
	}
	sd_model_close(m);
	sd_close_stdout();
	return 0;
}
