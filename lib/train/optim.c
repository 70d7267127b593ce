/*
 * train/optim.c - torch.optim.Adam and AdamW as torch 2.x computes them on the CPU with foreach=False
 * (torch/optim/adam.py and adamw.py, _single_tensor_adam[w]): per parameter a step count and the
 * exp_avg / exp_avg_sq buffers (exp_avg.mul_(β1).add_(g, alpha=1−β1): torch 2.0's form, which
 * golden/tiny/train_step.safetensors matches bit for bit; the later lerp_ form differs in the last bit
 * of a few elements), the scalars (bias corrections, step size) computed in double as Python does and
 * handed to float kernels; torch.nn.utils.clip_grad_norm_; and the state saved for --resume
 * as a safetensors file or a value.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include "../backend.h"

struct sd_optim {
	sd_optim_config c;
	int n;
	sd_tensor **p;       /* borrowed */
	char **names;
	int64_t *step;
	sd_tensor **m, **v;  /* exp_avg, exp_avg_sq on the parameter's device */
};

void sd_optim_defaults(sd_optim_config *c, enum sd_optim_kind kind)
{
	c->kind = kind;
	c->lr = 1e-3;
	c->beta1 = 0.9;
	c->beta2 = 0.999;
	c->eps = 1e-8;
	c->weight_decay = kind == SD_OPTIM_ADAMW ? 1e-2 : 0.0;
}

static const char *const kind_names[SD_OPTIM_COUNT] = {"adam", "adamw"};

const char *sd_optim_name(enum sd_optim_kind k)
{
	return (unsigned)k < SD_OPTIM_COUNT ? kind_names[k] : "?";
}

int sd_optim_parse(const char *name, enum sd_optim_kind *out)
{
	for (int k = 0; k < SD_OPTIM_COUNT; k++)
		if (name && !strcasecmp(name, kind_names[k])) {
			*out = (enum sd_optim_kind)k;
			return 0;
		}
	return sd_seterr("unknown optimizer '%s' (known: adam, adamw)", name ? name : "");
}

static int check_config(const sd_optim_config *c)
{
	if ((unsigned)c->kind >= SD_OPTIM_COUNT) return sd_seterr("optimizer: unknown kind %d", (int)c->kind);
	if (!(c->lr >= 0)) return sd_seterr("optimizer: invalid learning rate %g", c->lr);
	if (!(c->eps >= 0)) return sd_seterr("optimizer: invalid epsilon %g", c->eps);
	if (!(c->beta1 >= 0 && c->beta1 < 1)) return sd_seterr("optimizer: invalid beta1 %g", c->beta1);
	if (!(c->beta2 >= 0 && c->beta2 < 1)) return sd_seterr("optimizer: invalid beta2 %g", c->beta2);
	if (!(c->weight_decay >= 0)) return sd_seterr("optimizer: invalid weight decay %g", c->weight_decay);
	return 0;
}

static int zero(sd_tensor *t)
{
	const struct sd_backend *be = sd_backend_get(t->device);
	if (!be) return -1;
	return sd_tensor_nbytes(t) ? be->memset0(t->data, sd_tensor_nbytes(t)) : 0;
}

void sd_optim_free(sd_optim *o)
{
	if (!o) return;
	for (int i = 0; i < o->n; i++) {
		if (o->names) free(o->names[i]);
		if (o->m) sd_tensor_free(o->m[i]);
		if (o->v) sd_tensor_free(o->v[i]);
	}
	free(o->p);
	free(o->names);
	free(o->step);
	free(o->m);
	free(o->v);
	free(o);
}

sd_optim *sd_optim_new(const sd_optim_config *c, int n, sd_tensor *const *params, const char *const *names)
{
	if (check_config(c)) return NULL;
	if (n < 0) {
		sd_seterr("optimizer: %d parameters", n);
		return NULL;
	}
	sd_optim *o = calloc(1, sizeof *o);
	if (!o) goto oom;
	o->c = *c;
	o->n = n;
	size_t k = n ? (size_t)n : 1;
	o->p = calloc(k, sizeof *o->p);
	o->names = calloc(k, sizeof *o->names);
	o->step = calloc(k, sizeof *o->step);
	o->m = calloc(k, sizeof *o->m);
	o->v = calloc(k, sizeof *o->v);
	if (!o->p || !o->names || !o->step || !o->m || !o->v) goto oom;
	for (int i = 0; i < n; i++) {
		const sd_tensor *p = params[i];
		if (p->dtype != SD_DTYPE_F32) {
			sd_seterr("optimizer: parameter '%s' is %s, expected f32", names[i], sd_dtype_name(p->dtype));
			goto fail;
		}
		for (int j = 0; j < i; j++)
			if (!strcmp(names[i], names[j])) {
				sd_seterr("optimizer: parameter name '%s' given twice", names[i]);
				goto fail;
			}
		o->p[i] = params[i];
		if (!(o->names[i] = strdup(names[i]))) goto oom;
		o->m[i] = sd_tensor_new_on(p->device, SD_DTYPE_F32, p->ndim, p->shape);
		o->v[i] = sd_tensor_new_on(p->device, SD_DTYPE_F32, p->ndim, p->shape);
		if (!o->m[i] || !o->v[i] || zero(o->m[i]) || zero(o->v[i])) goto fail;
	}
	return o;
oom:
	sd_seterr("out of memory");
fail:
	sd_optim_free(o);
	return NULL;
}

const sd_optim_config *sd_optim_get_config(const sd_optim *o)
{
	return &o->c;
}

void sd_optim_set_lr(sd_optim *o, double lr)
{
	o->c.lr = lr;
}

int64_t sd_optim_steps(const sd_optim *o, int i)
{
	return i >= 0 && i < o->n ? o->step[i] : -1;
}

const sd_tensor *sd_optim_exp_avg(const sd_optim *o, int i)
{
	return i >= 0 && i < o->n ? o->m[i] : NULL;
}

const sd_tensor *sd_optim_exp_avg_sq(const sd_optim *o, int i)
{
	return i >= 0 && i < o->n ? o->v[i] : NULL;
}

/*
 * The scalars of step t as torch forms them: Python doubles (1 − lr·wd, 1 − β1, 1 − β2, β^t, lr/bc1,
 * √bc2) converted to float where a float kernel receives them.
 */
static void coefs(struct sd_adam_coef *k, const sd_optim_config *c, int64_t t)
{
	double bc1 = 1.0 - pow(c->beta1, (double)t), bc2 = 1.0 - pow(c->beta2, (double)t);
	k->decay = c->kind == SD_OPTIM_ADAMW ? (float)(1.0 - c->lr * c->weight_decay) : 1.0f;
	k->wd = c->kind == SD_OPTIM_ADAM ? (float)c->weight_decay : 0.0f;
	k->b1 = (float)c->beta1;
	k->c1 = (float)(1.0 - c->beta1);
	k->b2 = (float)c->beta2;
	k->c2 = (float)(1.0 - c->beta2);
	k->bc2_sqrt = (float)sqrt(bc2);
	k->eps = (float)c->eps;
	k->neg_step = (float)-(c->lr / bc1);
}

int sd_optim_step(sd_optim *o, const sd_tensor *const *grads)
{
	for (int i = 0; i < o->n; i++) {
		const sd_tensor *g = grads[i];
		if (!g) continue;
		if (g->dtype != SD_DTYPE_F32 || !sd_tensor_same_shape(g, o->p[i]) || g->device != o->p[i]->device)
			return sd_seterr("optimizer: the gradient of '%s' does not match the parameter (shape, dtype, device)",
			                 o->names[i]);
	}
	for (int i = 0; i < o->n; i++) {
		const sd_tensor *g = grads[i];
		if (!g) continue;
		const struct sd_backend *be = sd_backend_get(g->device);
		if (!be) return -1;
		if (be->device == SD_DEVICE_CPU) sd_threads_apply();
		if (!be->adam_step) return sd_seterr("optimizer: not implemented on %s", be->name);
		struct sd_adam_coef k;
		coefs(&k, &o->c, o->step[i] + 1);
		int64_t n = sd_tensor_numel(g);
		if (n && be->adam_step(o->p[i]->data, g->data, o->m[i]->data, o->v[i]->data, n, &k)) return -1;
		o->step[i]++;
	}
	return 0;
}

/* ==== state ==== */

static int find(const sd_optim *o, const char *name)
{
	for (int i = 0; i < o->n; i++)
		if (!strcmp(o->names[i], name)) return i;
	return -1;
}

int sd_optim_save(const sd_optim *o, const char *path)
{
	int n = 3 * o->n, rc = -1;
	const char **names = calloc(n ? n : 1, sizeof *names);
	const sd_tensor **ts = calloc(n ? n : 1, sizeof *ts);
	sd_tensor **own = calloc(n ? n : 1, sizeof *own);
	char **nb = calloc(n ? n : 1, sizeof *nb);
	if (!names || !ts || !own || !nb) {
		sd_seterr("out of memory");
		goto out;
	}
	for (int i = 0; i < o->n; i++) {
		static const char *const suffix[3] = {"exp_avg", "exp_avg_sq", "step"};
		for (int j = 0; j < 3; j++) {
			int q = 3 * i + j;
			size_t len = strlen(o->names[i]) + 16;
			if (!(nb[q] = malloc(len))) {
				sd_seterr("out of memory");
				goto out;
			}
			snprintf(nb[q], len, "%s.%s", o->names[i], suffix[j]);
			names[q] = nb[q];
			if (j == 2) {
				own[q] = sd_tensor_newv(SD_DTYPE_I64, 1, (int64_t)1);
				if (own[q]) ((int64_t *)own[q]->data)[0] = o->step[i];
			} else {
				const sd_tensor *t = j ? o->v[i] : o->m[i];
				own[q] = t->device == SD_DEVICE_CPU ? NULL : sd_tensor_to_device(t, SD_DEVICE_CPU);
				if (t->device == SD_DEVICE_CPU) {
					ts[q] = t;
					continue;
				}
			}
			if (!own[q]) goto out;
			ts[q] = own[q];
		}
	}
	char lr[32], b1[32], b2[32], eps[32], wd[32];
	snprintf(lr, sizeof lr, "%.17g", o->c.lr);
	snprintf(b1, sizeof b1, "%.17g", o->c.beta1);
	snprintf(b2, sizeof b2, "%.17g", o->c.beta2);
	snprintf(eps, sizeof eps, "%.17g", o->c.eps);
	snprintf(wd, sizeof wd, "%.17g", o->c.weight_decay);
	const char *meta[] = {"format", "sdpipe-optim", "kind", sd_optim_name(o->c.kind), "lr", lr, "beta1", b1,
	                      "beta2", b2, "eps", eps, "weight_decay", wd, NULL};
	rc = sd_st_write(path, n, names, ts, meta);
out:
	for (int q = 0; q < n; q++) {
		if (own) sd_tensor_free(own[q]);
		if (nb) free(nb[q]);
	}
	free(names);
	free(ts);
	free(own);
	free(nb);
	return rc;
}

/* Restore parameter i's state from CPU tensors m, v and a step count, checking shapes. */
static int restore(sd_optim *o, int i, const sd_tensor *m, const sd_tensor *v, int64_t step, const char *where)
{
	char s1[96], s2[96];
	for (int j = 0; j < 2; j++) {
		const sd_tensor *t = j ? v : m;
		if (!t) return sd_seterr("%s: no %s for '%s'", where, j ? "exp_avg_sq" : "exp_avg", o->names[i]);
		if (t->dtype != SD_DTYPE_F32 || !sd_tensor_same_shape(t, o->p[i]))
			return sd_seterr("%s: %s of '%s' is %s %s, the parameter is f32 %s", where, j ? "exp_avg_sq" : "exp_avg",
			                 o->names[i], sd_dtype_name(t->dtype), sd_shape_str(t->ndim, t->shape, s1, sizeof s1),
			                 sd_shape_str(o->p[i]->ndim, o->p[i]->shape, s2, sizeof s2));
	}
	if (step < 0) return sd_seterr("%s: step of '%s' is negative", where, o->names[i]);
	if (sd_tensor_copy(o->m[i], m) || sd_tensor_copy(o->v[i], v)) return -1;
	o->step[i] = step;
	return 0;
}

int sd_optim_load(sd_optim *o, const char *path)
{
	sd_st *f = sd_st_open(path);
	if (!f) return -1;
	int rc = -1;
	const char *fmt = sd_st_meta(f, "format"), *kind = sd_st_meta(f, "kind");
	if (!fmt || strcmp(fmt, "sdpipe-optim")) {
		sd_seterr("%s: not an optimizer state (no format sdpipe-optim in its metadata)", path);
		goto out;
	}
	if (!kind || strcmp(kind, sd_optim_name(o->c.kind))) {
		sd_seterr("%s: the state is of optimizer %s, not %s", path, kind ? kind : "?", sd_optim_name(o->c.kind));
		goto out;
	}
	/* every tensor must belong to a parameter, and every parameter have its three */
	for (int j = 0; j < sd_st_count(f); j++) {
		const char *nm = sd_st_name(f, j), *dot = strrchr(nm, '.');
		char base[1024];
		size_t len = dot ? (size_t)(dot - nm) : 0;
		if (!dot || len >= sizeof base ||
		    (strcmp(dot, ".exp_avg") && strcmp(dot, ".exp_avg_sq") && strcmp(dot, ".step"))) {
			sd_seterr("%s: unexpected tensor '%s'", path, nm);
			goto out;
		}
		memcpy(base, nm, len);
		base[len] = 0;
		if (find(o, base) < 0) {
			sd_seterr("%s: state for '%s', which the optimizer does not have", path, base);
			goto out;
		}
	}
	for (int i = 0; i < o->n; i++) {
		char nm[3][1100];
		snprintf(nm[0], sizeof nm[0], "%s.exp_avg", o->names[i]);
		snprintf(nm[1], sizeof nm[1], "%s.exp_avg_sq", o->names[i]);
		snprintf(nm[2], sizeof nm[2], "%s.step", o->names[i]);
		int a = sd_st_find(f, nm[0]), b = sd_st_find(f, nm[1]), s = sd_st_find(f, nm[2]);
		if (s < 0) {
			sd_seterr("%s: no state for '%s'", path, o->names[i]);
			goto out;
		}
		const sd_tensor *st = sd_st_tensor(f, s);
		if (st->dtype != SD_DTYPE_I64 || sd_tensor_numel(st) != 1) {
			sd_seterr("%s: '%s' must be one i64", path, nm[2]);
			goto out;
		}
		int64_t step;
		memcpy(&step, st->data, sizeof step);
		if (restore(o, i, a >= 0 ? sd_st_tensor(f, a) : NULL, b >= 0 ? sd_st_tensor(f, b) : NULL, step, path)) goto out;
	}
	rc = 0;
out:
	sd_st_close(f);
	return rc;
}

sd_value *sd_optim_to_value(const sd_optim *o)
{
	sd_value *v = sd_value_map(), *st = sd_value_map();
	if (!v || !st) goto fail;
	if (sd_map_set_str(v, "kind", sd_optim_name(o->c.kind)) || sd_map_set_float(v, "lr", o->c.lr) ||
	    sd_map_set_float(v, "beta1", o->c.beta1) || sd_map_set_float(v, "beta2", o->c.beta2) ||
	    sd_map_set_float(v, "eps", o->c.eps) || sd_map_set_float(v, "weight_decay", o->c.weight_decay))
		goto fail;
	for (int i = 0; i < o->n; i++) {
		sd_value *e = sd_value_map();
		if (!e || sd_map_set(st, o->names[i], e)) goto fail;
		sd_tensor *m = sd_tensor_to_device(o->m[i], SD_DEVICE_CPU);
		if (!m || sd_map_set_tensor(e, "exp_avg", m)) goto fail;
		sd_tensor *q = sd_tensor_to_device(o->v[i], SD_DEVICE_CPU);
		if (!q || sd_map_set_tensor(e, "exp_avg_sq", q) || sd_map_set_int(e, "step", o->step[i])) goto fail;
	}
	sd_value *s = st;
	st = NULL; /* sd_map_set owns it from here, also on failure */
	if (sd_map_set(v, "state", s)) goto fail;
	return v;
fail:
	sd_value_free(v);
	sd_value_free(st);
	sd_seterr("optimizer state: out of memory");
	return NULL;
}

int sd_optim_from_value(sd_optim *o, const sd_value *v)
{
	static const char where[] = "optimizer state";
	const char *kind = v ? sd_map_str(v, "kind") : NULL;
	if (!v || v->type != SD_V_MAP || !kind) return sd_seterr("%s: not a map with a kind", where);
	if (strcmp(kind, sd_optim_name(o->c.kind)))
		return sd_seterr("%s: the state is of optimizer %s, not %s", where, kind, sd_optim_name(o->c.kind));
	const sd_value *st = sd_map_get(v, "state");
	if (!st || st->type != SD_V_MAP) return sd_seterr("%s: no state map", where);
	for (size_t j = 0; j < st->u.m.n; j++)
		if (find(o, st->u.m.k[j]) < 0)
			return sd_seterr("%s: state for '%s', which the optimizer does not have", where, st->u.m.k[j]);
	for (int i = 0; i < o->n; i++) {
		const sd_value *e = sd_map_get(st, o->names[i]);
		int64_t step;
		if (!e || e->type != SD_V_MAP) return sd_seterr("%s: no state for '%s'", where, o->names[i]);
		if (sd_map_get_int(e, "step", &step)) return sd_seterr("%s: no integer step for '%s'", where, o->names[i]);
		if (restore(o, i, sd_map_tensor(e, "exp_avg"), sd_map_tensor(e, "exp_avg_sq"), step, where)) return -1;
	}
	return 0;
}

/* ==== gradients ==== */

int sd_grad_zero(sd_tensor *const *grads, int n)
{
	for (int i = 0; i < n; i++)
		if (grads[i] && zero(grads[i])) return -1;
	return 0;
}

int sd_clip_grad_norm(float *total_norm, sd_tensor *const *grads, int n, float max_norm)
{
	/* per-tensor norms (float, as torch.linalg.vector_norm returns them), then the norm of those */
	double ss = 0;
	for (int i = 0; i < n; i++) {
		const sd_tensor *g = grads[i];
		if (!g) continue;
		if (g->dtype != SD_DTYPE_F32) return sd_seterr("sd_clip_grad_norm: gradient %d is not f32", i);
		const struct sd_backend *be = sd_backend_get(g->device);
		if (!be) return -1;
		if (be->device == SD_DEVICE_CPU) sd_threads_apply();
		if (!be->sumsq) return sd_seterr("sd_clip_grad_norm: not implemented on %s", be->name);
		double s = 0;
		if (sd_tensor_numel(g) && be->sumsq(&s, g->data, sd_tensor_numel(g))) return -1;
		float norm = (float)sqrt(s);
		ss += (double)norm * norm;
	}
	float total = (float)sqrt(ss);
	if (total_norm) *total_norm = total;
	float coef = max_norm / (total + 1e-6f);
	if (coef > 1.0f) coef = 1.0f;
	for (int i = 0; i < n; i++) {
		sd_tensor *g = grads[i];
		if (!g || !sd_tensor_numel(g)) continue;
		const struct sd_backend *be = sd_backend_get(g->device);
		if (be->add(g->data, g->data, NULL, coef, 0.0f, sd_tensor_numel(g), 1, 1)) return -1;
	}
	return 0;
}
