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
 * generator state ("generator") and the plan ("sampler") that sd-unet-step carries on.
 */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#include "sd.h"
#include "sd_cli.h"

struct opts {
	const char *model, *config, *device;
	int width, height, batch;    /* 0 = not given */
	int has_seed;
	uint64_t seed;
	int has_strength;
	double strength;
	const char *sampler;         /* NULL = not given */
	const char *spacing;         /* NULL = not given (the model's scheduler config) */
	int steps;                   /* 0 = not given */
	int karras;                  /* -1 not given, 0 --no-karras, 1 --karras */
	int has_eta;
	double eta;
	const char *file;            /* NULL = source (text to image without input) */
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

/* A seed nobody chose: 63 random bits (recorded in the frame, so the run can be repeated). */
static uint64_t random_seed(void)
{
	uint64_t s = 0;
	if (getrandom(&s, sizeof s, 0) != (ssize_t)sizeof s) s = (uint64_t)time(NULL) ^ ((uint64_t)clock() << 32);
	return s & (uint64_t)INT64_MAX;
}

/* The frame's generator: restarted from --seed, else continued, else seeded at random (*seed_out). */
static void frame_rng(const struct opts *o, const sd_value *frame, sd_rng *rng, const char *name, long idx)
{
	const sd_value *g = sd_map_get(frame, "generator");
	if (o->has_seed) {
		sd_rng_seed(rng, o->seed);
	} else if (g) {
		if (sd_rng_from_value(rng, g)) sd_die_lib("%s: frame %ld", name, idx);
	} else {
		uint64_t s = random_seed();
		sd_rng_seed(rng, s);
		sd_info("frame %ld: seed %llu", idx, (unsigned long long)s);
	}
}

/* Set the plan's "seed" from the generator's. */
static void plan_seed(sd_value *plan, const sd_rng *rng)
{
	if (rng->seed <= INT64_MAX) sd_map_set_int(plan, "seed", (int64_t)rng->seed);
}

/* The frame's "sampler" map, created when absent (borrowed). */
static sd_value *frame_plan(sd_value *frame, const char *name, long idx)
{
	sd_value *p = sd_map_get(frame, "sampler");
	if (p && p->type != SD_V_MAP) sd_die("%s: frame %ld: \"sampler\" is not a map", name, idx);
	if (!p) {
		if (sd_map_set(frame, "sampler", sd_value_map())) sd_die_lib("%s: frame %ld", name, idx);
		p = sd_map_get(frame, "sampler");
	}
	return p;
}

/* Text to image: latent = randn([B, C, H/f, W/f]) in one draw, the plan with nothing run yet. */
static void txt2img(const struct opts *o, const sd_geometry *g, sd_value *frame, const char *name, long idx)
{
	if (sd_map_get(frame, "latent"))
		sd_die("%s: frame %ld: the frame already has a \"latent\" (give --strength to noise it for image "
		       "to image)", name, idx);
	sd_rng rng;
	frame_rng(o, frame, &rng, name, idx);
	int64_t shape[4] = {o->batch, g->channels, o->height / g->factor, o->width / g->factor};
	sd_tensor *lat = sd_tensor_new(SD_DTYPE_F32, 4, shape);
	if (!lat) sd_die_lib("%s: frame %ld", name, idx);
	sd_rng_randn(&rng, lat->data, sd_tensor_numel(lat));
	sd_value *plan = frame_plan(frame, name, idx);
	if (sd_map_get(plan, "step"))
		sd_die("%s: frame %ld: the frame's sampler plan has already run", name, idx);
	if (o->sampler && sd_map_set_str(plan, "name", o->sampler)) sd_die_lib("%s", name);
	if (o->steps && sd_map_set_int(plan, "steps", o->steps)) sd_die_lib("%s", name);
	if (o->karras >= 0 && sd_map_set(plan, "karras", sd_value_bool(o->karras))) sd_die_lib("%s", name);
	if (o->has_eta && sd_map_set_float(plan, "eta", o->eta)) sd_die_lib("%s", name);
	if (o->spacing && sd_map_set_str(plan, "spacing", o->spacing)) sd_die_lib("%s", name);
	plan_seed(plan, &rng);
	if (sd_map_set_tensor(frame, "latent", lat) || sd_map_set(frame, "generator", sd_rng_to_value(&rng)))
		sd_die_lib("%s: frame %ld", name, idx);
	char s[64];
	sd_info("frame %ld: noise %s, seed %llu", idx, sd_shape_str(4, shape, s, sizeof s), (unsigned long long)rng.seed);
}

/* Image to image: noise the frame's clean latent to the start step of the plan. */
static void img2img(const struct opts *o, const char *sched_json, sd_value *frame, const char *name, long idx)
{
	sd_value *lv = sd_map_get(frame, "latent");
	if (!lv) sd_die("%s: frame %ld: no \"latent\" key (sd-vae-encode makes it from an image)", name, idx);
	if (lv->type != SD_V_TENSOR) sd_die("%s: frame %ld: \"latent\" is not a tensor", name, idx);
	const sd_tensor *x0 = lv->u.t;
	char s[64];
	if (!sd_dtype_is_float(x0->dtype) || x0->ndim != 4 || sd_tensor_numel(x0) == 0)
		sd_die("%s: frame %ld: \"latent\" is %s %s, expected f32 [N,4,h,w]", name, idx, sd_dtype_name(x0->dtype),
		       sd_shape_str(x0->ndim, x0->shape, s, sizeof s));
	sd_tensor *lat = sd_tensor_convert(x0, SD_DTYPE_F32), *noise = sd_tensor_new(SD_DTYPE_F32, x0->ndim, x0->shape);
	if (!lat || !noise) sd_die_lib("%s: frame %ld", name, idx);

	/* the plan: flags, else an unstarted plan the frame carries, else diffusers' defaults */
	sd_value *plan = frame_plan(frame, name, idx);
	int64_t st;
	if (sd_map_get(plan, "step"))
		sd_die("%s: frame %ld: the latent is already being sampled (its plan has run); --strength wants a "
		       "clean latent", name, idx);
	const char *sname = o->sampler ? o->sampler : sd_map_str(plan, "name") ? sd_map_str(plan, "name") : "pndm";
	int steps = o->steps;
	if (!steps) {
		int r = sd_map_get_int(plan, "steps", &st);
		if (r < 0 || (r == 0 && (st < 1 || st > 100000)))
			sd_die("%s: frame %ld: the plan's \"steps\" is not a step count", name, idx);
		steps = r == 0 ? (int)st : 50;
	}
	int karras = o->karras;
	const sd_value *kv = sd_map_get(plan, "karras");
	if (karras < 0 && kv && kv->type == SD_V_BOOL) karras = kv->u.b;
	double eta = 0;
	if (o->has_eta) eta = o->eta;
	else if (sd_map_get_float(plan, "eta", &eta) < 0) sd_die("%s: frame %ld: the plan's \"eta\" is not a number", name, idx);
	const char *spacing = o->spacing ? o->spacing : sd_map_str(plan, "spacing");
	enum sd_sampler_kind kind;
	if (sd_sampler_parse(sname, &kind)) sd_die_lib("%s: frame %ld: the plan", name, idx);
	char *cj = sd_sched_config_spacing(sched_json, spacing);
	sd_sched *sch = cj ? sd_sched_new(cj, kind, steps, karras, eta) : NULL;
	if (!sch) sd_die_lib("%s: frame %ld", name, idx);
	free(cj);
	int begin = sd_sched_strength_begin(sch, o->strength);
	if (begin < 0) sd_die_lib("%s: frame %ld: --strength", name, idx);

	/* diffusers: noise = randn_tensor(init_latents.shape, generator) after the posterior sample */
	sd_rng rng;
	frame_rng(o, frame, &rng, name, idx);
	sd_rng_randn(&rng, noise->data, sd_tensor_numel(noise));
	if (sd_sched_add_noise(sch, lat, lat, noise, begin) || sd_sched_set_begin(sch, begin) || sd_sched_save(sch, plan))
		sd_die_lib("%s: frame %ld", name, idx);
	if (sd_map_set_float(plan, "strength", o->strength) || (o->spacing && sd_map_set_str(plan, "spacing", o->spacing)))
		sd_die_lib("%s", name);
	plan_seed(plan, &rng);
	if (sd_map_set_tensor(frame, "latent", lat) || sd_map_set(frame, "generator", sd_rng_to_value(&rng)))
		sd_die_lib("%s: frame %ld", name, idx);
	sd_info("frame %ld: %s, %d steps, strength %g: noised to timestep %g, %d of %d model calls left", idx,
	        sd_sampler_name(kind), steps, o->strength, sd_sched_timestep(sch, begin), sd_sched_calls(sch) - begin,
	        sd_sched_calls(sch));
	sd_tensor_free(noise);
	sd_sched_free(sch);
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
	o.karras = -1;
	int c;
	enum sd_sampler_kind kind;

	sd_cli_init(argc, argv);
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":m:W:H:b:vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'm': o.model = optarg; break;
		case OPT_CONFIG: o.config = optarg; break;
		case OPT_DEVICE: o.device = optarg; break;
		case 'W': o.width = (int)sd_parse_int("--width", optarg, 1, 1 << 16); break;
		case 'H': o.height = (int)sd_parse_int("--height", optarg, 1, 1 << 16); break;
		case 'b': o.batch = (int)sd_parse_int("--batch", optarg, 1, 4096); break;
		case OPT_SEED: o.seed = (uint64_t)sd_parse_int("--seed", optarg, 0, INT64_MAX); o.has_seed = 1; break;
		case OPT_STRENGTH: o.strength = sd_parse_float("--strength", optarg, 0, 1); o.has_strength = 1; break;
		case OPT_SAMPLER:
			if (sd_sampler_parse(optarg, &kind)) sd_usage_error("--sampler: %s", sd_errmsg());
			o.sampler = sd_sampler_name(kind);
			break;
		case OPT_STEPS: o.steps = (int)sd_parse_int("--steps", optarg, 1, 1000); break;
		case OPT_KARRAS: o.karras = 1; break;
		case OPT_NO_KARRAS: o.karras = 0; break;
		case OPT_ETA: o.eta = sd_parse_float("--eta", optarg, 0, 1e6); o.has_eta = 1; break;
		case OPT_SPACING:
			if (sd_spacing_check(optarg)) sd_usage_error("--spacing: %s", sd_errmsg());
			o.spacing = optarg;
			break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case OPT_VERSION: sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}
	if (argc - optind > 1) sd_usage_error("too many files (one stream at a time)");
	o.file = optind < argc ? argv[optind] : NULL;
	if (o.has_strength && (o.width || o.height || o.batch))
		sd_usage_error("-W, -H and --batch make text-to-image noise; with --strength the latent's shape is used");
	if (o.has_strength && !o.file) o.file = "-";
	if (!o.batch) o.batch = 1;
	const char *env = getenv("SD_MODEL");
	if (!o.model && !(env && *env)) sd_usage_error("no model: give -m MODEL or set SD_MODEL");
	if (o.model && !*o.model) sd_usage_error("--model: the path is empty");
	enum sd_device dev;
	if (sd_device_parse(o.device, &dev) < 0) sd_usage_error("--device: %s", sd_errmsg());

	sd_model *m = sd_model_open(o.model, o.config);
	if (!m) sd_die("%s", sd_errmsg());
	sd_geometry g = {0};
	if (!o.has_strength) {
		if (sd_model_geometry(m, &g)) sd_die("%s", sd_errmsg());
		int def = g.sample_size ? g.sample_size * g.factor : 512;
		if (!o.width) o.width = def;
		if (!o.height) o.height = def;
		if (o.width % g.factor || o.height % g.factor)
			sd_usage_error("the size %dx%d is not a multiple of the VAE's factor %d", o.width, o.height, g.factor);
		sd_info("%s: latent %d channels, factor %d, image %dx%d", sd_model_path(m), g.channels, g.factor,
		        o.width, o.height);
	}
	if (o.sampler || o.steps || o.karras > 0 || o.has_eta) {
		/* check the combination once, before any frame is read */
		char *cj = sd_sched_config_spacing(sd_model_scheduler_json(m), o.spacing);
		if (!cj) sd_die_lib("%s: scheduler config", sd_model_path(m));
		sd_sched *t = sd_sched_new(cj, o.sampler ? kind : SD_SAMPLER_PNDM, o.steps ? o.steps : 50, o.karras,
		                           o.has_eta ? o.eta : 0);
		if (!t && o.sampler) sd_usage_error("%s", sd_errmsg());
		sd_sched_free(t);
		free(cj);
	}

	if (!o.file) { /* a source: one frame */
		sd_value *frame = sd_value_map();
		if (!frame) sd_die_lib("frame");
		txt2img(&o, &g, frame, "sd-noise", 0);
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
			if (o.has_strength) img2img(&o, sd_model_scheduler_json(m), frame, name, idx);
			else txt2img(&o, &g, frame, name, idx);
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
