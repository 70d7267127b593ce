/*
 * denoise.c - the denoising loop of diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline,
 * one frame at a time (sd-unet-step runs it): per step, x_in = scheduler.scale_model_input(latent), the
 * UNet on the batch [x_in, x_in] with the contexts [uncond_context, context] (classifier-free guidance,
 * uncond first), guided = u + g·(c − u), then scheduler.step (lib/models/sampler.c), with the frame's
 * torch generator for the samplers that draw.  The frame's "sampler" map is the plan (sampler, steps,
 * the step reached, the sampler's history): it is read, continued and written back with the generator,
 * so K calls of one step each give the same bytes as one call of K steps.
 *
 * Messages name the frame as "<stream>: frame <i>" (and the conditioning frame as "<cond>: frame <j>")
 * so that a tool can print sd_errmsg() as it stands.
 */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sched.h"

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define note(j, ...) sd_sched_note((j)->note, (j)->user, __VA_ARGS__)

/* ==== conditioning ==== */

int sd_context_batch(sd_tensor **out, const sd_value *cf, const char *key, int64_t B, const char *where)
{
	*out = NULL;
	const sd_value *v = sd_map_get(cf, key);
	if (!v) return 0;
	char s[64];
	if (v->type != SD_V_TENSOR) return sd_seterr("%s: \"%s\" is not a tensor", where, key);
	const sd_tensor *t = v->u.t;
	if (!sd_dtype_is_float(t->dtype) || t->ndim != 3 || sd_tensor_numel(t) == 0)
		return sd_seterr("%s: \"%s\" is %s %s, expected f32 [N,77,D] (sd-text-encode makes it)", where, key,
		                 sd_dtype_name(t->dtype), sd_shape_str(t->ndim, t->shape, s, sizeof s));
	int64_t n = t->shape[0];
	if (B % n)
		return sd_seterr("%s: \"%s\" holds %lld prompts for a batch of %lld latents (want 1, %lld or a divisor)",
		                 where, key, (long long)n, (long long)B, (long long)B);
	sd_tensor *f = sd_tensor_convert(t, SD_DTYPE_F32);
	sd_tensor *o = f ? sd_tensor_newv(SD_DTYPE_F32, 3, B, t->shape[1], t->shape[2]) : NULL;
	if (!o) {
		sd_tensor_free(f);
		return sd_preerr("%s", where);
	}
	size_t row = (size_t)(t->shape[1] * t->shape[2]);
	for (int64_t b = 0; b < B; b++)
		memcpy((float *)o->data + b * row, (const float *)f->data + (b / (B / n)) * row, row * sizeof(float));
	sd_tensor_free(f);
	*out = o;
	return 0;
}

/* ==== the plan ==== */

int sd_plan_resolve(sd_plan *p, const sd_plan_flags *o, const sd_value *pm, const char *where)
{
	memset(p, 0, sizeof *p);
	p->started = pm && sd_map_get(pm, "step") != NULL;
	const char *nm = pm ? sd_map_str(pm, "name") : NULL;
	enum sd_sampler_kind fk = SD_SAMPLER_PNDM;
	if (nm && sd_sampler_parse(nm, &fk)) return sd_preerr("%s: the plan", where);
	if (!nm && pm && sd_map_get(pm, "name")) return sd_seterr("%s: the plan's \"name\" is not a string", where);
	int64_t st = 0;
	int r = pm ? sd_map_get_int(pm, "steps", &st) : 1;
	if (r < 0 || (r == 0 && (st < 1 || st > 100000)))
		return sd_seterr("%s: the plan's \"steps\" is not a step count", where);
	const sd_value *kv = pm ? sd_map_get(pm, "karras") : NULL;
	int fkarras = kv && kv->type == SD_V_BOOL ? kv->u.b : -1;
	double feta = 0, fg = 7.5;
	if (pm && (sd_map_get_float(pm, "eta", &feta) < 0 || sd_map_get_float(pm, "guidance", &fg) < 0))
		return sd_preerr("%s: the plan", where);
	const char *fsp = pm ? sd_map_str(pm, "spacing") : NULL;
	if (fsp && sd_spacing_check(fsp)) return sd_preerr("%s: the plan", where);
	if (p->started) {
		if (o->spacing && strcmp(o->spacing, fsp ? fsp : ""))
			return sd_seterr("%s: --spacing %s: the frame's plan has begun with %s spacing", where, o->spacing,
			                 fsp ? fsp : "the model's");
		if (!nm || r != 0) return sd_seterr("%s: the plan has run but names no sampler and steps", where);
		if (o->sampler && strcmp(o->sampler, sd_sampler_name(fk)))
			return sd_seterr("%s: --sampler %s: the frame's plan is %s and has begun", where, o->sampler,
			                 sd_sampler_name(fk));
		if (o->steps && o->steps != st)
			return sd_seterr("%s: --steps %d: the frame's plan has %lld steps and has begun", where, o->steps,
			                 (long long)st);
		if (o->karras >= 0 && fkarras >= 0 && o->karras != fkarras)
			return sd_seterr("%s: --%skarras: the frame's plan has begun %s Karras sigmas", where,
			                 o->karras ? "" : "no-", fkarras ? "with" : "without");
	}
	if (!o->sampler || sd_sampler_parse(o->sampler, &p->kind)) p->kind = fk;
	p->steps = o->steps ? o->steps : r == 0 ? (int)st : 50;
	p->karras = o->karras >= 0 ? o->karras : fkarras;
	p->eta = o->has_eta ? o->eta : feta;
	p->guidance = o->has_guidance ? o->guidance : fg;
	/* a copy: the plan's own string goes when the plan is rewritten */
	if ((o->spacing || fsp) && !(p->spacing = strdup(o->spacing ? o->spacing : fsp)))
		return sd_seterr("out of memory");
	return 0;
}

void sd_plan_clear(sd_plan *p)
{
	free(p->spacing);
	p->spacing = NULL;
}

/* ==== the UNet with guidance ==== */

struct run {
	sd_unet *unet;
	sd_tensor *ctx2;   /* [uncond; cond] (2B,L,D) with guidance, else cond (B,L,D) */
	sd_tensor *xin;    /* (2B|B, C, h, w) the UNet's input */
	sd_tensor *eps;    /* (2B|B, C, h, w) its output */
	int cfg;
};

static void run_free(struct run *r)
{
	sd_tensor_free(r->ctx2);
	sd_tensor_free(r->xin);
	sd_tensor_free(r->eps);
}

/* The contexts for a batch like x (B,C,h,w) from the conditioning frame cf, and the UNet's buffers:
 * with guidance > 1 and an "uncond_context", [uncond; cond] (classifier-free guidance). */
static int run_init(struct run *r, const sd_denoise_job *j, const sd_value *cf, const sd_tensor *x, double guidance,
                    const char *where, const char *cwhere)
{
	const int64_t B = x->shape[0];
	sd_tensor *ctx, *unc = NULL;
	if (sd_context_batch(&ctx, cf, "context", B, cwhere)) return -1;
	if (!ctx)
		return sd_seterr("%s: no \"context\" key (sd-text-encode makes it; give it with -c COND or in the frame)",
		                 cwhere);
	if (guidance > 1 && sd_context_batch(&unc, cf, "uncond_context", B, cwhere)) {
		sd_tensor_free(ctx);
		return -1;
	}
	if (guidance > 1 && !unc) note(j, "%s: no \"uncond_context\": no classifier-free guidance", cwhere);
	r->cfg = unc != NULL;
	if (r->cfg) {
		if (unc->shape[1] != ctx->shape[1] || unc->shape[2] != ctx->shape[2]) {
			sd_seterr("%s: \"uncond_context\" [%lld,%lld] and \"context\" [%lld,%lld] differ in shape", cwhere,
			          (long long)unc->shape[1], (long long)unc->shape[2], (long long)ctx->shape[1],
			          (long long)ctx->shape[2]);
			sd_tensor_free(unc);
			sd_tensor_free(ctx);
			return -1;
		}
		r->ctx2 = sd_tensor_newv(SD_DTYPE_F32, 3, 2 * B, ctx->shape[1], ctx->shape[2]);
		if (r->ctx2) {
			memcpy(r->ctx2->data, unc->data, sd_tensor_nbytes(unc));
			memcpy((char *)r->ctx2->data + sd_tensor_nbytes(unc), ctx->data, sd_tensor_nbytes(ctx));
		}
		sd_tensor_free(unc);
		sd_tensor_free(ctx);
		if (!r->ctx2) return sd_preerr("%s", where);
	} else {
		r->ctx2 = ctx;
	}
	int64_t bshape[4] = {(r->cfg ? 2 : 1) * B, x->shape[1], x->shape[2], x->shape[3]};
	r->xin = sd_tensor_new(SD_DTYPE_F32, 4, bshape);
	r->eps = sd_tensor_new(SD_DTYPE_F32, 4, bshape);
	if (!r->xin || !r->eps) return sd_preerr("%s", where);
	return 0;
}

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

/* ==== one frame ==== */

/* The frame's "latent" as a new f32 tensor (B, in_channels, h, w). */
static int frame_latent(sd_tensor **out, const sd_value *frame, const sd_unet_config *uc, const char *where)
{
	const sd_value *v = sd_map_get(frame, "latent");
	if (!v) return sd_seterr("%s: no \"latent\" key (sd-noise makes it)", where);
	if (v->type != SD_V_TENSOR) return sd_seterr("%s: \"latent\" is not a tensor", where);
	const sd_tensor *t = v->u.t;
	char s[64];
	if (!sd_dtype_is_float(t->dtype) || t->ndim != 4 || sd_tensor_numel(t) == 0)
		return sd_seterr("%s: \"latent\" is %s %s, expected f32 [N,%d,h,w]", where, sd_dtype_name(t->dtype),
		                 sd_shape_str(t->ndim, t->shape, s, sizeof s), uc->in_channels);
	if (t->shape[1] != uc->in_channels)
		return sd_seterr("%s: the latent has %lld channels, the model expects %d", where, (long long)t->shape[1],
		                 uc->in_channels);
	if (!(*out = sd_tensor_convert(t, SD_DTYPE_F32))) return sd_preerr("%s", where);
	return 0;
}

/* --predict: the raw model output at T as "eps" (+ "uncond_eps"): no scaling, no guidance, no step. */
static int predict(const sd_denoise_job *j, struct run *r, sd_value *frame, const sd_tensor *x, long idx,
                   const char *where)
{
	const int64_t n = sd_tensor_numel(x);
	if (unet_pass(r, x, (float)j->predict)) return sd_preerr("%s", where);
	sd_tensor *e = sd_tensor_new(SD_DTYPE_F32, 4, x->shape), *u = NULL;
	if (!e) return sd_preerr("%s", where);
	memcpy(e->data, (float *)r->eps->data + (r->cfg ? n : 0), (size_t)n * sizeof(float));
	if (r->cfg) {
		if (!(u = sd_tensor_new(SD_DTYPE_F32, 4, x->shape))) {
			sd_tensor_free(e);
			return sd_preerr("%s", where);
		}
		memcpy(u->data, r->eps->data, (size_t)n * sizeof(float));
	}
	if (sd_map_set_tensor(frame, "eps", e) || (u && sd_map_set_tensor(frame, "uncond_eps", u)))
		return sd_preerr("%s", where);
	note(j, "frame %ld: model output at timestep %g%s", idx, j->predict, r->cfg ? " (and unconditional)" : "");
	return 0;
}

/* The plan's remaining steps (at most j->count) on x (owned: it becomes the frame's "latent"). */
static int steps(const sd_denoise_job *j, struct run *r, sd_value *frame, sd_value *pm, const sd_plan *p,
                 sd_tensor *x, long idx, const char *where)
{
	const int64_t n = sd_tensor_numel(x);
	sd_sched *s = NULL;
	sd_tensor *xs = NULL, *g = NULL;
	char *cj = sd_sched_config_spacing(j->sched_json, p->spacing);
	s = cj ? sd_sched_new(cj, p->kind, p->steps, p->karras, p->eta) : NULL;
	free(cj);
	if (!s) {
		sd_preerr("%s: the plan", where);
		goto fail;
	}
	if (p->started && sd_sched_load(s, pm)) goto fail_where;
	int calls = sd_sched_calls(s), i0 = sd_sched_index(s);
	if (i0 >= calls) {
		sd_seterr("%s: the plan is finished (%s, %d of %d steps done): nothing to run", where,
		          sd_sampler_name(p->kind), i0, calls);
		goto fail;
	}
	if (!p->started) {
		/* pure noise, as diffusers' prepare_latents leaves it: × init_noise_sigma */
		float sig = sd_sched_init_noise_sigma(s);
		float *xv = x->data;
		for (int64_t k = 0; k < n; k++) xv[k] = xv[k] * sig;
	}
	int stochastic = p->kind == SD_SAMPLER_EULER_A || p->kind == SD_SAMPLER_DDPM ||
	                 (p->kind == SD_SAMPLER_DDIM && p->eta > 0);
	sd_rng rng;
	int has_rng = 0;
	const sd_value *gv = sd_map_get(frame, "generator");
	if (gv) {
		if (sd_rng_from_value(&rng, gv)) goto fail_where;
		has_rng = 1;
	} else if (j->has_seed) {
		sd_rng_seed(&rng, j->seed);
		has_rng = 1;
	}
	if (stochastic && !has_rng) {
		sd_seterr("%s: %s adds noise at every step: the frame has no \"generator\" (sd-noise --seed "
		          "starts one) and no --seed was given", where, sd_sampler_name(p->kind));
		goto fail;
	}
	int i1 = j->count && i0 + j->count < calls ? i0 + j->count : calls;
	xs = sd_tensor_new(SD_DTYPE_F32, 4, x->shape);
	g = r->cfg ? sd_tensor_new(SD_DTYPE_F32, 4, x->shape) : NULL;
	if (!xs || (r->cfg && !g)) goto fail_where;
	for (int i = i0; i < i1; i++) {
		double t1 = now();
		float t = (float)sd_sched_timestep(s, i);
		if (sd_sched_scale_model_input(s, xs, x, i) || unet_pass(r, xs, t)) {
			sd_preerr("%s: step %d", where, i);
			goto fail;
		}
		const sd_tensor *mo = r->eps; /* without guidance: B rows, the latent's shape */
		if (r->cfg) {
			guide(g->data, r->eps, n, (float)p->guidance);
			mo = g;
		}
		if (sd_sched_step(s, x, mo, i, NULL, has_rng ? &rng : NULL, NULL)) goto fail_where;
		note(j, "frame %ld: step %d/%d, timestep %g, %.3f s", idx, i + 1, calls, t, now() - t1);
	}
	sd_tensor_free(xs);
	sd_tensor_free(g);
	xs = g = NULL;
	if (!pm) {
		if (sd_map_set(frame, "sampler", sd_value_map())) goto fail_where;
		pm = sd_map_get(frame, "sampler");
	}
	/* the same key order whichever call wrote the plan last (a loop of single steps gives the
	 * bytes of one call): the sampler's keys, its history, then ours */
	static const char *const ours[] = {"guidance", "spacing", "calls", "finished"};
	for (size_t k = 0; k < sizeof ours / sizeof *ours; k++) sd_map_del(pm, ours[k]);
	if (sd_sched_save(s, pm) || sd_map_set_float(pm, "guidance", p->guidance) ||
	    (p->spacing && sd_map_set_str(pm, "spacing", p->spacing)) || sd_map_set_int(pm, "calls", calls) ||
	    sd_map_set(pm, "finished", sd_value_bool(i1 >= calls)))
		goto fail_where;
	if (has_rng && sd_map_set(frame, "generator", sd_rng_to_value(&rng))) goto fail_where;
	sd_sched_free(s);
	if (sd_map_set_tensor(frame, "latent", x)) return sd_preerr("%s", where);
	return 0;
fail_where:
	sd_preerr("%s", where);
fail:
	sd_tensor_free(xs);
	sd_tensor_free(g);
	sd_sched_free(s);
	sd_tensor_free(x);
	return -1;
}

int sd_denoise_frame(const sd_denoise_job *j, sd_value *frame, const char *name, long idx, const sd_value **cond)
{
	char where[512], cwhere[600];
	snprintf(where, sizeof where, "%s: frame %ld", name, idx);
	sd_tensor *x;
	if (frame_latent(&x, frame, sd_unet_get_config(j->unet), where)) return -1;

	/* the plan */
	sd_value *pm = sd_map_get(frame, "sampler");
	sd_plan p;
	if (pm && pm->type != SD_V_MAP) {
		sd_tensor_free(x);
		return sd_seterr("%s: \"sampler\" is not a map", where);
	}
	if (sd_plan_resolve(&p, &j->plan, pm, where)) {
		sd_plan_clear(&p);
		sd_tensor_free(x);
		return -1;
	}

	/* the conditioning: one frame for all, or one each, else the frame's own */
	const sd_value *cf = frame;
	snprintf(cwhere, sizeof cwhere, "%s", where);
	if (j->ncond) {
		if (j->ncond > 1 && idx >= j->ncond) {
			sd_plan_clear(&p);
			sd_tensor_free(x);
			return sd_seterr("%s: %s holds %ld conditioning frames, fewer than the input", where, j->cond_name,
			                 j->ncond);
		}
		cf = j->cond[j->ncond == 1 ? 0 : idx];
		snprintf(cwhere, sizeof cwhere, "%s: frame %ld", j->cond_name, j->ncond == 1 ? 0L : idx);
	}
	if (cond) *cond = cf;
	struct run r = {j->unet, NULL, NULL, NULL, 0};
	int rc = run_init(&r, j, cf, x, p.guidance, where, cwhere);
	if (rc) sd_tensor_free(x);
	else if (j->has_predict) {
		rc = predict(j, &r, frame, x, idx, where);
		sd_tensor_free(x);
	} else rc = steps(j, &r, frame, pm, &p, x, idx, where);
	sd_plan_clear(&p);
	run_free(&r);
	return rc;
}
