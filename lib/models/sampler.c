/*
 * sampler.c - the noise schedulers of diffusers 0.25 as Stable Diffusion pipelines use them:
 * PNDMScheduler (PLMS with skip_prk_steps, and the PRK warm-up without it), DDIMScheduler, DDPMScheduler,
 * EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler (DPM++ 2M) and
 * LMSDiscreteScheduler (diffusers/schedulers/scheduling_*.py), configured from a scheduler_config.json the
 * way from_config resolves it (each class's own defaults for absent keys, foreign keys ignored).
 *
 * Numbers follow diffusers' own precision: the training schedule and every step in float32 as torch
 * computes it (0-dim float32 tensors for the coefficients, one rounding per torch op, in diffusers' order
 * of operations); timesteps and sigma tables in float64 as numpy computes them, rounded where diffusers
 * rounds.  This file must be compiled without floating-point contraction (GCC's default under -std=c11),
 * except where torch itself uses an FMA (the vectorised linspace of the betas), written out with fmaf.
 *
 * The scheduler's running state (the step reached, PNDM's ets, DPM-Solver's previous model outputs, LMS's
 * derivatives) can be written into a frame's sampler map and read back, so a run split over processes is
 * bit-identical to one run.
 */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sd.h"

/* ==== names ==== */

static const char *const kind_names[SD_SAMPLER_COUNT] = {
	[SD_SAMPLER_PNDM] = "pndm",
	[SD_SAMPLER_DDIM] = "ddim",
	[SD_SAMPLER_DDPM] = "ddpm",
	[SD_SAMPLER_EULER] = "euler",
	[SD_SAMPLER_EULER_A] = "euler_a",
	[SD_SAMPLER_DPMPP_2M] = "dpmpp_2m",
	[SD_SAMPLER_LMS] = "lms",
};

static const struct {
	const char *name;
	enum sd_sampler_kind kind;
} aliases[] = {
	{"plms", SD_SAMPLER_PNDM},
	{"euler_ancestral", SD_SAMPLER_EULER_A},
	{"dpm++2m", SD_SAMPLER_DPMPP_2M},
	{"dpm++_2m", SD_SAMPLER_DPMPP_2M},
	{"dpmpp2m", SD_SAMPLER_DPMPP_2M},
};

const char *sd_sampler_name(enum sd_sampler_kind k)
{
	return (unsigned)k < SD_SAMPLER_COUNT ? kind_names[k] : "?";
}

int sd_sampler_parse(const char *name, enum sd_sampler_kind *out)
{
	if (!name) name = "";
	for (int k = 0; k < SD_SAMPLER_COUNT; k++)
		if (strcmp(name, kind_names[k]) == 0) { *out = (enum sd_sampler_kind)k; return 0; }
	for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++)
		if (strcmp(name, aliases[i].name) == 0) { *out = aliases[i].kind; return 0; }
	return sd_seterr("unknown sampler '%s' (known: pndm, ddim, ddpm, euler, euler_a, dpmpp_2m, lms)", name);
}

/* ==== configuration ==== */

/* diffusers' SD 1.x scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5). */
static const char sd15_config[] =
	"{\"_class_name\": \"PNDMScheduler\", \"beta_start\": 0.00085, \"beta_end\": 0.012, "
	"\"beta_schedule\": \"scaled_linear\", \"num_train_timesteps\": 1000, \"set_alpha_to_one\": false, "
	"\"skip_prk_steps\": true, \"steps_offset\": 1, \"trained_betas\": null, \"clip_sample\": false}";

enum pred { PRED_EPSILON, PRED_V, PRED_SAMPLE };
enum spacing { SPACING_LEADING, SPACING_TRAILING, SPACING_LINSPACE };

typedef struct sched_cfg {
	int n_train;
	double beta_start, beta_end;
	enum { BETAS_LINEAR, BETAS_SCALED_LINEAR, BETAS_COSINE, BETAS_TRAINED } beta_schedule;
	float *trained; /* n_train entries when BETAS_TRAINED */
	enum pred pred;
	enum spacing spacing;
	int steps_offset;
	int set_alpha_to_one;    /* PNDM, DDIM */
	int skip_prk;            /* PNDM */
	int clip_sample;         /* DDIM, DDPM */
	double clip_range;
	int var_large;           /* DDPM variance_type fixed_large */
	int karras;              /* Euler, DPM, LMS */
	int has_sigma_min, has_sigma_max; /* Euler */
	double sigma_min, sigma_max;
	int solver_order;        /* DPM */
	int dpm_pp;              /* algorithm_type dpmsolver++ (1) or dpmsolver (0) */
	int heun;                /* solver_type heun (1) or midpoint (0) */
	int lower_order_final, euler_at_final;
	double lambda_min_clipped;
} sched_cfg;

/* Bits of which scheduler class accepts which config key (from_config ignores the others). */
enum {
	K_PNDM = 1 << SD_SAMPLER_PNDM, K_DDIM = 1 << SD_SAMPLER_DDIM, K_DDPM = 1 << SD_SAMPLER_DDPM,
	K_EULER = 1 << SD_SAMPLER_EULER, K_EULER_A = 1 << SD_SAMPLER_EULER_A, K_DPM = 1 << SD_SAMPLER_DPMPP_2M,
	K_LMS = 1 << SD_SAMPLER_LMS,
};

/* The value of `key` when `kind` accepts it and it is present and not null, else NULL. */
static json_t *cfg_get(json_t *root, enum sd_sampler_kind kind, unsigned accepted, const char *key)
{
	if (!(accepted & (1u << kind))) return NULL;
	json_t *v = json_object_get(root, key);
	return v && !json_is_null(v) ? v : NULL;
}

static int cfg_num(json_t *root, enum sd_sampler_kind kind, unsigned acc, const char *key, double *out)
{
	json_t *v = cfg_get(root, kind, acc, key);
	if (!v) return 0;
	if (!json_is_number(v)) return sd_seterr("scheduler config: '%s' must be a number", key);
	*out = json_number_value(v);
	return 0;
}

static int cfg_int(json_t *root, enum sd_sampler_kind kind, unsigned acc, const char *key, int *out)
{
	json_t *v = cfg_get(root, kind, acc, key);
	if (!v) return 0;
	if (!json_is_integer(v)) return sd_seterr("scheduler config: '%s' must be an integer", key);
	json_int_t i = json_integer_value(v);
	if (i < -1000000000 || i > 1000000000) return sd_seterr("scheduler config: '%s' out of range", key);
	*out = (int)i;
	return 0;
}

static int cfg_bool(json_t *root, enum sd_sampler_kind kind, unsigned acc, const char *key, int *out)
{
	json_t *v = cfg_get(root, kind, acc, key);
	if (!v) return 0;
	if (!json_is_boolean(v)) return sd_seterr("scheduler config: '%s' must be true or false", key);
	*out = json_is_true(v);
	return 0;
}

/* The string value, or `def` when absent; NULL (with a message) when of another type. */
static const char *cfg_str(json_t *root, enum sd_sampler_kind kind, unsigned acc, const char *key, const char *def)
{
	json_t *v = cfg_get(root, kind, acc, key);
	if (!v) return def;
	if (!json_is_string(v)) { sd_seterr("scheduler config: '%s' must be a string", key); return NULL; }
	return json_string_value(v);
}

/* Python's json writes NaN, Infinity and -Infinity (DPM-Solver's lambda_min_clipped), which jansson
 * refuses: blank them to null outside string literals.  Returns a malloc'd copy. */
static char *json_sanitize(const char *text)
{
	size_t n = strlen(text), k = 0;
	char *s = malloc(n * 2 + 1); /* "NaN" (3 bytes) becomes "null" (4): the output can grow */
	if (!s) return NULL;
	int in_str = 0;
	for (size_t i = 0; i < n; i++) {
		if (in_str) {
			if (text[i] == '\\' && i + 1 < n) s[k++] = text[i++];
			else if (text[i] == '"') in_str = 0;
			s[k++] = text[i];
			continue;
		}
		if (text[i] == '"') in_str = 1;
		static const char *const words[] = {"-Infinity", "Infinity", "NaN"};
		int hit = 0;
		for (int w = 0; w < 3 && !hit; w++) {
			size_t l = strlen(words[w]);
			if (strncmp(text + i, words[w], l) == 0) {
				memcpy(s + k, "null", 4);
				k += 4;
				i += l - 1;
				hit = 1;
			}
		}
		if (!hit) s[k++] = text[i];
	}
	s[k] = 0;
	return s;
}

/* Resolve the configuration of `kind` from the JSON text (NULL = the SD 1.x config). */
static int cfg_parse(sched_cfg *c, const char *text, enum sd_sampler_kind kind)
{
	const unsigned ALL = 0x7f;
	memset(c, 0, sizeof *c);
	c->n_train = 1000;
	c->beta_start = 0.0001;
	c->beta_end = 0.02;
	c->spacing = (kind == SD_SAMPLER_PNDM || kind == SD_SAMPLER_DDIM || kind == SD_SAMPLER_DDPM)
		? SPACING_LEADING : SPACING_LINSPACE;
	c->set_alpha_to_one = kind == SD_SAMPLER_DDIM;
	c->clip_sample = 1;
	c->clip_range = 1.0;
	c->solver_order = 2;
	c->dpm_pp = 1;
	c->lower_order_final = 1;
	c->lambda_min_clipped = -INFINITY;

	char *clean = json_sanitize(text ? text : sd15_config);
	if (!clean) return sd_seterr("out of memory");
	json_error_t jerr;
	json_t *root = json_loads(clean, 0, &jerr);
	free(clean);
	if (!root) return sd_seterr("scheduler config: line %d: %s", jerr.line, jerr.text);
	if (!json_is_object(root)) { json_decref(root); return sd_seterr("scheduler config: not a JSON object"); }

	int rc = -1, flag;
	const char *s;
	if (cfg_int(root, kind, ALL, "num_train_timesteps", &c->n_train) ||
	    cfg_num(root, kind, ALL, "beta_start", &c->beta_start) ||
	    cfg_num(root, kind, ALL, "beta_end", &c->beta_end) ||
	    cfg_int(root, kind, ALL, "steps_offset", &c->steps_offset) ||
	    cfg_bool(root, kind, K_PNDM | K_DDIM, "set_alpha_to_one", &c->set_alpha_to_one) ||
	    cfg_bool(root, kind, K_PNDM, "skip_prk_steps", &c->skip_prk) ||
	    cfg_bool(root, kind, K_DDIM | K_DDPM, "clip_sample", &c->clip_sample) ||
	    cfg_num(root, kind, K_DDIM | K_DDPM, "clip_sample_range", &c->clip_range) ||
	    cfg_bool(root, kind, K_EULER | K_DPM | K_LMS, "use_karras_sigmas", &c->karras) ||
	    cfg_int(root, kind, K_DPM, "solver_order", &c->solver_order) ||
	    cfg_bool(root, kind, K_DPM, "lower_order_final", &c->lower_order_final) ||
	    cfg_bool(root, kind, K_DPM, "euler_at_final", &c->euler_at_final) ||
	    cfg_num(root, kind, K_DPM, "lambda_min_clipped", &c->lambda_min_clipped))
		goto out;
	if (c->n_train < 2 || c->n_train > 100000) {
		sd_seterr("scheduler config: num_train_timesteps %d out of range", c->n_train);
		goto out;
	}
	if (cfg_get(root, kind, K_EULER, "sigma_min")) {
		c->has_sigma_min = 1;
		if (cfg_num(root, kind, K_EULER, "sigma_min", &c->sigma_min)) goto out;
	}
	if (cfg_get(root, kind, K_EULER, "sigma_max")) {
		c->has_sigma_max = 1;
		if (cfg_num(root, kind, K_EULER, "sigma_max", &c->sigma_max)) goto out;
	}

	if (!(s = cfg_str(root, kind, ALL, "beta_schedule", "linear"))) goto out;
	if (!strcmp(s, "linear")) c->beta_schedule = BETAS_LINEAR;
	else if (!strcmp(s, "scaled_linear")) c->beta_schedule = BETAS_SCALED_LINEAR;
	else if (!strcmp(s, "squaredcos_cap_v2")) c->beta_schedule = BETAS_COSINE;
	else { sd_seterr("scheduler config: beta_schedule '%s' is not supported", s); goto out; }

	json_t *tb = cfg_get(root, kind, ALL, "trained_betas");
	if (tb) {
		if (!json_is_array(tb) || json_array_size(tb) != (size_t)c->n_train) {
			sd_seterr("scheduler config: trained_betas must be an array of num_train_timesteps numbers");
			goto out;
		}
		c->trained = malloc((size_t)c->n_train * sizeof *c->trained);
		if (!c->trained) { sd_seterr("out of memory"); goto out; }
		for (int i = 0; i < c->n_train; i++) {
			json_t *e = json_array_get(tb, (size_t)i);
			if (!json_is_number(e)) { sd_seterr("scheduler config: trained_betas[%d] is not a number", i); goto out; }
			c->trained[i] = (float)json_number_value(e);
		}
		c->beta_schedule = BETAS_TRAINED;
	}

	if (!(s = cfg_str(root, kind, ALL, "prediction_type", "epsilon"))) goto out;
	if (!strcmp(s, "epsilon")) c->pred = PRED_EPSILON;
	else if (!strcmp(s, "v_prediction")) c->pred = PRED_V;
	else if (!strcmp(s, "sample") || (!strcmp(s, "original_sample") && kind == SD_SAMPLER_EULER)) c->pred = PRED_SAMPLE;
	else { sd_seterr("scheduler config: prediction_type '%s' is not supported", s); goto out; }
	if (kind == SD_SAMPLER_PNDM && c->pred == PRED_SAMPLE) {
		sd_seterr("scheduler config: pndm supports prediction_type epsilon and v_prediction only");
		goto out;
	}

	if (!(s = cfg_str(root, kind, ALL, "timestep_spacing", "default"))) goto out;
	if (strcmp(s, "default")) {
		if (!strcmp(s, "leading")) c->spacing = SPACING_LEADING;
		else if (!strcmp(s, "trailing")) c->spacing = SPACING_TRAILING;
		else if (!strcmp(s, "linspace")) c->spacing = SPACING_LINSPACE;
		else { sd_seterr("scheduler config: timestep_spacing '%s' is not supported", s); goto out; }
	}

	flag = 0;
	if (cfg_bool(root, kind, K_DDIM | K_DDPM | K_DPM, "thresholding", &flag)) goto out;
	if (flag) { sd_seterr("scheduler config: thresholding is not supported"); goto out; }
	flag = 0;
	if (cfg_bool(root, kind, K_DDIM | K_DDPM | K_EULER | K_EULER_A, "rescale_betas_zero_snr", &flag)) goto out;
	if (flag) { sd_seterr("scheduler config: rescale_betas_zero_snr is not supported"); goto out; }
	flag = 0;
	if (cfg_bool(root, kind, K_DPM, "use_lu_lambdas", &flag)) goto out;
	if (flag) { sd_seterr("scheduler config: use_lu_lambdas is not supported"); goto out; }

	if (!(s = cfg_str(root, kind, K_DDPM, "variance_type", "fixed_small"))) goto out;
	if (kind == SD_SAMPLER_DDPM) {
		if (!strcmp(s, "fixed_small")) c->var_large = 0;
		else if (!strcmp(s, "fixed_large")) c->var_large = 1;
		else { sd_seterr("scheduler config: ddpm variance_type '%s' is not supported", s); goto out; }
	}
	if (cfg_get(root, kind, K_DPM, "variance_type")) {
		sd_seterr("scheduler config: dpmpp_2m with a learned variance_type is not supported");
		goto out;
	}
	if (!(s = cfg_str(root, kind, K_EULER, "interpolation_type", "linear"))) goto out;
	if (strcmp(s, "linear")) { sd_seterr("scheduler config: interpolation_type '%s' is not supported", s); goto out; }
	if (!(s = cfg_str(root, kind, K_EULER, "timestep_type", "discrete"))) goto out;
	if (strcmp(s, "discrete")) { sd_seterr("scheduler config: timestep_type '%s' is not supported", s); goto out; }
	if (!(s = cfg_str(root, kind, K_DPM, "algorithm_type", "dpmsolver++"))) goto out;
	if (!strcmp(s, "dpmsolver++")) c->dpm_pp = 1;
	else if (!strcmp(s, "dpmsolver")) c->dpm_pp = 0;
	else { sd_seterr("scheduler config: algorithm_type '%s' is not supported", s); goto out; }
	if (!(s = cfg_str(root, kind, K_DPM, "solver_type", "midpoint"))) goto out;
	if (!strcmp(s, "midpoint")) c->heun = 0;
	else if (!strcmp(s, "heun")) c->heun = 1;
	else { sd_seterr("scheduler config: solver_type '%s' is not supported", s); goto out; }
	if (kind == SD_SAMPLER_DPMPP_2M && (c->solver_order < 1 || c->solver_order > 2)) {
		sd_seterr("scheduler config: solver_order %d is not supported (1 or 2)", c->solver_order);
		goto out;
	}
	rc = 0;
out:
	json_decref(root);
	return rc;
}

/* ==== the training schedule ==== */

/*
 * torch.linspace(start, end, n, dtype=float32) on the CPU, bit for bit: step in float, the first half
 * counted from start and the second from end, in vectors of 8 (Vectorized::arange, which torch's AVX2
 * build evaluates with FMAs) two at a time, the tail element by element.
 */
static void torch_linspace_f32(float start, float end, int n, float *out)
{
	if (n == 1) { out[0] = start; return; }
	const float step = (end - start) / (float)(n - 1);
	const int half = n / 2;
	int i = 0, idx = 0;
	for (; i <= n - 16; i += 16)
		for (int v = 0; v < 2; v++, idx += 8) {
			float base = idx < half ? fmaf(step, (float)idx, start) : fmaf(-step, (float)(n - idx - 1), end);
			for (int k = 0; k < 8; k++) out[idx + k] = fmaf((float)k, step, base);
		}
	for (; i < n; i++) out[i] = i < half ? start + step * (float)i : end - step * (float)(n - i - 1);
}

/* betas (float32) as the scheduler's __init__ makes them; alphas_cumprod by torch.cumprod, which
 * accumulates in double on the CPU and rounds each output to float. */
static void make_schedule(const sched_cfg *c, float *betas, float *alphas, float *acp)
{
	int n = c->n_train;
	switch (c->beta_schedule) {
	case BETAS_LINEAR:
		torch_linspace_f32((float)c->beta_start, (float)c->beta_end, n, betas);
		break;
	case BETAS_SCALED_LINEAR:
		torch_linspace_f32((float)sqrt(c->beta_start), (float)sqrt(c->beta_end), n, betas);
		for (int i = 0; i < n; i++) betas[i] = betas[i] * betas[i];
		break;
	case BETAS_COSINE: /* betas_for_alpha_bar, "cosine" (GLIDE), in double then float32 */
		for (int i = 0; i < n; i++) {
			double t1 = (double)i / n, t2 = (double)(i + 1) / n;
			double a1 = cos((t1 + 0.008) / 1.008 * M_PI / 2), a2 = cos((t2 + 0.008) / 1.008 * M_PI / 2);
			double b = 1 - (a2 * a2) / (a1 * a1);
			betas[i] = (float)(b < 0.999 ? b : 0.999);
		}
		break;
	case BETAS_TRAINED:
		memcpy(betas, c->trained, (size_t)n * sizeof *betas);
		break;
	}
	double acc = 1.0;
	for (int i = 0; i < n; i++) {
		alphas[i] = 1.0f - betas[i];
		acc *= alphas[i];
		acp[i] = (float)acc;
	}
}

/* ==== numpy helpers (float64) ==== */

/* np.linspace(a, b, n): a + i·((b−a)/(n−1)), the last one exactly b. */
static void np_linspace(double a, double b, int n, double *out)
{
	if (n == 1) { out[0] = a; return; }
	double step = (b - a) / (n - 1);
	for (int i = 0; i < n; i++) out[i] = (double)i * step + a;
	out[n - 1] = b;
}

/* np.arange(start, stop, step) for floats: length ceil((stop−start)/step), values start, start+step,
 * then start + i·d with d = (start+step) − start (numpy's fill).  Returns the length (≤ cap). */
static int np_arange(double start, double stop, double step, double *out, int cap)
{
	double len = ceil((stop - start) / step);
	int n = len > 0 ? (int)(len < cap ? len : cap) : 0;
	if (n > 0) out[0] = start;
	if (n > 1) out[1] = start + step;
	double d = (start + step) - start;
	for (int i = 2; i < n; i++) out[i] = start + (double)i * d;
	return n;
}

/* np.round: half to even. */
static double np_round(double x) { return nearbyint(x); }

/* np.interp(x, arange(n), fp) with fp float32 (evaluated in double). */
static double np_interp(double x, const float *fp, int n)
{
	if (x < 0) return fp[0];
	if (x >= n - 1) return fp[n - 1];
	int j = (int)floor(x);
	if (j >= n - 1) j = n - 2;
	if ((double)j == x) return fp[j];
	double slope = ((double)fp[j + 1] - (double)fp[j]) / ((double)(j + 1) - (double)j);
	double r = slope * (x - j) + fp[j];
	if (isnan(r)) r = slope * (x - (j + 1)) + fp[j + 1];
	return r;
}

/* The Karras et al. (2022) schedule between sigma_max and sigma_min, rho 7 (float64). */
static void karras_sigmas(double smin, double smax, int n, double *out)
{
	const double rho = 7.0;
	double min_inv = pow(smin, 1 / rho), max_inv = pow(smax, 1 / rho);
	np_linspace(0, 1, n, out);
	for (int i = 0; i < n; i++) out[i] = pow(max_inv + out[i] * (min_inv - max_inv), rho);
}

/* _sigma_to_t: the fractional training timestep of sigma, interpolating log sigma linearly between the
 * two neighbouring entries of log_sigmas (float32, ascending with t). */
static double sigma_to_t(double sigma, const float *log_sigmas, int n)
{
	double ls = log(sigma > 1e-10 ? sigma : 1e-10);
	int low = 0;
	for (int i = 0; i < n; i++)
		if (ls - (double)log_sigmas[i] >= 0) low = i; /* argmax of the cumulative count: last such i */
	if (low > n - 2) low = n - 2;
	double lo = log_sigmas[low], hi = log_sigmas[low + 1];
	double w = (lo - ls) / (lo - hi);
	if (w < 0) w = 0;
	if (w > 1) w = 1;
	return (1 - w) * low + w * (low + 1);
}

/* ==== the scheduler ==== */

#define MAX_HIST 4

struct sd_sched {
	enum sd_sampler_kind kind;
	sched_cfg c;
	int steps;      /* num_inference_steps asked for */
	int karras;     /* resolved */
	double eta;     /* DDIM */
	float *betas, *alphas, *acp; /* [n_train] */
	float final_acp;             /* PNDM, DDIM: alphas_cumprod[-1 step] */
	int ncalls;                  /* len(timesteps) */
	double *ts;                  /* [ncalls] */
	float *sigmas;               /* [ncalls + 1] for euler, euler_a, lms, dpm; NULL otherwise */
	float init_sigma;
	int prk_count;               /* PNDM without skip_prk_steps: number of PRK calls at the start */
	double *prk_ts;              /* [prk_count] */

	/* running state */
	int begin, index;            /* first step of this run, next step */
	sd_tensor *hist[MAX_HIST];   /* PNDM ets / DPM model_outputs / LMS derivatives, oldest first */
	int nhist;
	sd_tensor *cur_sample;       /* PNDM */
	sd_tensor *cur_mo;           /* PNDM PRK accumulator (NULL = 0) */
	int lower_order_nums;        /* DPM */
};

static void state_clear(sd_sched *s)
{
	for (int i = 0; i < MAX_HIST; i++) { sd_tensor_free(s->hist[i]); s->hist[i] = NULL; }
	s->nhist = 0;
	sd_tensor_free(s->cur_sample);
	sd_tensor_free(s->cur_mo);
	s->cur_sample = s->cur_mo = NULL;
	s->lower_order_nums = 0;
}

void sd_sched_free(sd_sched *s)
{
	if (!s) return;
	state_clear(s);
	free(s->c.trained);
	free(s->betas);
	free(s->alphas);
	free(s->acp);
	free(s->ts);
	free(s->sigmas);
	free(s->prk_ts);
	free(s);
}

/* Integer timesteps of DDIM, DDPM and PNDM's base list (descending for DDIM/DDPM). */
static int int_timesteps(const sched_cfg *c, int steps, double *out)
{
	int n = c->n_train;
	if (c->spacing == SPACING_LINSPACE) {
		np_linspace(0, n - 1, steps, out);
		for (int i = 0; i < steps; i++) out[i] = np_round(out[i]);
	} else if (c->spacing == SPACING_LEADING) {
		int ratio = n / steps;
		for (int i = 0; i < steps; i++) out[i] = (double)i * ratio + c->steps_offset;
	} else {
		double tmp[steps + 1];
		int m = np_arange(n, 0, -((double)n / steps), tmp, steps + 1);
		if (m != steps) return sd_seterr("%d steps: trailing spacing gives %d timesteps", steps, m);
		for (int i = 0; i < steps; i++) out[i] = np_round(tmp[steps - 1 - i]) - 1; /* ascending */
	}
	return 0;
}

/* PNDM's set_timesteps: _timesteps ascending, then the PRK and PLMS lists. */
static int pndm_timesteps(sd_sched *s)
{
	const sched_cfg *c = &s->c;
	int N = s->steps;
	double *base = malloc((size_t)N * sizeof *base);
	if (!base) return sd_seterr("out of memory");
	if (int_timesteps(c, N, base)) { free(base); return -1; }
	if (c->skip_prk) {
		/* concat(_t[:-1], _t[-2:-1], _t[-1:])[::-1]: the second-to-last entry twice */
		s->ncalls = N == 1 ? 1 : N + 1;
		s->ts = malloc((size_t)s->ncalls * sizeof *s->ts);
		if (!s->ts) { free(base); return sd_seterr("out of memory"); }
		double *fw = malloc((size_t)s->ncalls * sizeof *fw);
		if (!fw) { free(base); return sd_seterr("out of memory"); }
		int k = 0;
		for (int i = 0; i < N - 1; i++) fw[k++] = base[i];
		if (N >= 2) fw[k++] = base[N - 2];
		fw[k++] = base[N - 1];
		for (int i = 0; i < k; i++) s->ts[i] = fw[k - 1 - i];
		free(fw);
	} else {
		if (N < 4) { free(base); return sd_seterr("pndm with PRK warm-up (skip_prk_steps false) needs at least 4 steps"); }
		int half = c->n_train / N / 2;
		double rep[8], prk[12];
		for (int i = 0; i < 4; i++) { rep[2 * i] = base[N - 4 + i]; rep[2 * i + 1] = base[N - 4 + i] + half; }
		/* rep[:-1].repeat(2)[1:-1], reversed */
		double r2[14];
		for (int i = 0; i < 7; i++) r2[2 * i] = r2[2 * i + 1] = rep[i];
		for (int i = 0; i < 12; i++) prk[i] = r2[12 - i];
		s->prk_count = 12;
		s->prk_ts = malloc(12 * sizeof *s->prk_ts);
		s->ncalls = 12 + N - 3;
		s->ts = malloc((size_t)s->ncalls * sizeof *s->ts);
		if (!s->prk_ts || !s->ts) { free(base); return sd_seterr("out of memory"); }
		memcpy(s->prk_ts, prk, sizeof prk);
		memcpy(s->ts, prk, sizeof prk);
		for (int i = 0; i < N - 3; i++) s->ts[12 + i] = base[N - 4 - i];
	}
	free(base);
	return 0;
}

/* DDIM and DDPM: descending integer timesteps. */
static int ddim_timesteps(sd_sched *s)
{
	int N = s->steps;
	s->ncalls = N;
	s->ts = malloc((size_t)N * sizeof *s->ts);
	if (!s->ts) return sd_seterr("out of memory");
	double *tmp = malloc((size_t)N * sizeof *tmp);
	if (!tmp) return sd_seterr("out of memory");
	int rc = int_timesteps(&s->c, N, tmp);
	for (int i = 0; rc == 0 && i < N; i++) s->ts[i] = tmp[N - 1 - i];
	free(tmp);
	return rc;
}

/* sigmas of the training schedule, ((1 − ᾱ)/ᾱ)^½ in float32 (ascending with t), and their logs. */
static int train_sigmas(const sd_sched *s, float **sig, float **logsig)
{
	int n = s->c.n_train;
	*sig = malloc((size_t)n * sizeof **sig);
	*logsig = malloc((size_t)n * sizeof **logsig);
	if (!*sig || !*logsig) { free(*sig); free(*logsig); return sd_seterr("out of memory"); }
	for (int i = 0; i < n; i++) {
		(*sig)[i] = sqrtf((1.0f - s->acp[i]) / s->acp[i]);
		(*logsig)[i] = logf((*sig)[i]);
	}
	return 0;
}

/* Euler, Euler ancestral and LMS: float timesteps and sigmas interpolated on the training sigmas (or
 * Karras sigmas and their fractional timesteps), then a final 0. */
static int euler_timesteps(sd_sched *s)
{
	const sched_cfg *c = &s->c;
	int N = s->steps, n = c->n_train;
	double *ts = malloc((size_t)(N + 1) * sizeof *ts), *sg = malloc((size_t)N * sizeof *sg);
	float *tsig = NULL, *logsig = NULL;
	if (!ts || !sg) { free(ts); free(sg); return sd_seterr("out of memory"); }
	if (c->spacing == SPACING_LINSPACE) {
		np_linspace(0, n - 1, N, ts);
		for (int i = 0; i < N / 2; i++) { double t = ts[i]; ts[i] = ts[N - 1 - i]; ts[N - 1 - i] = t; }
	} else if (c->spacing == SPACING_LEADING) {
		int ratio = n / N;
		for (int i = 0; i < N; i++) ts[i] = (double)(N - 1 - i) * ratio;
	} else {
		int m = np_arange(n, 0, -((double)n / N), ts, N + 1);
		if (m != N) { free(ts); free(sg); return sd_seterr("%d steps: trailing spacing gives %d timesteps", N, m); }
		for (int i = 0; i < N; i++) ts[i] = np_round(ts[i]);
	}
	/* astype(np.float32), then the offset (leading: += steps_offset; trailing: -= 1) in float32 */
	for (int i = 0; i < N; i++) {
		float t = (float)ts[i];
		if (c->spacing == SPACING_LEADING) t += (float)c->steps_offset;
		else if (c->spacing == SPACING_TRAILING) t -= 1.0f;
		ts[i] = t;
	}
	if (train_sigmas(s, &tsig, &logsig)) { free(ts); free(sg); return -1; }
	for (int i = 0; i < N; i++) sg[i] = np_interp(ts[i], tsig, n);
	if (s->karras) {
		double smin = c->has_sigma_min ? c->sigma_min : sg[N - 1];
		double smax = c->has_sigma_max ? c->sigma_max : sg[0];
		karras_sigmas(smin, smax, N, sg);
		for (int i = 0; i < N; i++) {
			double t = sigma_to_t(sg[i], logsig, n);
			/* Euler casts its timesteps to float32; LMS keeps float64 */
			ts[i] = s->kind == SD_SAMPLER_LMS ? t : (double)(float)t;
		}
	}
	s->ncalls = N;
	s->ts = ts;
	s->sigmas = malloc((size_t)(N + 1) * sizeof *s->sigmas);
	if (!s->sigmas) { free(sg); free(tsig); free(logsig); return sd_seterr("out of memory"); }
	for (int i = 0; i < N; i++) s->sigmas[i] = (float)sg[i];
	s->sigmas[N] = 0.0f;
	/* init_noise_sigma: max sigma, or (max² + 1)^½ for leading spacing (float32) */
	float mx = 0;
	for (int i = 0; i <= N; i++) if (s->sigmas[i] > mx) mx = s->sigmas[i];
	s->init_sigma = (c->spacing == SPACING_LINSPACE || c->spacing == SPACING_TRAILING) ? mx : sqrtf(mx * mx + 1.0f);
	free(sg);
	free(tsig);
	free(logsig);
	return 0;
}

/* DPM-Solver multistep: integer timesteps (of N+1 points, the last dropped) and sigmas, whose last entry
 * is the sigma of timestep 0 (diffusers 0.25: no final sigma of zero). */
static int dpm_timesteps(sd_sched *s)
{
	const sched_cfg *c = &s->c;
	int N = s->steps, n = c->n_train;
	float *tsig = NULL, *logsig = NULL;
	if (train_sigmas(s, &tsig, &logsig)) return -1;
	/* lambda_min_clipped: searchsorted(flip(lambda_t), lambda_min_clipped) */
	int clipped = 0;
	for (int i = 0; i < n; i++) {
		float a = sqrtf(s->acp[i]), sg = sqrtf(1.0f - s->acp[i]);
		float lambda = logf(a) - logf(sg);
		if (lambda < c->lambda_min_clipped) clipped++;
	}
	int last = n - clipped;
	double *ts = malloc((size_t)(N + 2) * sizeof *ts), *sg = malloc((size_t)(N + 1) * sizeof *sg);
	if (!ts || !sg) { free(ts); free(sg); free(tsig); free(logsig); return sd_seterr("out of memory"); }
	int rc = 0;
	if (c->spacing == SPACING_LINSPACE) {
		double tmp[N + 1];
		np_linspace(0, last - 1, N + 1, tmp);
		for (int i = 0; i < N; i++) ts[i] = np_round(tmp[N - i]);
	} else if (c->spacing == SPACING_LEADING) {
		int ratio = last / (N + 1);
		for (int i = 0; i < N; i++) ts[i] = (double)(N - i) * ratio + c->steps_offset;
	} else {
		int m = np_arange(last, 0, -((double)n / N), ts, N + 2);
		if (m != N) rc = sd_seterr("%d steps: trailing spacing gives %d timesteps", N, m);
		for (int i = 0; i < m && i < N; i++) ts[i] = np_round(ts[i]) - 1;
	}
	if (rc == 0 && s->karras) {
		karras_sigmas(tsig[0], tsig[n - 1], N, sg);
		for (int i = 0; i < N; i++) ts[i] = np_round(sigma_to_t(sg[i], logsig, n));
		sg[N] = sg[N - 1];
	} else if (rc == 0) {
		for (int i = 0; i < N; i++) sg[i] = np_interp(ts[i], tsig, n);
		sg[N] = tsig[0];
	}
	if (rc == 0) {
		s->ncalls = N;
		s->ts = ts;
		ts = NULL;
		s->sigmas = malloc((size_t)(N + 1) * sizeof *s->sigmas);
		if (!s->sigmas) rc = sd_seterr("out of memory");
		for (int i = 0; rc == 0 && i <= N; i++) s->sigmas[i] = (float)sg[i];
		s->init_sigma = 1.0f;
	}
	free(ts);
	free(sg);
	free(tsig);
	free(logsig);
	return rc;
}

sd_sched *sd_sched_new(const char *config_json, enum sd_sampler_kind kind, int steps, int karras, double eta)
{
	if ((unsigned)kind >= SD_SAMPLER_COUNT) { sd_seterr("unknown sampler kind %d", (int)kind); return NULL; }
	const char *name = kind_names[kind];
	sd_sched *s = calloc(1, sizeof *s);
	if (!s) { sd_seterr("out of memory"); return NULL; }
	s->kind = kind;
	s->steps = steps;
	s->eta = eta;
	if (cfg_parse(&s->c, config_json, kind)) { sd_preerr("%s", name); goto fail; }
	if (steps < 1) { sd_seterr("%s: the number of steps must be at least 1 (got %d)", name, steps); goto fail; }
	if (steps > s->c.n_train) {
		sd_seterr("%s: %d steps exceed num_train_timesteps %d", name, steps, s->c.n_train);
		goto fail;
	}
	if (!(eta >= 0) || eta > 1e6) { sd_seterr("%s: eta must be >= 0 (got %g)", name, eta); goto fail; }
	if (eta != 0 && kind != SD_SAMPLER_DDIM) { sd_seterr("%s: eta applies to ddim only", name); goto fail; }
	int can_karras = kind == SD_SAMPLER_EULER || kind == SD_SAMPLER_DPMPP_2M || kind == SD_SAMPLER_LMS;
	if (karras > 0 && !can_karras) {
		sd_seterr("%s: Karras sigmas apply to euler, dpmpp_2m and lms only", name);
		goto fail;
	}
	s->karras = can_karras && (karras < 0 ? s->c.karras : karras > 0);

	int n = s->c.n_train;
	s->betas = malloc((size_t)n * sizeof *s->betas);
	s->alphas = malloc((size_t)n * sizeof *s->alphas);
	s->acp = malloc((size_t)n * sizeof *s->acp);
	if (!s->betas || !s->alphas || !s->acp) { sd_seterr("out of memory"); goto fail; }
	make_schedule(&s->c, s->betas, s->alphas, s->acp);
	s->final_acp = s->c.set_alpha_to_one ? 1.0f : s->acp[0];
	s->init_sigma = 1.0f;

	int rc;
	switch (kind) {
	case SD_SAMPLER_PNDM: rc = pndm_timesteps(s); break;
	case SD_SAMPLER_DDIM:
	case SD_SAMPLER_DDPM: rc = ddim_timesteps(s); break;
	case SD_SAMPLER_DPMPP_2M: rc = dpm_timesteps(s); break;
	default: rc = euler_timesteps(s); break;
	}
	if (rc) { sd_preerr("%s", name); goto fail; }
	for (int i = 0; i < s->ncalls; i++)
		if (!(s->ts[i] >= 0 && s->ts[i] <= n - 1)) {
			sd_seterr("%s: %d steps give timestep %g outside the training schedule", name, steps, s->ts[i]);
			goto fail;
		}
	return s;
fail:
	sd_sched_free(s);
	return NULL;
}

enum sd_sampler_kind sd_sched_kind(const sd_sched *s) { return s->kind; }
int sd_sched_steps(const sd_sched *s) { return s->steps; }
int sd_sched_calls(const sd_sched *s) { return s->ncalls; }
int sd_sched_karras(const sd_sched *s) { return s->karras; }
double sd_sched_eta(const sd_sched *s) { return s->eta; }
float sd_sched_init_noise_sigma(const sd_sched *s) { return s->init_sigma; }
int sd_sched_index(const sd_sched *s) { return s->index; }
int sd_sched_begin(const sd_sched *s) { return s->begin; }

double sd_sched_timestep(const sd_sched *s, int i)
{
	return i >= 0 && i < s->ncalls ? s->ts[i] : NAN;
}

float sd_sched_sigma(const sd_sched *s, int i)
{
	return s->sigmas && i >= 0 && i <= s->ncalls ? s->sigmas[i] : NAN;
}

const float *sd_sched_alphas_cumprod(const sd_sched *s, int *n)
{
	if (n) *n = s->c.n_train;
	return s->acp;
}

const float *sd_sched_betas(const sd_sched *s, int *n)
{
	if (n) *n = s->c.n_train;
	return s->betas;
}

int sd_sched_strength_begin(const sd_sched *s, double strength)
{
	if (!(strength >= 0 && strength <= 1)) return sd_seterr("strength must be in [0, 1] (got %g)", strength);
	int N = s->steps;
	int init = (int)(N * strength);
	if (init > N) init = N;
	int t_start = N - init > 0 ? N - init : 0;
	int begin = t_start * 1; /* scheduler.order is 1 for every sampler here */
	if (begin >= s->ncalls)
		return sd_seterr("strength %g with %d steps leaves no step to run", strength, N);
	return begin;
}

int sd_sched_set_begin(sd_sched *s, int i)
{
	if (i < 0 || i > s->ncalls)
		return sd_seterr("%s: step %d out of range [0, %d]", kind_names[s->kind], i, s->ncalls);
	state_clear(s);
	s->begin = s->index = i;
	return 0;
}

/* ==== elementwise work ==== */

static int check_f32(const sd_tensor *t, const char *what)
{
	if (!t) return sd_seterr("%s: missing tensor", what);
	if (t->dtype != SD_DTYPE_F32) return sd_seterr("%s: must be f32 (is %s)", what, sd_dtype_name(t->dtype));
	if (t->device != SD_DEVICE_CPU) return sd_seterr("%s: must be on the CPU", what);
	return 0;
}

static int check_like(const sd_tensor *t, const sd_tensor *x, const char *what)
{
	if (check_f32(t, what)) return -1;
	if (!sd_tensor_same_shape(t, x)) {
		char a[64], b[64];
		return sd_seterr("%s: shape %s does not match the latent's %s", what,
		                 sd_shape_str(t->ndim, t->shape, a, sizeof a), sd_shape_str(x->ndim, x->shape, b, sizeof b));
	}
	return 0;
}

static sd_tensor *dup_tensor(const sd_tensor *t)
{
	sd_tensor *d = sd_tensor_new(t->dtype, t->ndim, t->shape);
	if (d) memcpy(d->data, t->data, sd_tensor_nbytes(t));
	return d;
}

static void hist_push(sd_sched *s, sd_tensor *t, int cap)
{
	if (s->nhist == cap) {
		sd_tensor_free(s->hist[0]);
		memmove(s->hist, s->hist + 1, (size_t)(cap - 1) * sizeof *s->hist);
		s->nhist--;
	}
	s->hist[s->nhist++] = t;
}

/* The noise a stochastic step adds: `noise` when given, else randn from the generator (as diffusers'
 * randn_tensor draws it), else an error.  *buf receives a malloc'd copy when drawn. */
static const float *step_noise(const sd_sched *s, const sd_tensor *noise, sd_rng *rng, int64_t n, float **buf)
{
	*buf = NULL;
	if (noise) return noise->data;
	if (!rng) {
		sd_seterr("this step adds noise: give the noise or a generator");
		return NULL;
	}
	*buf = malloc((size_t)n * sizeof **buf);
	if (!*buf) { sd_seterr("out of memory"); return NULL; }
	sd_rng_randn(rng, *buf, n);
	return *buf;
}

int sd_sched_scale_model_input(const sd_sched *s, sd_tensor *out, const sd_tensor *x, int i)
{
	if (check_f32(x, "scale_model_input") || check_like(out, x, "scale_model_input output")) return -1;
	if (i < 0 || i >= s->ncalls) return sd_seterr("%s: step %d out of range", kind_names[s->kind], i);
	int64_t n = sd_tensor_numel(x);
	const float *xv = x->data;
	float *o = out->data;
	if (s->kind == SD_SAMPLER_EULER || s->kind == SD_SAMPLER_EULER_A || s->kind == SD_SAMPLER_LMS) {
		float sigma = s->sigmas[i];
		float d = sqrtf(sigma * sigma + 1.0f);
		for (int64_t k = 0; k < n; k++) o[k] = xv[k] / d;
	} else if (o != xv) {
		memcpy(o, xv, (size_t)n * sizeof *o);
	}
	return 0;
}

int sd_sched_add_noise(const sd_sched *s, sd_tensor *out, const sd_tensor *x0, const sd_tensor *noise, int i)
{
	if (check_f32(x0, "add_noise") || check_like(noise, x0, "add_noise noise") ||
	    check_like(out, x0, "add_noise output"))
		return -1;
	if (i < 0 || i >= s->ncalls) return sd_seterr("%s: step %d out of range", kind_names[s->kind], i);
	int64_t n = sd_tensor_numel(x0);
	const float *xv = x0->data, *e = noise->data;
	float *o = out->data;
	if (s->kind == SD_SAMPLER_EULER || s->kind == SD_SAMPLER_EULER_A || s->kind == SD_SAMPLER_LMS) {
		float sigma = s->sigmas[i];
		for (int64_t k = 0; k < n; k++) o[k] = xv[k] + e[k] * sigma;
	} else if (s->kind == SD_SAMPLER_DPMPP_2M) {
		float sigma = s->sigmas[i];
		float a = 1.0f / sqrtf(sigma * sigma + 1.0f), sg = sigma * a;
		for (int64_t k = 0; k < n; k++) o[k] = a * xv[k] + sg * e[k];
	} else {
		float ac = s->acp[(int)s->ts[i]];
		float sa = sqrtf(ac), sb = sqrtf(1.0f - ac);
		for (int64_t k = 0; k < n; k++) o[k] = sa * xv[k] + sb * e[k];
	}
	return 0;
}

/* ---- PNDM ---- */

/* _get_prev_sample: x_{t−δ} from x_t and the combined model output (formula (9) of the PNDM paper). */
static void pndm_prev(const sd_sched *s, float *out, const float *x, const float *mo, int64_t n, int t, int prev_t)
{
	float a = s->acp[t];
	float ap = prev_t >= 0 ? s->acp[prev_t] : s->final_acp;
	float b = 1.0f - a, bp = 1.0f - ap;
	float sample_coeff = sqrtf(ap / a);
	float denom = a * sqrtf(bp) + sqrtf(a * b * ap);
	float diff = ap - a;
	if (s->c.pred == PRED_V) {
		float sa = sqrtf(a), sb = sqrtf(b);
		for (int64_t k = 0; k < n; k++) {
			float m = sa * mo[k] + sb * x[k];
			out[k] = sample_coeff * x[k] - diff * m / denom;
		}
	} else {
		for (int64_t k = 0; k < n; k++) out[k] = sample_coeff * x[k] - diff * mo[k] / denom;
	}
}

static int pndm_step(sd_sched *s, float *x, const sd_tensor *mot, int64_t n)
{
	const float *mo = mot->data;
	int counter = s->index - s->begin;
	int ratio = s->c.n_train / s->steps;
	int t = (int)s->ts[s->index];
	float *comb = malloc((size_t)n * sizeof *comb);
	if (!comb) return sd_seterr("out of memory");

	if (!s->c.skip_prk && counter < s->prk_count) {
		/* step_prk: the Runge-Kutta warm-up */
		int diff = counter % 2 ? 0 : ratio / 2;
		int prev_t = t - diff;
		int tt = (int)s->prk_ts[counter / 4 * 4];
		const float *use = mo;
		if (!s->cur_mo && counter % 4 != 3) {
			if (!(s->cur_mo = sd_tensor_new(SD_DTYPE_F32, mot->ndim, mot->shape))) { free(comb); return -1; }
		}
		float *acc = s->cur_mo ? s->cur_mo->data : NULL;
		if (counter % 4 == 0) {
			for (int64_t k = 0; k < n; k++) acc[k] += (float)(1.0 / 6) * mo[k];
			sd_tensor *e = dup_tensor(mot), *cs = sd_tensor_new(SD_DTYPE_F32, mot->ndim, mot->shape);
			if (!e || !cs) { sd_tensor_free(e); sd_tensor_free(cs); free(comb); return -1; }
			memcpy(cs->data, x, (size_t)n * sizeof(float));
			hist_push(s, e, MAX_HIST);
			sd_tensor_free(s->cur_sample);
			s->cur_sample = cs;
		} else if (counter % 4 == 1 || counter % 4 == 2) {
			for (int64_t k = 0; k < n; k++) acc[k] += (float)(1.0 / 3) * mo[k];
		} else {
			for (int64_t k = 0; k < n; k++) comb[k] = (acc ? acc[k] : 0.0f) + (float)(1.0 / 6) * mo[k];
			use = comb;
			sd_tensor_free(s->cur_mo);
			s->cur_mo = NULL;
		}
		const float *cur = s->cur_sample ? s->cur_sample->data : x;
		pndm_prev(s, x, cur, use, n, tt, prev_t);
		free(comb);
		return 0;
	}

	/* step_plms */
	if (!s->c.skip_prk && s->nhist < 3) {
		free(comb);
		return sd_seterr("PLMS steps need the PRK warm-up first (begin the run at step 0)");
	}
	int prev_t = t - ratio;
	if (counter != 1) {
		sd_tensor *e = dup_tensor(mot);
		if (!e) { free(comb); return -1; }
		hist_push(s, e, MAX_HIST);
	} else {
		prev_t = t;
		t = t + ratio;
	}
	if (t >= s->c.n_train) { free(comb); return sd_seterr("timestep %d outside the training schedule", t); }
	const float *sample = x;
	float *e1 = s->nhist >= 1 ? s->hist[s->nhist - 1]->data : NULL;
	float *e2 = s->nhist >= 2 ? s->hist[s->nhist - 2]->data : NULL;
	float *e3 = s->nhist >= 3 ? s->hist[s->nhist - 3]->data : NULL;
	float *e4 = s->nhist >= 4 ? s->hist[s->nhist - 4]->data : NULL;
	sd_tensor *held = NULL;
	if (s->nhist == 1 && counter == 0) {
		memcpy(comb, mo, (size_t)n * sizeof *comb);
		sd_tensor *cs = sd_tensor_new(SD_DTYPE_F32, mot->ndim, mot->shape);
		if (!cs) { free(comb); return -1; }
		memcpy(cs->data, x, (size_t)n * sizeof(float));
		sd_tensor_free(s->cur_sample);
		s->cur_sample = cs;
	} else if (s->nhist == 1 && counter == 1) {
		if (!s->cur_sample) { free(comb); return sd_seterr("the state lacks cur_sample"); }
		for (int64_t k = 0; k < n; k++) comb[k] = (mo[k] + e1[k]) / 2.0f;
		held = s->cur_sample; /* sample = cur_sample; cur_sample = None */
		s->cur_sample = NULL;
		sample = held->data;
	} else if (s->nhist == 2) {
		for (int64_t k = 0; k < n; k++) comb[k] = (3.0f * e1[k] - e2[k]) / 2.0f;
	} else if (s->nhist == 3) {
		for (int64_t k = 0; k < n; k++) comb[k] = (23.0f * e1[k] - 16.0f * e2[k] + 5.0f * e3[k]) / 12.0f;
	} else if (s->nhist >= 4) {
		const float c24 = (float)(1.0 / 24);
		for (int64_t k = 0; k < n; k++)
			comb[k] = c24 * (55.0f * e1[k] - 59.0f * e2[k] + 37.0f * e3[k] - 9.0f * e4[k]);
	} else {
		free(comb);
		return sd_seterr("inconsistent state (no model outputs at step %d)", s->index);
	}
	pndm_prev(s, x, sample, comb, n, t, prev_t);
	sd_tensor_free(held);
	free(comb);
	return 0;
}

/* ---- DDIM ---- */

/* pred_original_sample and pred_epsilon from the model output (epsilon / v / sample). */
static void x0_eps(enum pred p, float a, float b, const float *x, const float *mo, float *x0, float *eps, int64_t n)
{
	float sa = sqrtf(a), sb = sqrtf(b);
	for (int64_t k = 0; k < n; k++) {
		if (p == PRED_EPSILON) {
			x0[k] = (x[k] - sb * mo[k]) / sa;
			if (eps) eps[k] = mo[k];
		} else if (p == PRED_V) {
			x0[k] = sa * x[k] - sb * mo[k];
			if (eps) eps[k] = sa * mo[k] + sb * x[k];
		} else {
			x0[k] = mo[k];
			if (eps) eps[k] = (x[k] - sa * x0[k]) / sb;
		}
	}
}

static void clip_x0(const sched_cfg *c, float *x0, int64_t n)
{
	if (!c->clip_sample) return;
	float r = (float)c->clip_range;
	for (int64_t k = 0; k < n; k++) x0[k] = x0[k] < -r ? -r : x0[k] > r ? r : x0[k];
}

static int ddim_step(sd_sched *s, float *x, const float *mo, int64_t n, const sd_tensor *noise, sd_rng *rng,
                     float *x0)
{
	int t = (int)s->ts[s->index];
	int prev_t = t - s->c.n_train / s->steps;
	float a = s->acp[t];
	float ap = prev_t >= 0 ? s->acp[prev_t] : s->final_acp;
	float b = 1.0f - a;
	float *eps = malloc((size_t)n * sizeof *eps);
	if (!eps) return sd_seterr("out of memory");
	x0_eps(s->c.pred, a, b, x, mo, x0, eps, n);
	clip_x0(&s->c, x0, n);
	float bp = 1.0f - ap;
	float variance = (bp / b) * (1.0f - a / ap);
	float std = (float)s->eta * sqrtf(variance);
	float dir = sqrtf(1.0f - ap - std * std);
	float sap = sqrtf(ap);
	for (int64_t k = 0; k < n; k++) x[k] = sap * x0[k] + dir * eps[k];
	free(eps);
	if (s->eta > 0) {
		float *buf;
		const float *z = step_noise(s, noise, rng, n, &buf);
		if (!z) return -1;
		for (int64_t k = 0; k < n; k++) x[k] = x[k] + std * z[k];
		free(buf);
	}
	return 0;
}

/* ---- DDPM ---- */

static int ddpm_step(sd_sched *s, float *x, const float *mo, int64_t n, const sd_tensor *noise, sd_rng *rng,
                     float *x0)
{
	int t = (int)s->ts[s->index];
	int prev_t = t - s->c.n_train / s->steps;
	float a = s->acp[t];
	float ap = prev_t >= 0 ? s->acp[prev_t] : 1.0f;
	float b = 1.0f - a, bp = 1.0f - ap;
	float cur_alpha = a / ap, cur_beta = 1.0f - cur_alpha;
	x0_eps(s->c.pred, a, b, x, mo, x0, NULL, n);
	clip_x0(&s->c, x0, n);
	float c0 = (sqrtf(ap) * cur_beta) / b;
	float c1 = sqrtf(cur_alpha) * bp / b;
	for (int64_t k = 0; k < n; k++) x[k] = c0 * x0[k] + c1 * x[k];
	if (t > 0) {
		float var;
		if (s->c.var_large) {
			var = cur_beta;
		} else {
			var = (1.0f - ap) / (1.0f - a) * (1.0f - a / ap);
			if (var < 1e-20f) var = 1e-20f;
		}
		float sd = sqrtf(var);
		float *buf;
		const float *z = step_noise(s, noise, rng, n, &buf);
		if (!z) return -1;
		for (int64_t k = 0; k < n; k++) x[k] = x[k] + sd * z[k];
		free(buf);
	}
	return 0;
}

/* ---- Euler, Euler ancestral, LMS ---- */

/* pred_original_sample of the k-diffusion samplers at sigma. */
static void k_x0(enum pred p, float sigma, const float *x, const float *mo, float *x0, int64_t n)
{
	if (p == PRED_EPSILON) {
		for (int64_t k = 0; k < n; k++) x0[k] = x[k] - sigma * mo[k];
	} else if (p == PRED_V) {
		float s2 = sigma * sigma + 1.0f;
		float c = -sigma / sqrtf(s2);
		for (int64_t k = 0; k < n; k++) x0[k] = mo[k] * c + (x[k] / s2);
	} else {
		memcpy(x0, mo, (size_t)n * sizeof *x0);
	}
}

static int euler_step(sd_sched *s, float *x, const float *mo, int64_t n, const sd_tensor *noise, sd_rng *rng,
                      float *x0)
{
	/* EulerDiscreteScheduler.step draws randn_tensor every step (used only with s_churn > 0, which
	 * pipelines never set): keep the generator stream in step with diffusers' */
	if (!noise && rng) {
		float *buf = malloc((size_t)n * sizeof *buf);
		if (!buf) return sd_seterr("out of memory");
		sd_rng_randn(rng, buf, n);
		free(buf);
	}
	float sigma = s->sigmas[s->index];
	float sigma_hat = sigma * (0.0f + 1.0f);
	if (s->c.pred == PRED_EPSILON) {
		for (int64_t k = 0; k < n; k++) x0[k] = x[k] - sigma_hat * mo[k];
	} else {
		k_x0(s->c.pred, sigma, x, mo, x0, n);
	}
	float dt = s->sigmas[s->index + 1] - sigma_hat;
	for (int64_t k = 0; k < n; k++) {
		float d = (x[k] - x0[k]) / sigma_hat;
		x[k] = x[k] + d * dt;
	}
	return 0;
}

static int euler_a_step(sd_sched *s, float *x, const float *mo, int64_t n, const sd_tensor *noise, sd_rng *rng,
                        float *x0)
{
	float sigma = s->sigmas[s->index];
	k_x0(s->c.pred, sigma, x, mo, x0, n);
	float from = sigma, to = s->sigmas[s->index + 1];
	float up = sqrtf(to * to * (from * from - to * to) / (from * from));
	float down = sqrtf(to * to - up * up);
	float dt = down - sigma;
	float *buf;
	const float *z = step_noise(s, noise, rng, n, &buf);
	if (!z) return -1;
	for (int64_t k = 0; k < n; k++) {
		float d = (x[k] - x0[k]) / sigma;
		float p = x[k] + d * dt;
		x[k] = p + z[k] * up;
	}
	free(buf);
	return 0;
}

/*
 * The LMS coefficient ∫ ∏_{k≠j} (τ − σ_{t−k}) / (σ_{t−j} − σ_{t−k}) dτ over [σ_t, σ_{t+1}]: the integral of
 * the j-th Lagrange basis polynomial (degree order−1 ≤ 3) through the last `order` sigmas.  diffusers
 * integrates it with scipy.integrate.quad; 4-point Gauss–Legendre is exact for degree ≤ 7.
 */
static double lms_coeff(const float *sig, int order, int t, int j)
{
	const double r = sqrt(6.0 / 5.0);
	const double xs[4] = {-sqrt(3.0 / 7 + 2.0 / 7 * r), -sqrt(3.0 / 7 - 2.0 / 7 * r),
	                      sqrt(3.0 / 7 - 2.0 / 7 * r), sqrt(3.0 / 7 + 2.0 / 7 * r)};
	const double ws[4] = {(18 - sqrt(30.0)) / 36, (18 + sqrt(30.0)) / 36, (18 + sqrt(30.0)) / 36,
	                      (18 - sqrt(30.0)) / 36};
	double a = sig[t], b = sig[t + 1], half = (b - a) / 2, mid = (a + b) / 2, sum = 0;
	for (int q = 0; q < 4; q++) {
		double tau = mid + half * xs[q], prod = 1.0;
		for (int k = 0; k < order; k++) {
			if (k == j) continue;
			prod *= (tau - (double)sig[t - k]) / ((double)sig[t - j] - (double)sig[t - k]);
		}
		sum += ws[q] * prod;
	}
	return sum * half;
}

static int lms_step(sd_sched *s, float *x, const float *mo, int64_t n, float *x0, const sd_tensor *like)
{
	const int max_order = 4;
	int t = s->index;
	float sigma = s->sigmas[t];
	k_x0(s->c.pred, sigma, x, mo, x0, n);
	sd_tensor *d = sd_tensor_new(SD_DTYPE_F32, like->ndim, like->shape);
	if (!d) return -1;
	float *dv = d->data;
	for (int64_t k = 0; k < n; k++) dv[k] = (x[k] - x0[k]) / sigma;
	hist_push(s, d, max_order);
	int order = t + 1 < max_order ? t + 1 : max_order;
	/* sum(coeff_j · derivative_j) over zip(coeffs, reversed(derivatives)): Python's sum from 0 */
	int m = order < s->nhist ? order : s->nhist;
	float *acc = malloc((size_t)n * sizeof *acc);
	if (!acc) return sd_seterr("out of memory");
	for (int j = 0; j < m; j++) {
		float c = (float)lms_coeff(s->sigmas, order, t, j);
		const float *dj = s->hist[s->nhist - 1 - j]->data;
		if (j == 0) for (int64_t k = 0; k < n; k++) acc[k] = c * dj[k];
		else for (int64_t k = 0; k < n; k++) acc[k] = acc[k] + c * dj[k];
	}
	for (int64_t k = 0; k < n; k++) x[k] = x[k] + acc[k];
	free(acc);
	return 0;
}

/* ---- DPM-Solver++ (2M) ---- */

static void alpha_sigma(float sigma, float *alpha_t, float *sigma_t)
{
	*alpha_t = 1.0f / sqrtf(sigma * sigma + 1.0f);
	*sigma_t = sigma * *alpha_t;
}

static int dpm_step(sd_sched *s, float *x, const sd_tensor *mot, int64_t n, float *x0out)
{
	const sched_cfg *c = &s->c;
	const float *mo = mot->data;
	int i = s->index, len = s->ncalls;
	int lower_final = i == len - 1 && (c->euler_at_final || (c->lower_order_final && len < 15));
	/* (lower_order_second only chooses between second and third order, and order is at most 2 here) */

	/* convert_model_output */
	float at, st;
	alpha_sigma(s->sigmas[i], &at, &st);
	sd_tensor *m0t = sd_tensor_new(SD_DTYPE_F32, mot->ndim, mot->shape);
	if (!m0t) return -1;
	float *m0 = m0t->data;
	if (c->dpm_pp) {
		if (c->pred == PRED_EPSILON) for (int64_t k = 0; k < n; k++) m0[k] = (x[k] - st * mo[k]) / at;
		else if (c->pred == PRED_V) for (int64_t k = 0; k < n; k++) m0[k] = at * x[k] - st * mo[k];
		else memcpy(m0, mo, (size_t)n * sizeof *m0);
	} else {
		if (c->pred == PRED_EPSILON) memcpy(m0, mo, (size_t)n * sizeof *m0);
		else if (c->pred == PRED_V) for (int64_t k = 0; k < n; k++) m0[k] = at * mo[k] + st * x[k];
		else for (int64_t k = 0; k < n; k++) m0[k] = (x[k] - at * mo[k]) / st;
	}
	if (x0out) {
		if (c->dpm_pp) memcpy(x0out, m0, (size_t)n * sizeof *m0);
		else for (int64_t k = 0; k < n; k++) x0out[k] = (x[k] - st * m0[k]) / at;
	}
	/* model_outputs shift: hist holds the last solver_order outputs (NULL = None), oldest first */
	int order = c->solver_order;
	while (s->nhist < order) s->hist[s->nhist++] = NULL;
	sd_tensor_free(s->hist[0]);
	memmove(s->hist, s->hist + 1, (size_t)(order - 1) * sizeof *s->hist);
	s->hist[order - 1] = m0t;

	float a_t, s_t, a_s0, s_s0;
	alpha_sigma(s->sigmas[i + 1], &a_t, &s_t);
	alpha_sigma(s->sigmas[i], &a_s0, &s_s0);
	float lambda_t = logf(a_t) - logf(s_t);
	float lambda_s0 = logf(a_s0) - logf(s_s0);
	float h = lambda_t - lambda_s0;
	if (order == 1 || s->lower_order_nums < 1 || lower_final) {
		if (c->dpm_pp) {
			float A = s_t / s_s0, B = a_t * (expf(-h) - 1.0f);
			for (int64_t k = 0; k < n; k++) x[k] = A * x[k] - B * m0[k];
		} else {
			float A = a_t / a_s0, B = s_t * (expf(h) - 1.0f);
			for (int64_t k = 0; k < n; k++) x[k] = A * x[k] - B * m0[k];
		}
	} else {
		if (i < 1 || !s->hist[order - 2])
			return sd_seterr("the state lacks the previous model output at step %d", i);
		const float *m1 = s->hist[order - 2]->data;
		float a_s1, s_s1;
		alpha_sigma(s->sigmas[i - 1], &a_s1, &s_s1);
		float lambda_s1 = logf(a_s1) - logf(s_s1);
		float h0 = lambda_s0 - lambda_s1;
		float r0 = h0 / h;
		float inv_r0 = 1.0f / r0;
		float A, B, C;
		if (c->dpm_pp) {
			A = s_t / s_s0;
			B = a_t * (expf(-h) - 1.0f);
			C = c->heun ? a_t * ((expf(-h) - 1.0f) / h + 1.0f) : 0.5f * B;
		} else {
			A = a_t / a_s0;
			B = s_t * (expf(h) - 1.0f);
			C = c->heun ? s_t * ((expf(h) - 1.0f) / h - 1.0f) : 0.5f * B;
		}
		for (int64_t k = 0; k < n; k++) {
			float D1 = inv_r0 * (m0[k] - m1[k]);
			x[k] = c->dpm_pp && c->heun ? A * x[k] - B * m0[k] + C * D1 : A * x[k] - B * m0[k] - C * D1;
		}
	}
	if (s->lower_order_nums < order) s->lower_order_nums++;
	return 0;
}

int sd_sched_step(sd_sched *s, sd_tensor *x, const sd_tensor *model_output, int i, const sd_tensor *noise,
                  sd_rng *rng, sd_tensor *pred_x0)
{
	const char *name = kind_names[s->kind];
	if (check_f32(x, "latent") || check_like(model_output, x, "model output") ||
	    (noise && check_like(noise, x, "noise")) || (pred_x0 && check_like(pred_x0, x, "pred_original_sample")))
		return -1;
	if (i < 0 || i >= s->ncalls)
		return sd_seterr("%s: step %d out of range (%d steps in all)", name, i, s->ncalls);
	if (i != s->index) {
		if (s->index != s->begin)
			return sd_seterr("%s: step %d out of order (the sampler is at step %d)", name, i, s->index);
		sd_sched_set_begin(s, i);
	}
	if (s->nhist > 0 && s->hist[s->nhist - 1] && !sd_tensor_same_shape(s->hist[s->nhist - 1], x))
		return sd_seterr("%s: the latent's shape changed during the run", name);
	int64_t n = sd_tensor_numel(x);
	float *x0 = pred_x0 ? pred_x0->data : malloc((size_t)n * sizeof *x0);
	if (!x0) return sd_seterr("out of memory");
	float *xv = x->data;
	const float *mo = model_output->data;
	int rc;
	switch (s->kind) {
	case SD_SAMPLER_PNDM: rc = pndm_step(s, xv, model_output, n); break;
	case SD_SAMPLER_DDIM: rc = ddim_step(s, xv, mo, n, noise, rng, x0); break;
	case SD_SAMPLER_DDPM: rc = ddpm_step(s, xv, mo, n, noise, rng, x0); break;
	case SD_SAMPLER_EULER: rc = euler_step(s, xv, mo, n, noise, rng, x0); break;
	case SD_SAMPLER_EULER_A: rc = euler_a_step(s, xv, mo, n, noise, rng, x0); break;
	case SD_SAMPLER_LMS: rc = lms_step(s, xv, mo, n, x0, x); break;
	case SD_SAMPLER_DPMPP_2M: rc = dpm_step(s, xv, model_output, n, pred_x0 ? x0 : NULL); break;
	default: rc = sd_seterr("unknown sampler kind"); break;
	}
	if (!pred_x0) free(x0);
	if (rc) return sd_preerr("%s: step %d", name, i);
	s->index = i + 1;
	return 0;
}

/* ==== state in a frame's sampler map ==== */

static const char *const state_keys[] = {"ets", "cur_sample", "cur_model_output", "model_outputs",
                                         "lower_order_nums", "derivatives"};

static sd_value *tensor_value(const sd_tensor *t)
{
	if (!t) return sd_value_nil();
	sd_tensor *d = dup_tensor(t);
	return d ? sd_value_tensor(d) : NULL;
}

static int put_hist(const sd_sched *s, sd_value *map, const char *key)
{
	sd_value *arr = sd_value_array();
	if (!arr) return -1;
	for (int i = 0; i < s->nhist; i++) {
		sd_value *v = tensor_value(s->hist[i]);
		if (!v || sd_array_push(arr, v)) { sd_value_free(arr); return -1; }
	}
	return sd_map_set(map, key, arr);
}

int sd_sched_save(const sd_sched *s, sd_value *map)
{
	if (!map || map->type != SD_V_MAP) return sd_seterr("sampler state: not a map");
	for (size_t k = 0; k < sizeof state_keys / sizeof state_keys[0]; k++) sd_map_del(map, state_keys[k]);
	if (sd_map_set_str(map, "name", kind_names[s->kind]) || sd_map_set_int(map, "steps", s->steps) ||
	    sd_map_set(map, "karras", sd_value_bool(s->karras)) || sd_map_set_float(map, "eta", s->eta) ||
	    sd_map_set_int(map, "begin", s->begin) || sd_map_set_int(map, "step", s->index))
		return -1;
	switch (s->kind) {
	case SD_SAMPLER_PNDM:
		if (put_hist(s, map, "ets")) return -1;
		if (s->cur_sample && sd_map_set(map, "cur_sample", tensor_value(s->cur_sample))) return -1;
		if (s->cur_mo && sd_map_set(map, "cur_model_output", tensor_value(s->cur_mo))) return -1;
		break;
	case SD_SAMPLER_DPMPP_2M:
		if (put_hist(s, map, "model_outputs") || sd_map_set_int(map, "lower_order_nums", s->lower_order_nums))
			return -1;
		break;
	case SD_SAMPLER_LMS:
		if (put_hist(s, map, "derivatives")) return -1;
		break;
	default:
		break;
	}
	return 0;
}

/* A copy of an f32 CPU tensor value (nil → *out = NULL when allow_nil). */
static int get_tensor(const sd_value *v, const char *key, int allow_nil, sd_tensor **out)
{
	*out = NULL;
	if (v->type == SD_V_NIL && allow_nil) return 0;
	if (v->type != SD_V_TENSOR) return sd_seterr("sampler state: '%s' holds something other than a tensor", key);
	if (check_f32(v->u.t, key)) return -1;
	if (!(*out = dup_tensor(v->u.t))) return -1;
	return 0;
}

static int get_hist(sd_sched *s, const sd_value *map, const char *key, int cap, int allow_nil)
{
	const sd_value *arr = sd_map_get(map, key);
	if (!arr) return 0;
	if (arr->type != SD_V_ARRAY) return sd_seterr("sampler state: '%s' must be an array", key);
	if (arr->u.a.n > (size_t)cap) return sd_seterr("sampler state: '%s' holds %zu entries (at most %d)", key, arr->u.a.n, cap);
	for (size_t i = 0; i < arr->u.a.n; i++) {
		if (get_tensor(arr->u.a.v[i], key, allow_nil, &s->hist[i])) return -1;
		s->nhist = (int)i + 1;
	}
	return 0;
}

int sd_sched_load(sd_sched *s, const sd_value *map)
{
	const char *name = kind_names[s->kind];
	if (!map || map->type != SD_V_MAP) return sd_seterr("sampler state: not a map");
	const char *nm = sd_map_str(map, "name");
	enum sd_sampler_kind k = s->kind;
	if (nm && (sd_sampler_parse(nm, &k) || k != s->kind))
		return sd_seterr("sampler state: it is for sampler '%s', not %s", nm, name);
	int64_t steps, begin = 0, index = 0, lon = 0;
	int r = sd_map_get_int(map, "steps", &steps);
	if (r < 0) return -1;
	if (r == 0 && steps != s->steps)
		return sd_seterr("sampler state: it is for %lld steps, not %d", (long long)steps, s->steps);
	if (sd_map_get_int(map, "begin", &begin) < 0 || sd_map_get_int(map, "step", &index) < 0 ||
	    sd_map_get_int(map, "lower_order_nums", &lon) < 0)
		return -1;
	if (begin < 0 || index < begin || index > s->ncalls)
		return sd_seterr("sampler state: step %lld (begun at %lld) out of range [0, %d]", (long long)index,
		                 (long long)begin, s->ncalls);
	state_clear(s);
	s->begin = (int)begin;
	s->index = (int)index;
	int rc = 0;
	const sd_value *v;
	switch (s->kind) {
	case SD_SAMPLER_PNDM:
		rc = get_hist(s, map, "ets", MAX_HIST, 0);
		if (!rc && (v = sd_map_get(map, "cur_sample"))) rc = get_tensor(v, "cur_sample", 1, &s->cur_sample);
		if (!rc && (v = sd_map_get(map, "cur_model_output"))) rc = get_tensor(v, "cur_model_output", 1, &s->cur_mo);
		break;
	case SD_SAMPLER_DPMPP_2M:
		rc = get_hist(s, map, "model_outputs", s->c.solver_order, 1);
		if (!rc && (lon < 0 || lon > s->c.solver_order)) rc = sd_seterr("sampler state: bad lower_order_nums");
		s->lower_order_nums = (int)lon;
		break;
	case SD_SAMPLER_LMS:
		rc = get_hist(s, map, "derivatives", 4, 0);
		break;
	default:
		break;
	}
	/* every history tensor has one shape */
	const sd_tensor *ref = s->cur_sample;
	for (int i = 0; !rc && i < s->nhist; i++) {
		if (!s->hist[i]) continue;
		if (ref && !sd_tensor_same_shape(ref, s->hist[i])) rc = sd_seterr("sampler state: tensors of different shapes");
		ref = s->hist[i];
	}
	if (rc) {
		state_clear(s);
		s->begin = s->index = 0;
		return sd_preerr("%s", name);
	}
	return 0;
}
