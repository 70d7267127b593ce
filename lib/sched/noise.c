/*
 * noise.c - the starting latent of a Stable Diffusion run, drawn as diffusers draws it (sd-noise runs it).
 *
 * Text to image (StableDiffusionPipeline.prepare_latents): "latent" = torch.randn([B,C,H/f,W/f]) from a
 * torch CPU generator seeded with the seed, B samples in one draw; the denoising loop multiplies it by
 * its sampler's init_noise_sigma.  Image to image (StableDiffusionImg2ImgPipeline.prepare_latents): the
 * frame's clean "latent" (sd-vae-encode's, already × scaling_factor) is noised with torch.randn of its
 * shape, drawn from the generator the frame carries (after the VAE's posterior sample), to timestep
 * index t_start = steps − int(steps × strength) with the sampler's own add_noise.  Both write the
 * generator state ("generator") and the plan ("sampler") that the denoising loop carries on.
 */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "sched.h"

#define note(j, ...) sd_sched_note((j)->note, (j)->user, __VA_ARGS__)

/* A seed nobody chose: 63 random bits (recorded in the frame, so the run can be repeated). */
static uint64_t random_seed(void)
{
	uint64_t s = 0;
	if (getrandom(&s, sizeof s, 0) != (ssize_t)sizeof s) s = (uint64_t)time(NULL) ^ ((uint64_t)clock() << 32);
	return s & (uint64_t)INT64_MAX;
}

/* The frame's generator: restarted from the seed, else continued, else seeded at random. */
static int frame_rng(const sd_noise_job *j, const sd_value *frame, sd_rng *rng, const char *name, long idx)
{
	const sd_value *g = sd_map_get(frame, "generator");
	if (j->has_seed) {
		sd_rng_seed(rng, j->seed);
	} else if (g) {
		if (sd_rng_from_value(rng, g)) return sd_preerr("%s: frame %ld", name, idx);
	} else {
		uint64_t s = random_seed();
		sd_rng_seed(rng, s);
		note(j, "frame %ld: seed %llu", idx, (unsigned long long)s);
	}
	return 0;
}

/* Set the plan's "seed" from the generator's. */
static void plan_seed(sd_value *plan, const sd_rng *rng)
{
	if (rng->seed <= INT64_MAX) sd_map_set_int(plan, "seed", (int64_t)rng->seed);
}

/* The frame's "sampler" map, created when absent (borrowed); NULL with a message. */
static sd_value *frame_plan(sd_value *frame, const char *name, long idx)
{
	sd_value *p = sd_map_get(frame, "sampler");
	if (p && p->type != SD_V_MAP) {
		sd_seterr("%s: frame %ld: \"sampler\" is not a map", name, idx);
		return NULL;
	}
	if (!p) {
		if (sd_map_set(frame, "sampler", sd_value_map())) {
			sd_preerr("%s: frame %ld", name, idx);
			return NULL;
		}
		p = sd_map_get(frame, "sampler");
	}
	return p;
}

int sd_noise_txt2img(const sd_noise_job *j, sd_value *frame, const char *name, long idx)
{
	const sd_plan_flags *o = &j->plan;
	const sd_geometry *g = j->geometry;
	if (sd_map_get(frame, "latent"))
		return sd_seterr("%s: frame %ld: the frame already has a \"latent\" (give --strength to noise it for "
		                 "image to image)", name, idx);
	sd_rng rng;
	if (frame_rng(j, frame, &rng, name, idx)) return -1;
	int64_t shape[4] = {j->batch, g->channels, j->height / g->factor, j->width / g->factor};
	sd_tensor *lat = sd_tensor_new(SD_DTYPE_F32, 4, shape);
	if (!lat) return sd_preerr("%s: frame %ld", name, idx);
	sd_rng_randn(&rng, lat->data, sd_tensor_numel(lat));
	sd_value *plan = frame_plan(frame, name, idx);
	if (!plan) goto fail;
	if (sd_map_get(plan, "step")) {
		sd_seterr("%s: frame %ld: the frame's sampler plan has already run", name, idx);
		goto fail;
	}
	if ((o->sampler && sd_map_set_str(plan, "name", o->sampler)) ||
	    (o->steps && sd_map_set_int(plan, "steps", o->steps)) ||
	    (o->karras >= 0 && sd_map_set(plan, "karras", sd_value_bool(o->karras))) ||
	    (o->has_eta && sd_map_set_float(plan, "eta", o->eta)) ||
	    (o->spacing && sd_map_set_str(plan, "spacing", o->spacing))) {
		sd_preerr("%s", name);
		goto fail;
	}
	plan_seed(plan, &rng);
	if (sd_map_set_tensor(frame, "latent", lat) || sd_map_set(frame, "generator", sd_rng_to_value(&rng)))
		return sd_preerr("%s: frame %ld", name, idx);
	char s[64];
	note(j, "frame %ld: noise %s, seed %llu", idx, sd_shape_str(4, shape, s, sizeof s), (unsigned long long)rng.seed);
	return 0;
fail:
	sd_tensor_free(lat);
	return -1;
}

int sd_noise_img2img(const sd_noise_job *j, sd_value *frame, const char *name, long idx)
{
	const sd_plan_flags *o = &j->plan;
	sd_value *lv = sd_map_get(frame, "latent");
	if (!lv) return sd_seterr("%s: frame %ld: no \"latent\" key (sd-vae-encode makes it from an image)", name, idx);
	if (lv->type != SD_V_TENSOR) return sd_seterr("%s: frame %ld: \"latent\" is not a tensor", name, idx);
	const sd_tensor *x0 = lv->u.t;
	char s[64];
	if (!sd_dtype_is_float(x0->dtype) || x0->ndim != 4 || sd_tensor_numel(x0) == 0)
		return sd_seterr("%s: frame %ld: \"latent\" is %s %s, expected f32 [N,4,h,w]", name, idx,
		                 sd_dtype_name(x0->dtype), sd_shape_str(x0->ndim, x0->shape, s, sizeof s));
	sd_sched *sch = NULL;
	sd_tensor *lat = sd_tensor_convert(x0, SD_DTYPE_F32), *noise = sd_tensor_new(SD_DTYPE_F32, x0->ndim, x0->shape);
	if (!lat || !noise) goto fail_frame;

	/* the plan: flags, else an unstarted plan the frame carries, else diffusers' defaults */
	sd_value *plan = frame_plan(frame, name, idx);
	if (!plan) goto fail;
	int64_t st;
	if (sd_map_get(plan, "step")) {
		sd_seterr("%s: frame %ld: the latent is already being sampled (its plan has run); --strength wants a "
		          "clean latent", name, idx);
		goto fail;
	}
	const char *sname = o->sampler ? o->sampler : sd_map_str(plan, "name") ? sd_map_str(plan, "name") : "pndm";
	int steps = o->steps;
	if (!steps) {
		int r = sd_map_get_int(plan, "steps", &st);
		if (r < 0 || (r == 0 && (st < 1 || st > 100000))) {
			sd_seterr("%s: frame %ld: the plan's \"steps\" is not a step count", name, idx);
			goto fail;
		}
		steps = r == 0 ? (int)st : 50;
	}
	int karras = o->karras;
	const sd_value *kv = sd_map_get(plan, "karras");
	if (karras < 0 && kv && kv->type == SD_V_BOOL) karras = kv->u.b;
	double eta = 0;
	if (o->has_eta) eta = o->eta;
	else if (sd_map_get_float(plan, "eta", &eta) < 0) {
		sd_seterr("%s: frame %ld: the plan's \"eta\" is not a number", name, idx);
		goto fail;
	}
	const char *spacing = o->spacing ? o->spacing : sd_map_str(plan, "spacing");
	enum sd_sampler_kind kind;
	if (sd_sampler_parse(sname, &kind)) {
		sd_preerr("%s: frame %ld: the plan", name, idx);
		goto fail;
	}
	char *cj = sd_sched_config_spacing(j->sched_json, spacing);
	sch = cj ? sd_sched_new(cj, kind, steps, karras, eta) : NULL;
	free(cj);
	if (!sch) goto fail_frame;
	int begin = sd_sched_strength_begin(sch, j->strength);
	if (begin < 0) {
		sd_preerr("%s: frame %ld: --strength", name, idx);
		goto fail;
	}

	/* diffusers: noise = randn_tensor(init_latents.shape, generator) after the posterior sample */
	sd_rng rng;
	if (frame_rng(j, frame, &rng, name, idx)) goto fail;
	sd_rng_randn(&rng, noise->data, sd_tensor_numel(noise));
	if (sd_sched_add_noise(sch, lat, lat, noise, begin) || sd_sched_set_begin(sch, begin) || sd_sched_save(sch, plan))
		goto fail_frame;
	if (sd_map_set_float(plan, "strength", j->strength) || (o->spacing && sd_map_set_str(plan, "spacing", o->spacing))) {
		sd_preerr("%s", name);
		goto fail;
	}
	plan_seed(plan, &rng);
	int bad = sd_map_set_tensor(frame, "latent", lat) || sd_map_set(frame, "generator", sd_rng_to_value(&rng));
	lat = NULL;
	if (bad) goto fail_frame;
	note(j, "frame %ld: %s, %d steps, strength %g: noised to timestep %g, %d of %d model calls left", idx,
	     sd_sampler_name(kind), steps, j->strength, sd_sched_timestep(sch, begin), sd_sched_calls(sch) - begin,
	     sd_sched_calls(sch));
	sd_tensor_free(noise);
	sd_sched_free(sch);
	return 0;
fail_frame:
	sd_preerr("%s: frame %ld", name, idx);
fail:
	sd_tensor_free(lat);
	sd_tensor_free(noise);
	sd_sched_free(sch);
	return -1;
}
