/*
 * sd-unet-step - denoise latents with the UNet and a sampler (see sd-unet-step(1)).  A filter:
 *
 *   sd-tokenize "a photo of a cat" | sd-text-encode -m MODEL > cond.st
 *   sd-noise -m MODEL --seed 1 | sd-unet-step -m MODEL -c cond.st | sd-vae-decode -m MODEL | tensortopnm
 *
 * The denoising loop of diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline: per step,
 * x_in = scheduler.scale_model_input(latent), the UNet on the batch [x_in, x_in] with the contexts
 * [uncond_context, context] (classifier-free guidance, uncond first), guided = u + g·(c − u), then
 * scheduler.step (lib/models/sampler.c), with the frame's torch generator for the samplers that draw.
 * The frame's "sampler" map is the plan (sampler, steps, the step reached, the sampler's history): it is
 * read, continued and written back with the generator, so K calls of one step each give the same bytes
 * as one call of K steps.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "sd.h"
#include "sd_cli.h"

struct opts {
	const char *model, *config, *device, *cond;
	const char *sampler;  /* NULL = from the plan */
	const char *spacing;  /* NULL = from the plan, else the model's scheduler config */
	int steps;            /* 0 = from the plan */
	int karras;           /* -1 from the plan, 0 --no-karras, 1 --karras */
	int has_eta, has_guidance, has_seed, has_predict;
	double eta, guidance, predict;
	uint64_t seed;
	int count;            /* 0 = every remaining step */
	const char **lora;    /* --lora PATH[:SCALE], repeatable */
	int nlora;
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

/* ==== conditioning ==== */

struct cond {
	sd_value **frames;
	long n;
};

static void read_cond(const char *path, struct cond *cd)
{
	FILE *f = sd_open_in(path);
	sd_reader *r = sd_reader_new(f, path);
	if (!r) sd_die_lib("%s", path);
	sd_value *fr;
	int rc;
	while ((rc = sd_reader_next(r, &fr)) == 1) {
		sd_value **p = realloc(cd->frames, (size_t)(cd->n + 1) * sizeof *p);
		if (!p) sd_die("out of memory");
		cd->frames = p;
		cd->frames[cd->n++] = fr;
	}
	if (rc < 0) sd_die("%s", sd_errmsg());
	if (cd->n == 0) sd_die("%s: no frames in the conditioning stream", path);
	sd_reader_free(r);
	if (f != stdin) fclose(f);
}

/*
 * A context for a batch of B latents as f32 [B,L,D] (a new tensor): the frame's key when it has B rows,
 * each row repeated B/n times when it has n (diffusers' num_images_per_prompt order), NULL when absent.
 */
static sd_tensor *batch_context(const sd_value *cf, const char *key, int64_t B, const char *where)
{
	const sd_value *v = sd_map_get(cf, key);
	if (!v) return NULL;
	char s[64];
	if (v->type != SD_V_TENSOR) sd_die("%s: \"%s\" is not a tensor", where, key);
	const sd_tensor *t = v->u.t;
	if (!sd_dtype_is_float(t->dtype) || t->ndim != 3 || sd_tensor_numel(t) == 0)
		sd_die("%s: \"%s\" is %s %s, expected f32 [N,77,D] (sd-text-encode makes it)", where, key,
		       sd_dtype_name(t->dtype), sd_shape_str(t->ndim, t->shape, s, sizeof s));
	int64_t n = t->shape[0];
	if (B % n)
		sd_die("%s: \"%s\" holds %lld prompts for a batch of %lld latents (want 1, %lld or a divisor)", where, key,
		       (long long)n, (long long)B, (long long)B);
	sd_tensor *f = sd_tensor_convert(t, SD_DTYPE_F32);
	sd_tensor *out = f ? sd_tensor_newv(SD_DTYPE_F32, 3, B, t->shape[1], t->shape[2]) : NULL;
	if (!out) sd_die_lib("%s", where);
	size_t row = (size_t)(t->shape[1] * t->shape[2]);
	for (int64_t b = 0; b < B; b++)
		memcpy((float *)out->data + b * row, (const float *)f->data + (b / (B / n)) * row, row * sizeof(float));
	sd_tensor_free(f);
	return out;
}

/* ==== the plan ==== */

struct plan {
	enum sd_sampler_kind kind;
	int steps, karras, started;
	double eta, guidance;
	char *spacing;       /* NULL = the model's config (malloc'd) */
};

/* Flags, else the frame's plan, else diffusers' defaults; a started plan must not be contradicted. */
static void resolve_plan(const struct opts *o, const sd_value *pm, struct plan *p, const char *where)
{
	p->started = pm && sd_map_get(pm, "step") != NULL;
	const char *nm = pm ? sd_map_str(pm, "name") : NULL;
	enum sd_sampler_kind fk = SD_SAMPLER_PNDM;
	if (nm && sd_sampler_parse(nm, &fk)) sd_die_lib("%s: the plan", where);
	if (!nm && pm && sd_map_get(pm, "name")) sd_die("%s: the plan's \"name\" is not a string", where);
	int64_t st = 0;
	int r = pm ? sd_map_get_int(pm, "steps", &st) : 1;
	if (r < 0 || (r == 0 && (st < 1 || st > 100000))) sd_die("%s: the plan's \"steps\" is not a step count", where);
	const sd_value *kv = pm ? sd_map_get(pm, "karras") : NULL;
	int fkarras = kv && kv->type == SD_V_BOOL ? kv->u.b : -1;
	double feta = 0, fg = 7.5;
	if (pm && (sd_map_get_float(pm, "eta", &feta) < 0 || sd_map_get_float(pm, "guidance", &fg) < 0))
		sd_die("%s: the plan: %s", where, sd_errmsg());
	const char *fsp = pm ? sd_map_str(pm, "spacing") : NULL;
	if (fsp && sd_spacing_check(fsp)) sd_die_lib("%s: the plan", where);
	if (p->started) {
		if (o->spacing && strcmp(o->spacing, fsp ? fsp : ""))
			sd_die("%s: --spacing %s: the frame's plan has begun with %s spacing", where, o->spacing,
			       fsp ? fsp : "the model's");
		if (!nm || r != 0) sd_die("%s: the plan has run but names no sampler and steps", where);
		if (o->sampler && strcmp(o->sampler, sd_sampler_name(fk)))
			sd_die("%s: --sampler %s: the frame's plan is %s and has begun", where, o->sampler, sd_sampler_name(fk));
		if (o->steps && o->steps != st)
			sd_die("%s: --steps %d: the frame's plan has %lld steps and has begun", where, o->steps, (long long)st);
		if (o->karras >= 0 && fkarras >= 0 && o->karras != fkarras)
			sd_die("%s: --%skarras: the frame's plan has begun %s Karras sigmas", where, o->karras ? "" : "no-",
			       fkarras ? "with" : "without");
	}
	if (o->sampler) sd_sampler_parse(o->sampler, &p->kind);
	else p->kind = fk;
	p->steps = o->steps ? o->steps : r == 0 ? (int)st : 50;
	p->karras = o->karras >= 0 ? o->karras : fkarras;
	p->eta = o->has_eta ? o->eta : feta;
	p->guidance = o->has_guidance ? o->guidance : fg;
	/* a copy: the plan's own string goes when the plan is rewritten */
	if ((o->spacing || fsp) && !(p->spacing = strdup(o->spacing ? o->spacing : fsp))) sd_die("out of memory");
}

/* ==== the UNet with guidance ==== */

struct run {
	sd_unet *unet;
	sd_tensor *ctx2;   /* [uncond; cond] (2B,L,D) with guidance, else cond (B,L,D) */
	sd_tensor *xin;    /* (2B|B, C, h, w) the UNet's input */
	sd_tensor *eps;    /* (2B|B, C, h, w) its output */
	int cfg;
};

/* The model's output for latent x (B,C,h,w) at timestep t, unguided: the conditional half and, with
 * guidance, the unconditional one (both in r->eps).  x must already be scaled (scale_model_input). */
static int unet_pass(struct run *r, const sd_tensor *x, float t)
{
	size_t n = sd_tensor_nbytes(x);
	memcpy(r->xin->data, x->data, n);
	if (r->cfg) memcpy((char *)r->xin->data + n, x->data, n);
	return sd_unet_forward(r->unet, NULL, r->eps, r->xin, &t, 1, r->ctx2);
}

/* guided = u + g·(c − u), in diffusers' order of float32 operations. */
static void guide(float *out, const sd_tensor *eps, int64_t n, float g)
{
	const float *u = eps->data, *c = (const float *)eps->data + n;
	for (int64_t k = 0; k < n; k++) {
		float d = c[k] - u[k];
		float m = g * d;
		out[k] = u[k] + m;
	}
}

/* ==== main ==== */

static sd_tensor *frame_latent(const sd_value *frame, const sd_unet_config *uc, const char *where)
{
	const sd_value *v = sd_map_get(frame, "latent");
	if (!v) sd_die("%s: no \"latent\" key (sd-noise makes it)", where);
	if (v->type != SD_V_TENSOR) sd_die("%s: \"latent\" is not a tensor", where);
	const sd_tensor *t = v->u.t;
	char s[64];
	if (!sd_dtype_is_float(t->dtype) || t->ndim != 4 || sd_tensor_numel(t) == 0)
		sd_die("%s: \"latent\" is %s %s, expected f32 [N,%d,h,w]", where, sd_dtype_name(t->dtype),
		       sd_shape_str(t->ndim, t->shape, s, sizeof s), uc->in_channels);
	if (t->shape[1] != uc->in_channels)
		sd_die("%s: the latent has %lld channels, the model expects %d", where, (long long)t->shape[1],
		       uc->in_channels);
	sd_tensor *x = sd_tensor_convert(t, SD_DTYPE_F32);
	if (!x) sd_die_lib("%s", where);
	return x;
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
	o.karras = -1;
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
		case 'c': o.cond = optarg; break;
		case OPT_SAMPLER:
			if (sd_sampler_parse(optarg, &kind)) sd_usage_error("--sampler: %s", sd_errmsg());
			o.sampler = sd_sampler_name(kind);
			break;
		case OPT_STEPS: o.steps = (int)sd_parse_int("--steps", optarg, 1, 1000); break;
		case OPT_KARRAS: o.karras = 1; break;
		case OPT_NO_KARRAS: o.karras = 0; break;
		case OPT_ETA: o.eta = sd_parse_float("--eta", optarg, 0, 1e6); o.has_eta = 1; break;
		case 'g': o.guidance = sd_parse_float("--guidance", optarg, 0, 1e6); o.has_guidance = 1; break;
		case 'k': o.count = (int)sd_parse_int("--count", optarg, 1, 100000); break;
		case OPT_SEED: o.seed = (uint64_t)sd_parse_int("--seed", optarg, 0, INT64_MAX); o.has_seed = 1; break;
		case OPT_PREDICT: o.predict = sd_parse_float("--predict", optarg, 0, 1e6); o.has_predict = 1; break;
		case OPT_LORA: o.lora[o.nlora++] = optarg; break;
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
	if (o.has_predict && o.count) sd_usage_error("--predict takes no step: --count does not apply");
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
	const char *sched_json = sd_model_scheduler_json(m);
	if (o.sampler || o.steps || o.karras > 0 || o.has_eta) {
		/* a bad combination of flags is a usage error, found before the model is loaded */
		char *cj = sd_sched_config_spacing(sched_json, o.spacing);
		if (!cj) sd_die_lib("%s: scheduler config", sd_model_path(m));
		sd_sched *t = sd_sched_new(cj, o.sampler ? kind : SD_SAMPLER_PNDM, o.steps ? o.steps : 50,
		                           o.karras, o.has_eta ? o.eta : 0);
		if (!t && (o.sampler || !(o.karras > 0 || o.has_eta))) sd_usage_error("%s", sd_errmsg());
		sd_sched_free(t);
		free(cj);
	}
	struct cond cd = {0};
	if (o.cond) read_cond(o.cond, &cd);
	if (!sd_model_has(m, SD_UNET)) sd_die("%s: the model has no UNet", sd_model_path(m));
	sd_weights *w = sd_weights_load(m, SD_UNET, dev);
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

	const char *path = optind < argc ? argv[optind] : NULL;
	const char *name = !path || !strcmp(path, "-") ? "stdin" : path;
	FILE *in = sd_open_in(path);
	sd_reader *rd = sd_reader_new(in, name);
	if (!rd) sd_die_lib("%s", name);
	sd_value *frame;
	long nframes = 0;
	int rc;
	while ((rc = sd_reader_next(rd, &frame)) == 1) {
		long idx = sd_reader_index(rd);
		char where[512];
		snprintf(where, sizeof where, "%s: frame %ld", name, idx);
		sd_tensor *x = frame_latent(frame, uc, where);
		const int64_t B = x->shape[0], n = sd_tensor_numel(x);

		/* the plan */
		sd_value *pm = sd_map_get(frame, "sampler");
		if (pm && pm->type != SD_V_MAP) sd_die("%s: \"sampler\" is not a map", where);
		struct plan p = {0};
		resolve_plan(&o, pm, &p, where);

		/* the conditioning: -c (one frame for all, or one each), else the frame's own */
		const sd_value *cf = frame;
		char cwhere[600];
		snprintf(cwhere, sizeof cwhere, "%s", where);
		if (cd.n) {
			if (cd.n > 1 && idx >= cd.n)
				sd_die("%s: %s holds %ld conditioning frames, fewer than the input", where, o.cond, cd.n);
			cf = cd.frames[cd.n == 1 ? 0 : idx];
			snprintf(cwhere, sizeof cwhere, "%s: frame %ld", o.cond, cd.n == 1 ? 0L : idx);
		}
		struct run r = {unet, NULL, NULL, NULL, 0};
		sd_tensor *ctx = batch_context(cf, "context", B, cwhere);
		if (!ctx)
			sd_die("%s: no \"context\" key (sd-text-encode makes it; give it with -c COND or in the frame)", cwhere);
		sd_tensor *unc = p.guidance > 1 ? batch_context(cf, "uncond_context", B, cwhere) : NULL;
		if (p.guidance > 1 && !unc) sd_info("%s: no \"uncond_context\": no classifier-free guidance", cwhere);
		r.cfg = unc != NULL;
		if (r.cfg) {
			if (unc->shape[1] != ctx->shape[1] || unc->shape[2] != ctx->shape[2])
				sd_die("%s: \"uncond_context\" [%lld,%lld] and \"context\" [%lld,%lld] differ in shape", cwhere,
				       (long long)unc->shape[1], (long long)unc->shape[2], (long long)ctx->shape[1],
				       (long long)ctx->shape[2]);
			r.ctx2 = sd_tensor_newv(SD_DTYPE_F32, 3, 2 * B, ctx->shape[1], ctx->shape[2]);
			if (!r.ctx2) sd_die_lib("%s", where);
			memcpy(r.ctx2->data, unc->data, sd_tensor_nbytes(unc));
			memcpy((char *)r.ctx2->data + sd_tensor_nbytes(unc), ctx->data, sd_tensor_nbytes(ctx));
			sd_tensor_free(unc);
			sd_tensor_free(ctx);
		} else {
			r.ctx2 = ctx;
		}
		int64_t bshape[4] = {(r.cfg ? 2 : 1) * B, x->shape[1], x->shape[2], x->shape[3]};
		r.xin = sd_tensor_new(SD_DTYPE_F32, 4, bshape);
		r.eps = sd_tensor_new(SD_DTYPE_F32, 4, bshape);
		if (!r.xin || !r.eps) sd_die_lib("%s", where);

		if (o.has_predict) {
			/* the raw model output at T: no scaling, no guidance, no step */
			if (unet_pass(&r, x, (float)o.predict)) sd_die_lib("%s", where);
			sd_tensor *e = sd_tensor_new(SD_DTYPE_F32, 4, x->shape), *u = NULL;
			if (!e) sd_die_lib("%s", where);
			memcpy(e->data, (float *)r.eps->data + (r.cfg ? n : 0), (size_t)n * sizeof(float));
			if (r.cfg) {
				if (!(u = sd_tensor_new(SD_DTYPE_F32, 4, x->shape))) sd_die_lib("%s", where);
				memcpy(u->data, r.eps->data, (size_t)n * sizeof(float));
			}
			if (sd_map_set_tensor(frame, "eps", e) || (u && sd_map_set_tensor(frame, "uncond_eps", u)))
				sd_die_lib("%s", where);
			sd_info("frame %ld: model output at timestep %g%s", idx, o.predict, r.cfg ? " (and unconditional)" : "");
			sd_tensor_free(x);
		} else {
			char *cj = sd_sched_config_spacing(sched_json, p.spacing);
			sd_sched *s = cj ? sd_sched_new(cj, p.kind, p.steps, p.karras, p.eta) : NULL;
			if (!s) sd_die_lib("%s: the plan", where);
			free(cj);
			if (p.started && sd_sched_load(s, pm)) sd_die_lib("%s", where);
			int calls = sd_sched_calls(s), i0 = sd_sched_index(s);
			if (i0 >= calls)
				sd_die("%s: the plan is finished (%s, %d of %d steps done): nothing to run", where,
				       sd_sampler_name(p.kind), i0, calls);
			if (!p.started) {
				/* pure noise, as diffusers' prepare_latents leaves it: × init_noise_sigma */
				float sig = sd_sched_init_noise_sigma(s);
				float *xv = x->data;
				for (int64_t k = 0; k < n; k++) xv[k] = xv[k] * sig;
			}
			int stochastic = p.kind == SD_SAMPLER_EULER_A || p.kind == SD_SAMPLER_DDPM ||
			                 (p.kind == SD_SAMPLER_DDIM && p.eta > 0);
			sd_rng rng;
			int has_rng = 0;
			const sd_value *gv = sd_map_get(frame, "generator");
			if (gv) {
				if (sd_rng_from_value(&rng, gv)) sd_die_lib("%s", where);
				has_rng = 1;
			} else if (o.has_seed) {
				sd_rng_seed(&rng, o.seed);
				has_rng = 1;
			}
			if (stochastic && !has_rng)
				sd_die("%s: %s adds noise at every step: the frame has no \"generator\" (sd-noise --seed "
				       "starts one) and no --seed was given", where, sd_sampler_name(p.kind));
			int i1 = o.count && i0 + o.count < calls ? i0 + o.count : calls;
			sd_tensor *xs = sd_tensor_new(SD_DTYPE_F32, 4, x->shape);
			sd_tensor *g = r.cfg ? sd_tensor_new(SD_DTYPE_F32, 4, x->shape) : NULL;
			if (!xs || (r.cfg && !g)) sd_die_lib("%s", where);
			for (int i = i0; i < i1; i++) {
				double t1 = sd_now();
				float t = (float)sd_sched_timestep(s, i);
				if (sd_sched_scale_model_input(s, xs, x, i) || unet_pass(&r, xs, t)) sd_die_lib("%s: step %d", where, i);
				const sd_tensor *mo = r.eps; /* without guidance: B rows, the latent's shape */
				if (r.cfg) {
					guide(g->data, r.eps, n, (float)p.guidance);
					mo = g;
				}
				if (sd_sched_step(s, x, mo, i, NULL, has_rng ? &rng : NULL, NULL)) sd_die_lib("%s", where);
				sd_info("frame %ld: step %d/%d, timestep %g, %.3f s", idx, i + 1, calls, t, sd_now() - t1);
			}
			sd_tensor_free(xs);
			sd_tensor_free(g);
			if (!pm) {
				if (sd_map_set(frame, "sampler", sd_value_map())) sd_die_lib("%s", where);
				pm = sd_map_get(frame, "sampler");
			}
			/* the same key order whichever call wrote the plan last (a loop of single steps gives the
			 * bytes of one call): the sampler's keys, its history, then ours */
			static const char *const ours[] = {"guidance", "spacing", "calls", "finished"};
			for (size_t k = 0; k < sizeof ours / sizeof *ours; k++) sd_map_del(pm, ours[k]);
			if (sd_sched_save(s, pm) || sd_map_set_float(pm, "guidance", p.guidance) ||
			    (p.spacing && sd_map_set_str(pm, "spacing", p.spacing)) ||
			    sd_map_set_int(pm, "calls", calls) || sd_map_set(pm, "finished", sd_value_bool(i1 >= calls)))
				sd_die_lib("%s", where);
			if (has_rng && sd_map_set(frame, "generator", sd_rng_to_value(&rng))) sd_die_lib("%s", where);
			if (sd_map_set_tensor(frame, "latent", x)) sd_die_lib("%s", where);
			sd_sched_free(s);
		}
		free(p.spacing);
		sd_tensor_free(r.ctx2);
		sd_tensor_free(r.xin);
		sd_tensor_free(r.eps);
		sd_frame_note_generation(frame, cf, o.model, (const char *const *)o.lora, o.nlora);
		sd_write_frame_or_die(frame);
		sd_value_free(frame);
		nframes++;
	}
	if (rc < 0) sd_die("%s", sd_errmsg());
	if (nframes == 0) sd_die("%s: no frames on input", name);
	if (cd.n > 1 && nframes != cd.n)
		sd_die("%s: %s holds %ld conditioning frames for %ld input frames", name, o.cond, cd.n, nframes);
	sd_reader_free(rd);
	for (long i = 0; i < cd.n; i++) sd_value_free(cd.frames[i]);
	free(cd.frames);
	sd_unet_free(unet);
	sd_lora_free(lora);
	free(o.lora);
	sd_weights_free(w);
	sd_model_close(m);
	sd_info("%ld frame%s", nframes, nframes == 1 ? "" : "s");
	sd_close_stdout();
	return 0;
}
