/*
 * test_sampler.c - lib/models/sampler.c against diffusers 0.25: golden/schedulers/common.safetensors (the
 * float32 training schedule, bit for bit) and every golden/schedulers/<sampler>.safetensors: the 20- and
 * 50-step timestep and sigma tables, init_noise_sigma, and the 20-step trajectory driven by the stored
 * model outputs (and, for the stochastic samplers, the stored noise), compared step by step with a
 * relative tolerance of 1e-5 (each step's largest difference over that step's largest reference value).
 * Also: a run that saves its state into a sampler map, packs it into a frame, and restores it into a new
 * scheduler before every step equals the straight run bit for bit; noise drawn from a generator equals
 * the same noise given explicitly; image-to-image start index and add_noise against the tiny img2img
 * golden (when present); clear errors for bad names, steps and calls.
 */
#include <stdint.h>
#include "sd.h"
#include "test.h"

static const char *fixtures(void)
{
	const char *s = getenv("SD_FIXTURES");
	return s && *s ? s : "tests/fixtures";
}

static sd_st *open_golden(const char *name)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/golden/%s.safetensors", fixtures(), name);
	return sd_st_open(path);
}

static const sd_tensor *get(const sd_st *f, const char *key)
{
	int i = sd_st_find(f, key);
	return i >= 0 ? sd_st_tensor(f, i) : NULL;
}

/* A golden tensor as a malloc'd double array (any numeric dtype); NULL when absent. */
static double *as_f64(const sd_st *f, const char *key, int64_t *n)
{
	const sd_tensor *t = get(f, key);
	if (!t) return NULL;
	sd_tensor *d = sd_tensor_convert(t, SD_DTYPE_F64);
	if (!d) return NULL;
	*n = sd_tensor_numel(d);
	double *out = malloc((size_t)*n * sizeof *out);
	memcpy(out, d->data, (size_t)*n * sizeof *out);
	sd_tensor_free(d);
	return out;
}

/* One step's slice [i] of a golden (S, …) tensor, as a view with the trailing shape. */
static sd_tensor *slice(const sd_tensor *t, int i)
{
	int64_t per = 1;
	for (int d = 1; d < t->ndim; d++) per *= t->shape[d];
	return sd_tensor_wrap(SD_DTYPE_F32, t->ndim - 1, t->shape + 1, (float *)t->data + (int64_t)i * per);
}

/* Worst per-step relative error over a trajectory, kept per quantity and checked once. */
typedef struct traj_err {
	double rel, diff;
	int step;
} traj_err;

static void traj_add(traj_err *e, const float *got, const float *want, int64_t n, int step)
{
	double md = 0, mr = 0;
	int nan = 0;
	for (int64_t k = 0; k < n; k++) {
		double d = fabs((double)got[k] - want[k]);
		if (isnan(got[k])) nan = 1;
		if (d > md) md = d;
		if (fabs(want[k]) > mr) mr = fabs(want[k]);
	}
	double rel = nan ? INFINITY : md / (mr > 1e-12 ? mr : 1e-12);
	if (rel >= e->rel) { e->rel = rel; e->diff = md; e->step = step; }
}

static void traj_check(const char *file, const char *what, const traj_err *e, int steps, double tol)
{
	int ok = e->rel <= tol;
	printf("  %s %s: %d steps, worst step %d: max|diff|=%.3g (rel %.3g, tol %.1g)%s\n", file, what, steps,
	       e->step, e->diff, e->rel, tol, ok ? "" : " FAILED");
	if (!ok) test_failed_++;
}

typedef struct golden_case {
	const char *file;
	enum sd_sampler_kind kind;
	int karras;
	double eta;
	int stochastic; /* the golden file stores noise[i] */
} golden_case;

static const golden_case cases[] = {
	{"ddim", SD_SAMPLER_DDIM, 0, 0.0, 0},
	{"ddim_eta1", SD_SAMPLER_DDIM, 0, 1.0, 1},
	{"ddpm", SD_SAMPLER_DDPM, 0, 0.0, 1},
	{"pndm", SD_SAMPLER_PNDM, 0, 0.0, 0},
	{"euler", SD_SAMPLER_EULER, 0, 0.0, 0},
	{"euler_karras", SD_SAMPLER_EULER, 1, 0.0, 0},
	{"euler_ancestral", SD_SAMPLER_EULER_A, 0, 0.0, 1},
	{"dpmpp_2m", SD_SAMPLER_DPMPP_2M, 0, 0.0, 0},
	{"dpmpp_2m_karras", SD_SAMPLER_DPMPP_2M, 1, 0.0, 0},
	{"lms", SD_SAMPLER_LMS, 0, 0.0, 0},
	{"lms_karras", SD_SAMPLER_LMS, 1, 0.0, 0},
};

/* Timesteps, sigmas and init_noise_sigma for `steps` steps against the golden tables. */
static void check_tables(const golden_case *c, const sd_st *f, int steps)
{
	char key[64];
	sd_sched *s = sd_sched_new(NULL, c->kind, steps, c->karras, c->eta);
	if (!s) { printf("  %s: %s\n", c->file, sd_errmsg()); test_failed_++; return; }
	int64_t n = 0;
	snprintf(key, sizeof key, "timesteps_%d", steps);
	double *ts = as_f64(f, key, &n);
	CHECK(ts && n == sd_sched_calls(s));
	if (ts && n == sd_sched_calls(s)) {
		float got[256], want[256];
		for (int i = 0; i < n; i++) { got[i] = (float)sd_sched_timestep(s, i); want[i] = (float)ts[i]; }
		printf("  %s %s:", c->file, key);
		CHECK_CLOSE(got, want, n, 1e-6);
	}
	free(ts);
	snprintf(key, sizeof key, "sigmas_%d", steps);
	double *sg = as_f64(f, key, &n);
	if (sg) {
		CHECK(n == sd_sched_calls(s) + 1);
		float got[256], want[256];
		for (int i = 0; i < n && i < 256; i++) { got[i] = sd_sched_sigma(s, i); want[i] = (float)sg[i]; }
		printf("  %s %s:", c->file, key);
		CHECK_CLOSE(got, want, n, 1e-6);
	}
	free(sg);
	snprintf(key, sizeof key, "init_noise_sigma_%d", steps);
	double *ins = as_f64(f, key, &n);
	CHECK(ins && n == 1);
	if (ins) {
		float got = sd_sched_init_noise_sigma(s), want = (float)ins[0];
		printf("  %s %s:", c->file, key);
		CHECK_CLOSE(&got, &want, 1, 1e-6);
	}
	free(ins);
	sd_sched_free(s);
}

/*
 * The 20-step trajectory.  With `resume`, the state goes through a packed frame and a new scheduler
 * before every step, and every prev_sample must equal `straight` (the plain run's, [S·n]) bit for bit;
 * without, the plain run fills `straight` and is compared with the golden file.
 */
static void run_trajectory(const golden_case *c, const sd_st *f, int resume, float *straight)
{
	const sd_tensor *xT = get(f, "x_T"), *mo = get(f, "model_output"), *smi = get(f, "scaled_model_input"),
	                *prev = get(f, "prev_sample"), *x0g = get(f, "pred_original_sample"), *noise = get(f, "noise");
	CHECK(xT && mo && smi && prev);
	if (!xT || !mo || !smi || !prev) return;
	CHECK(!c->stochastic || noise);
	sd_sched *s = sd_sched_new(NULL, c->kind, 20, c->karras, c->eta);
	if (!s) { printf("  %s: %s\n", c->file, sd_errmsg()); test_failed_++; return; }
	int S = sd_sched_calls(s);
	CHECK(mo->shape[0] == S);
	int64_t n = sd_tensor_numel(xT);
	sd_tensor *x = sd_tensor_new(SD_DTYPE_F32, xT->ndim, xT->shape);
	sd_tensor *in = sd_tensor_new(SD_DTYPE_F32, xT->ndim, xT->shape);
	sd_tensor *x0 = sd_tensor_new(SD_DTYPE_F32, xT->ndim, xT->shape);
	float sig = sd_sched_init_noise_sigma(s);
	for (int64_t k = 0; k < n; k++) ((float *)x->data)[k] = ((const float *)xT->data)[k] * sig;
	traj_err e_in = {0}, e_prev = {0}, e_x0 = {0};
	int bitsame = 1;
	for (int i = 0; i < S && i < mo->shape[0]; i++) {
		if (resume) {
			sd_value *map = sd_value_map(), *frame = sd_value_map(), *back = NULL;
			char *buf = NULL;
			size_t len = 0;
			CHECK_OK(sd_sched_save(s, map));
			CHECK_OK(sd_map_set(frame, "sampler", map));
			CHECK_OK(sd_frame_pack(frame, &buf, &len));
			CHECK_OK(sd_frame_unpack(buf, len, &back));
			sd_sched_free(s);
			s = sd_sched_new(NULL, c->kind, 20, c->karras, c->eta);
			CHECK(s && back);
			if (!s || !back) { free(buf); sd_value_free(frame); sd_value_free(back); break; }
			CHECK_OK(sd_sched_load(s, sd_map_get(back, "sampler")));
			CHECK(sd_sched_index(s) == i);
			free(buf);
			sd_value_free(frame);
			sd_value_free(back);
		}
		sd_tensor *m = slice(mo, i), *z = noise ? slice(noise, i) : NULL;
		CHECK_OK(sd_sched_scale_model_input(s, in, x, i));
		CHECK_OK(sd_sched_step(s, x, m, i, z, NULL, x0));
		if (resume) {
			bitsame &= memcmp(x->data, straight + (int64_t)i * n, (size_t)n * sizeof(float)) == 0;
		} else {
			memcpy(straight + (int64_t)i * n, x->data, (size_t)n * sizeof(float));
			sd_tensor *w = slice(smi, i);
			traj_add(&e_in, in->data, w->data, n, i);
			sd_tensor_free(w);
			w = slice(prev, i);
			traj_add(&e_prev, x->data, w->data, n, i);
			sd_tensor_free(w);
			if (x0g) {
				w = slice(x0g, i);
				traj_add(&e_x0, x0->data, w->data, n, i);
				sd_tensor_free(w);
			}
		}
		sd_tensor_free(m);
		sd_tensor_free(z);
	}
	if (resume) {
		printf("  %s: state saved, packed and restored before each of %d steps: %s\n", c->file, S,
		       bitsame ? "bit-identical to the straight run" : "DIFFERS from the straight run");
		CHECK(bitsame);
	} else {
		traj_check(c->file, "scaled_model_input", &e_in, S, 1e-5);
		traj_check(c->file, "prev_sample", &e_prev, S, 1e-5);
		if (x0g) traj_check(c->file, "pred_original_sample", &e_x0, S, 1e-5);
	}
	sd_tensor_free(x);
	sd_tensor_free(in);
	sd_tensor_free(x0);
	sd_sched_free(s);
}

/* ==== tests ==== */

TEST(training_schedule)
{
	sd_st *f = open_golden("schedulers/common");
	if (!f) SKIP("no golden/schedulers/common.safetensors: %s", sd_errmsg());
	sd_sched *s = sd_sched_new(NULL, SD_SAMPLER_DDIM, 20, -1, 0);
	CHECK(s);
	if (s) {
		int n;
		const float *betas = sd_sched_betas(s, &n), *acp = sd_sched_alphas_cumprod(s, &n);
		const sd_tensor *gb = get(f, "betas"), *ga = get(f, "alphas_cumprod"), *gal = get(f, "alphas");
		CHECK(gb && ga && gal && n == 1000 && sd_tensor_numel(gb) == n);
		if (gb && ga && gal) {
			float alphas[1000];
			for (int i = 0; i < n && i < 1000; i++) alphas[i] = 1.0f - betas[i];
			int eb = memcmp(betas, gb->data, (size_t)n * 4) == 0, ea = memcmp(alphas, gal->data, (size_t)n * 4) == 0,
			    ec = memcmp(acp, ga->data, (size_t)n * 4) == 0;
			printf("  betas %s, alphas %s, alphas_cumprod %s\n", eb ? "bit-exact" : "DIFFER",
			       ea ? "bit-exact" : "DIFFER", ec ? "bit-exact" : "DIFFER");
			CHECK_CLOSE(betas, (const float *)gb->data, n, 1e-7);
			CHECK_CLOSE(acp, (const float *)ga->data, n, 1e-7);
			CHECK(eb && ea && ec);
		}
	}
	sd_sched_free(s);
	sd_st_close(f);
}

static void golden_tables(int which)
{
	const golden_case *c = &cases[which];
	char name[64];
	snprintf(name, sizeof name, "schedulers/%s", c->file);
	sd_st *f = open_golden(name);
	if (!f) { test_skipped_ = 1; snprintf(test_skip_why_, sizeof test_skip_why_, "%s", sd_errmsg()); return; }
	check_tables(c, f, 20);
	check_tables(c, f, 50);
	sd_st_close(f);
}

static void golden_trajectory(int which)
{
	const golden_case *c = &cases[which];
	char name[64];
	snprintf(name, sizeof name, "schedulers/%s", c->file);
	sd_st *f = open_golden(name);
	if (!f) { test_skipped_ = 1; snprintf(test_skip_why_, sizeof test_skip_why_, "%s", sd_errmsg()); return; }
	const sd_tensor *mo = get(f, "model_output");
	float *straight = mo ? malloc((size_t)sd_tensor_numel(mo) * sizeof(float)) : NULL;
	if (straight) {
		run_trajectory(c, f, 0, straight);
		run_trajectory(c, f, 1, straight);
	} else {
		CHECK(mo);
	}
	free(straight);
	sd_st_close(f);
}

#define GOLDEN(i, name) \
	TEST(name##_tables) { golden_tables(i); } \
	TEST(name##_trajectory) { golden_trajectory(i); }
GOLDEN(0, ddim)
GOLDEN(1, ddim_eta1)
GOLDEN(2, ddpm)
GOLDEN(3, pndm)
GOLDEN(4, euler)
GOLDEN(5, euler_karras)
GOLDEN(6, euler_ancestral)
GOLDEN(7, dpmpp_2m)
GOLDEN(8, dpmpp_2m_karras)
GOLDEN(9, lms)
GOLDEN(10, lms_karras)

/* Noise drawn from a generator is torch.randn of the latent's shape, one draw per stochastic step. */
TEST(generator_noise_equals_given_noise)
{
	enum sd_sampler_kind kinds[] = {SD_SAMPLER_EULER_A, SD_SAMPLER_DDPM, SD_SAMPLER_DDIM};
	for (int k = 0; k < 3; k++) {
		sd_sched *a = sd_sched_new(NULL, kinds[k], 8, 0, kinds[k] == SD_SAMPLER_DDIM ? 0.5 : 0);
		sd_sched *b = sd_sched_new(NULL, kinds[k], 8, 0, kinds[k] == SD_SAMPLER_DDIM ? 0.5 : 0);
		CHECK(a && b);
		if (!a || !b) { sd_sched_free(a); sd_sched_free(b); continue; }
		sd_tensor *xa = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 4, 4), *xb = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 4, 4);
		sd_tensor *mo = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 4, 4), *z = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 4, 4);
		sd_rng ra, rb, rm;
		sd_rng_seed(&ra, 7);
		sd_rng_seed(&rb, 7);
		sd_rng_seed(&rm, 99);
		sd_rng_randn(&ra, xa->data, 64);
		sd_rng_randn(&rb, xb->data, 64);
		for (int i = 0; i < sd_sched_calls(a); i++) {
			sd_rng_randn(&rm, mo->data, 64);
			CHECK_OK(sd_sched_step(a, xa, mo, i, NULL, &ra, NULL));
			sd_rng_randn(&rb, z->data, 64);
			CHECK_OK(sd_sched_step(b, xb, mo, i, z, NULL, NULL));
		}
		printf("  %s: 8 steps with generator noise %s explicit noise\n", sd_sampler_name(kinds[k]),
		       memcmp(xa->data, xb->data, 256) == 0 && ra.draws == rb.draws ? "==" : "!=");
		CHECK(memcmp(xa->data, xb->data, 256) == 0);
		CHECK(ra.draws == rb.draws);
		sd_tensor_free(xa); sd_tensor_free(xb); sd_tensor_free(mo); sd_tensor_free(z);
		sd_sched_free(a);
		sd_sched_free(b);
	}
	/* euler draws (and discards) one randn per step, as diffusers' EulerDiscreteScheduler.step does */
	sd_sched *e = sd_sched_new(NULL, SD_SAMPLER_EULER, 3, 0, 0);
	CHECK(e);
	if (e) {
		sd_tensor *x = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 4, 4), *mo = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 4, 4);
		sd_rng r;
		sd_rng_seed(&r, 1);
		for (int i = 0; i < 3; i++) CHECK_OK(sd_sched_step(e, x, mo, i, NULL, &r, NULL));
		CHECK(r.draws > 0);
		sd_tensor_free(x);
		sd_tensor_free(mo);
		sd_sched_free(e);
	}
}

/* Image-to-image: the start index and add_noise of the tiny img2img golden (DDIM, 10 steps, 0.6). */
TEST(img2img_start_and_add_noise)
{
	sd_sched *s = sd_sched_new(NULL, SD_SAMPLER_DDIM, 10, 0, 0);
	CHECK(s);
	if (!s) return;
	int b = sd_sched_strength_begin(s, 0.6);
	CHECK(b == 4);
	CHECK(sd_sched_strength_begin(s, 1.0) == 0);
	CHECK(sd_sched_strength_begin(s, 0.0) < 0 && strstr(sd_errmsg(), "no step"));
	CHECK(sd_sched_strength_begin(s, 1.5) < 0 && strstr(sd_errmsg(), "strength"));
	sd_sched *p = sd_sched_new(NULL, SD_SAMPLER_PNDM, 50, 0, 0);
	CHECK(p && sd_sched_strength_begin(p, 0.7) == 15 && sd_sched_strength_begin(p, 0.0) == 50);
	sd_sched_free(p);
	sd_st *f = open_golden("tiny/img2img");
	const char *shared = getenv("SHARED");
	if (!f && shared && *shared) {
		char path[4096];
		snprintf(path, sizeof path, "%s/golden/tiny/img2img.safetensors", shared);
		f = sd_st_open(path);
	}
	if (!f) { sd_sched_free(s); SKIP("no golden/tiny/img2img.safetensors"); }
	const sd_tensor *x0 = get(f, "init_latents"), *z = get(f, "noise"), *want = get(f, "noisy_latents");
	int64_t nt = 0;
	double *ts = as_f64(f, "timesteps", &nt);
	CHECK(x0 && z && want && ts);
	if (x0 && z && want && ts) {
		for (int i = 0; i < nt; i++) CHECK(sd_sched_timestep(s, b + i) == ts[i]);
		sd_tensor *out = sd_tensor_new(SD_DTYPE_F32, x0->ndim, x0->shape);
		CHECK_OK(sd_sched_add_noise(s, out, x0, z, b));
		CHECK_CLOSE((const float *)out->data, (const float *)want->data, sd_tensor_numel(out), 1e-6);
		sd_tensor_free(out);
	}
	free(ts);
	sd_st_close(f);
	sd_sched_free(s);
}

/* Spacings and offsets that no golden covers, against values diffusers documents / produces. */
TEST(spacing_variants)
{
	const char *trailing = "{\"beta_start\": 0.00085, \"beta_end\": 0.012, \"beta_schedule\": \"scaled_linear\","
	                       " \"timestep_spacing\": \"trailing\", \"lambda_min_clipped\": -Infinity,"
	                       " \"clip_sample\": false, \"unknown_key\": [1, 2]}";
	sd_sched *s = sd_sched_new(trailing, SD_SAMPLER_DDIM, 10, 0, 0);
	CHECK(s);
	if (s) {
		/* trailing: 999, 899, …, 99 */
		int ok = sd_sched_calls(s) == 10;
		for (int i = 0; ok && i < 10; i++) ok = sd_sched_timestep(s, i) == 999 - 100 * i;
		CHECK(ok);
	}
	sd_sched_free(s);
	s = sd_sched_new(trailing, SD_SAMPLER_DPMPP_2M, 10, 0, 0);
	CHECK(s && sd_sched_timestep(s, 0) == 999 && sd_sched_timestep(s, 9) == 99);
	sd_sched_free(s);
	const char *leading = "{\"beta_start\": 0.00085, \"beta_end\": 0.012, \"beta_schedule\": \"scaled_linear\","
	                      " \"timestep_spacing\": \"leading\", \"steps_offset\": 1}";
	s = sd_sched_new(leading, SD_SAMPLER_EULER, 20, 0, 0);
	CHECK(s);
	if (s) {
		float mx = sd_sched_sigma(s, 0);
		CHECK(sd_sched_timestep(s, 0) == 951 && sd_sched_timestep(s, 19) == 1);
		CHECK(sd_sched_init_noise_sigma(s) == sqrtf(mx * mx + 1.0f));
	}
	sd_sched_free(s);
	/* PNDM: 20 steps are 21 calls, the second timestep repeated */
	s = sd_sched_new(NULL, SD_SAMPLER_PNDM, 20, -1, 0);
	CHECK(s && sd_sched_calls(s) == 21 && sd_sched_timestep(s, 1) == sd_sched_timestep(s, 2));
	sd_sched_free(s);
	/* without skip_prk_steps: 12 PRK calls, then N - 3 PLMS calls */
	s = sd_sched_new("{\"steps_offset\": 1}", SD_SAMPLER_PNDM, 10, -1, 0);
	CHECK(s && sd_sched_calls(s) == 19);
	if (s) {
		sd_tensor *x = sd_tensor_newv(SD_DTYPE_F32, 2, 4, 4, 0, 0), *mo = sd_tensor_newv(SD_DTYPE_F32, 2, 4, 4, 0, 0);
		sd_rng r;
		sd_rng_seed(&r, 3);
		sd_rng_randn(&r, x->data, 16);
		int ok = 1;
		for (int i = 0; i < sd_sched_calls(s); i++) {
			sd_rng_randn(&r, mo->data, 16);
			ok &= sd_sched_step(s, x, mo, i, NULL, NULL, NULL) == 0;
		}
		for (int k = 0; k < 16; k++) ok &= isfinite(((float *)x->data)[k]);
		CHECK(ok);
		sd_tensor_free(x);
		sd_tensor_free(mo);
	}
	sd_sched_free(s);
}

TEST(names_and_errors)
{
	enum sd_sampler_kind k;
	CHECK(sd_sampler_parse("euler_ancestral", &k) == 0 && k == SD_SAMPLER_EULER_A);
	CHECK(sd_sampler_parse("dpm++2m", &k) == 0 && k == SD_SAMPLER_DPMPP_2M);
	for (int i = 0; i < SD_SAMPLER_COUNT; i++)
		CHECK(sd_sampler_parse(sd_sampler_name((enum sd_sampler_kind)i), &k) == 0 && k == (enum sd_sampler_kind)i);
	CHECK(sd_sampler_parse("heun", &k) < 0 && strstr(sd_errmsg(), "unknown sampler 'heun'"));
	printf("  %s\n", sd_errmsg());
	CHECK(!sd_sched_new(NULL, SD_SAMPLER_DDIM, 0, 0, 0) && strstr(sd_errmsg(), "steps"));
	printf("  %s\n", sd_errmsg());
	CHECK(!sd_sched_new(NULL, SD_SAMPLER_PNDM, 1001, 0, 0) && strstr(sd_errmsg(), "1001"));
	CHECK(!sd_sched_new(NULL, SD_SAMPLER_DDIM, 20, 1, 0) && strstr(sd_errmsg(), "Karras"));
	CHECK(!sd_sched_new(NULL, SD_SAMPLER_EULER, 20, 0, 0.5) && strstr(sd_errmsg(), "eta"));
	CHECK(!sd_sched_new("{not json", SD_SAMPLER_DDIM, 20, 0, 0) && strstr(sd_errmsg(), "scheduler config"));
	CHECK(!sd_sched_new("{\"beta_schedule\": \"sigmoid\"}", SD_SAMPLER_DDIM, 20, 0, 0) &&
	      strstr(sd_errmsg(), "sigmoid"));
	CHECK(!sd_sched_new("{\"num_train_timesteps\": \"1000\"}", SD_SAMPLER_DDIM, 20, 0, 0));

	sd_sched *s = sd_sched_new(NULL, SD_SAMPLER_EULER_A, 10, 0, 0);
	sd_tensor *x = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 2, 2, 0), *mo = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 2, 2);
	sd_tensor *bad = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 2, 3);
	CHECK(s && x && mo && bad);
	CHECK(sd_sched_step(s, x, mo, 0, NULL, NULL, NULL) < 0 && strstr(sd_errmsg(), "noise"));
	printf("  %s\n", sd_errmsg());
	CHECK(sd_sched_step(s, x, bad, 0, NULL, NULL, NULL) < 0 && strstr(sd_errmsg(), "shape"));
	CHECK(sd_sched_step(s, x, mo, 10, NULL, NULL, NULL) < 0 && strstr(sd_errmsg(), "out of range"));
	sd_rng r;
	sd_rng_seed(&r, 1);
	CHECK_OK(sd_sched_step(s, x, mo, 2, NULL, &r, NULL)); /* a fresh run may begin anywhere */
	CHECK(sd_sched_begin(s) == 2 && sd_sched_index(s) == 3);
	CHECK(sd_sched_step(s, x, mo, 5, NULL, &r, NULL) < 0 && strstr(sd_errmsg(), "out of order"));
	printf("  %s\n", sd_errmsg());
	/* a state for another sampler or step count is refused */
	sd_value *m = sd_value_map();
	CHECK_OK(sd_sched_save(s, m));
	sd_sched *o = sd_sched_new(NULL, SD_SAMPLER_EULER_A, 20, 0, 0);
	CHECK(o && sd_sched_load(o, m) < 0 && strstr(sd_errmsg(), "10 steps"));
	sd_sched_free(o);
	o = sd_sched_new(NULL, SD_SAMPLER_LMS, 10, 0, 0);
	CHECK(o && sd_sched_load(o, m) < 0 && strstr(sd_errmsg(), "euler_a"));
	sd_sched_free(o);
	sd_value_free(m);
	sd_tensor_free(x);
	sd_tensor_free(mo);
	sd_tensor_free(bad);
	sd_sched_free(s);
	sd_sched_free(NULL);
}

int main(void)
{
	RUN(training_schedule);
	RUN(ddim_tables);
	RUN(ddim_trajectory);
	RUN(ddim_eta1_tables);
	RUN(ddim_eta1_trajectory);
	RUN(ddpm_tables);
	RUN(ddpm_trajectory);
	RUN(pndm_tables);
	RUN(pndm_trajectory);
	RUN(euler_tables);
	RUN(euler_trajectory);
	RUN(euler_karras_tables);
	RUN(euler_karras_trajectory);
	RUN(euler_ancestral_tables);
	RUN(euler_ancestral_trajectory);
	RUN(dpmpp_2m_tables);
	RUN(dpmpp_2m_trajectory);
	RUN(dpmpp_2m_karras_tables);
	RUN(dpmpp_2m_karras_trajectory);
	RUN(lms_tables);
	RUN(lms_trajectory);
	RUN(lms_karras_tables);
	RUN(lms_karras_trajectory);
	RUN(generator_noise_equals_given_noise);
	RUN(img2img_start_and_add_noise);
	RUN(spacing_variants);
	RUN(names_and_errors);
	return test_summary();
}
