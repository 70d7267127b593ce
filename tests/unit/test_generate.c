/*
 * test_generate.c - the arithmetic sd-noise does before the UNet runs, against diffusers' goldens
 * (golden/tiny/img2img, txt2img_seeded_*): the img2img start (init_latents = 0.18215 · (mean + std ·
 * eps_posterior), t_start = 10 − int(10 · 0.6) = 4, the timesteps left, add_noise at timesteps[t_start]) with
 * the given tensors, and the seeded noise (torch.randn of seed 1234 × init_noise_sigma, for DDIM and for
 * Euler ancestral with the SD 1.5 hub config's linspace spacing).  The tools themselves are run end to
 * end by tests/pipeline/generate.sh.
 */
#include <stdint.h>
#include "sd.h"
#include "test.h"

#define RTOL 1e-4

static const char *fixtures(void)
{
	const char *s = getenv("SD_FIXTURES");
	return s && *s ? s : "tests/fixtures";
}

static const sd_tensor *gold(const sd_st *f, const char *name)
{
	int i = sd_st_find(f, name);
	if (i < 0) {
		printf("  golden tensor '%s' is missing\n", name);
		test_failed_++;
		return NULL;
	}
	return sd_st_tensor(f, i);
}

static sd_st *open_gold(const char *name)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/golden/tiny/%s.safetensors", fixtures(), name);
	return sd_st_open(path);
}

TEST(img2img_start)
{
	char path[4096];
	sd_st *f = open_gold("img2img");
	if (!f) SKIP("%s", sd_errmsg());
	snprintf(path, sizeof path, "%s/tiny", fixtures());
	sd_model *m = sd_model_open(path, NULL);
	sd_weights *w = m ? sd_weights_load(m, SD_VAE, SD_DEVICE_CPU) : NULL;
	sd_vae *vae = w ? sd_vae_new(w) : NULL;
	if (!vae) { printf("  %s: %s\n", path, sd_errmsg()); test_failed_++; goto out; }
	const sd_tensor *img = gold(f, "image"), *eps = gold(f, "eps_posterior"), *x0 = gold(f, "init_latents"),
	                *noise = gold(f, "noise"), *noisy = gold(f, "noisy_latents"), *ts = gold(f, "timesteps"),
	                *tstart = gold(f, "t_start");
	if (!img || !eps || !x0 || !noise || !noisy || !ts || !tstart) goto out;

	/* sd-vae-encode --sample: the scaled posterior sample with the given eps (image in [-1,1] there) */
	sd_tensor *im01 = sd_tensor_new(SD_DTYPE_F32, 4, img->shape), *lat = sd_tensor_new(SD_DTYPE_F32, 4, x0->shape);
	for (int64_t k = 0; k < sd_tensor_numel(img); k++)
		((float *)im01->data)[k] = ((const float *)img->data)[k] / 2 + 0.5f;
	CHECK_OK(sd_vae_encode_image(vae, lat, im01, eps, NULL));
	CHECK_CLOSE((float *)lat->data, (const float *)x0->data, sd_tensor_numel(x0), RTOL);

	/* sd-noise --strength 0.6 --sampler ddim --steps 10 with the model's scheduler config */
	sd_sched *s = sd_sched_new(sd_model_scheduler_json(m), SD_SAMPLER_DDIM, 10, -1, 0);
	CHECK(s != NULL);
	if (s) {
		int begin = sd_sched_strength_begin(s, 0.6);
		CHECK(begin == 4); /* t_start = 10 - int(10 * 0.6); the golden's "t_start" is its timestep */
		CHECK(sd_sched_timestep(s, begin) == (double)((const int64_t *)tstart->data)[0]);
		CHECK(sd_sched_calls(s) - begin == ts->shape[0]);
		for (int i = 0; i < ts->shape[0] && begin >= 0; i++)
			CHECK(sd_sched_timestep(s, begin + i) == (double)((const int64_t *)ts->data)[i]);
		CHECK_OK(sd_sched_add_noise(s, lat, x0, noise, begin));
		CHECK_CLOSE((float *)lat->data, (const float *)noisy->data, sd_tensor_numel(noisy), 1e-6);
	}
	sd_sched_free(s);
	sd_tensor_free(im01);
	sd_tensor_free(lat);
out:
	sd_vae_free(vae);
	sd_weights_free(w);
	sd_model_close(m);
	sd_st_close(f);
}

/* latents_drawn = randn(seed 1234), latents_init = drawn × init_noise_sigma, the sampler's timesteps. */
static void seeded(const char *name, enum sd_sampler_kind kind, const char *spacing)
{
	sd_st *f = open_gold(name);
	if (!f) { printf("  %s\n", sd_errmsg()); test_failed_++; return; }
	const sd_tensor *drawn = gold(f, "latents_drawn"), *init = gold(f, "latents_init"), *ts = gold(f, "timesteps");
	if (drawn && init && ts) {
		int64_t n = sd_tensor_numel(drawn);
		float *x = malloc((size_t)n * sizeof *x);
		sd_rng r;
		sd_rng_seed(&r, 1234);
		sd_rng_randn(&r, x, n);
		CHECK(memcmp(x, drawn->data, (size_t)n * sizeof *x) == 0);
		char *cj = sd_sched_config_spacing(NULL, spacing);
		sd_sched *s = cj ? sd_sched_new(cj, kind, 8, -1, 0) : NULL;
		CHECK(s != NULL);
		if (s) {
			float sig = sd_sched_init_noise_sigma(s);
			for (int64_t k = 0; k < n; k++) x[k] = x[k] * sig;
			CHECK(memcmp(x, init->data, (size_t)n * sizeof *x) == 0);
			CHECK(sd_sched_calls(s) == ts->shape[0]);
			for (int i = 0; i < ts->shape[0]; i++) {
				double want = ts->dtype == SD_DTYPE_I64 ? (double)((const int64_t *)ts->data)[i]
				                                        : (double)((const float *)ts->data)[i];
				CHECK((float)sd_sched_timestep(s, i) == (float)want);
			}
		}
		sd_sched_free(s);
		free(cj);
		free(x);
	}
	sd_st_close(f);
}

TEST(seeded_ddim) { seeded("txt2img_seeded_ddim", SD_SAMPLER_DDIM, NULL); }
TEST(seeded_euler_ancestral) { seeded("txt2img_seeded_euler_ancestral", SD_SAMPLER_EULER_A, "linspace"); }

/* The spacing override: appended to the config text (the last duplicate key wins), "{}" included. */
TEST(spacing_override)
{
	char *a = sd_sched_config_spacing("{\"timestep_spacing\": \"leading\"}", "trailing");
	CHECK(a && strcmp(a, "{\"timestep_spacing\": \"leading\", \"timestep_spacing\": \"trailing\"}") == 0);
	char *b = sd_sched_config_spacing(" { } ", "linspace");
	CHECK(b && strcmp(b, " { \"timestep_spacing\": \"linspace\"} ") == 0);
	CHECK(sd_sched_config_spacing("{}", "sideways") == NULL);
	CHECK(sd_sched_config_spacing("[1]", "leading") == NULL);
	/* the override reaches the sampler: trailing DDIM with 10 steps starts at 999 */
	sd_sched *s = a ? sd_sched_new(a, SD_SAMPLER_DDIM, 10, -1, 0) : NULL;
	CHECK(s && sd_sched_timestep(s, 0) == 999);
	sd_sched_free(s);
	free(a);
	free(b);
}

int main(void)
{
	RUN(img2img_start);
	RUN(seeded_ddim);
	RUN(seeded_euler_ancestral);
	RUN(spacing_override);
	return test_summary();
}
