/*
 * test_train.c - the training step (lib/train/step.c) and the model backwards (clip.c, unet.c, vae.c)
 * against PyTorch: golden/tiny/train_step.safetensors (diffusers' train_text_to_image_lora.py step with
 * PEFT adapters on the UNet and the text encoder, VAE frozen) and train_step_vae_lora.safetensors (VAE
 * encoder adapters trained through the posterior sample, decoder-side adapters without gradient): the
 * intermediates, the loss, every gradient, one and two AdamW steps and the optimizer state, with and
 * without gradient checkpointing.  Then central finite differences: a few LoRA parameters of the whole
 * step, and the input and adapter gradients of one CLIP layer, one UNet resnet and transformer, and
 * the VAE encoder.
 */
#include <stdint.h>
#include "sd.h"
#include "test.h"

static char fx_buf[4][512];

/* A fixture path under $SD_FIXTURES (else tests/fixtures), falling back to $SHARED; NULL when absent. */
static const char *fixture(const char *rel, int slot)
{
	const char *roots[3] = {getenv("SD_FIXTURES"), getenv("SHARED"), "../shared/fixtures"};
	if (!roots[0] || !*roots[0]) roots[0] = "tests/fixtures";
	for (int i = 0; i < 3; i++) {
		if (!roots[i] || !*roots[i]) continue;
		snprintf(fx_buf[slot], sizeof fx_buf[slot], "%s/%s", roots[i], rel);
		FILE *f = fopen(fx_buf[slot], "rb");
		if (f) {
			fclose(f);
			return fx_buf[slot];
		}
	}
	return NULL;
}

/* ==== the tiny model ==== */

typedef struct tiny {
	sd_model *m;
	sd_weights *w[3];
	sd_clip *te;
	sd_vae *vae;
	sd_unet *u;
} tiny;

static int tiny_open(tiny *t)
{
	memset(t, 0, sizeof *t);
	const char *path = fixture("tiny/model_index.json", 0);
	if (!path) return 0;
	char dir[512];
	snprintf(dir, sizeof dir, "%s", path);
	*strrchr(dir, '/') = 0;
	if (!(t->m = sd_model_open(dir, NULL))) return -1;
	for (int c = 0; c < 3; c++)
		if (!(t->w[c] = sd_weights_load(t->m, (enum sd_component)c, SD_DEVICE_CPU))) return -1;
	t->te = sd_clip_new(t->w[SD_TEXT_ENCODER]);
	t->vae = sd_vae_new(t->w[SD_VAE]);
	t->u = sd_unet_new(t->w[SD_UNET]);
	return t->te && t->vae && t->u ? 1 : -1;
}

static void tiny_close(tiny *t)
{
	sd_unet_free(t->u);
	sd_vae_free(t->vae);
	sd_clip_free(t->te);
	for (int c = 0; c < 3; c++) sd_weights_free(t->w[c]);
	sd_model_close(t->m);
}

#define OPEN_TINY(t) do {                                                          \
	int rc_ = tiny_open(t);                                                        \
	if (rc_ == 0) { tiny_close(t); SKIP("tiny fixture model not found"); }         \
	if (rc_ < 0) { printf("  tiny: %s\n", sd_errmsg()); test_failed_++; tiny_close(t); return; } \
} while (0)

static const sd_tensor *gold(const sd_st *f, const char *name)
{
	int i = sd_st_find(f, name);
	return i < 0 ? NULL : sd_st_tensor(f, i);
}

/* Relative error of n floats against want (max|diff| / max|want|). */
static double relerr(const float *got, const float *want, long n)
{
	double md = 0, mr = 0;
	for (long i = 0; i < n; i++) {
		double d = fabs((double)got[i] - want[i]);
		if (isnan(got[i])) return INFINITY;
		if (d > md) md = d;
		if (fabs(want[i]) > mr) mr = fabs(want[i]);
	}
	return md / (mr > 1e-30 ? mr : 1e-30);
}

/* A trainer over the tiny model with the goldens' setup: UNet + text (+ VAE) adapters r 8 alpha 16,
 * no dropout, AdamW(lr 1e-4, wd 1e-2), the parameters set from param0.*. */
static sd_trainer *golden_trainer(tiny *m, const sd_st *f, int vae, int ckpt)
{
	sd_train_config c;
	sd_train_defaults(&c);
	c.train = SD_TRAIN_UNET | SD_TRAIN_TEXT | (vae ? SD_TRAIN_VAE : 0);
	c.dropout = 0;
	sd_optim_defaults(&c.optim, SD_OPTIM_ADAMW);
	c.optim.lr = 1e-4;
	c.optim.weight_decay = 1e-2;
	c.checkpointing = ckpt;
	sd_trainer *t = sd_trainer_new(&c, m->u, m->te, m->vae);
	if (!t) {
		printf("  sd_trainer_new: %s\n", sd_errmsg());
		test_failed_++;
		return NULL;
	}
	int n0 = 0;
	for (int i = 0; i < sd_st_count(f); i++) n0 += !strncmp(sd_st_name(f, i), "param0.", 7);
	if (n0 != sd_trainer_param_count(t)) {
		printf("  the golden has %d parameters, the trainer %d\n", n0, sd_trainer_param_count(t));
		test_failed_++;
	}
	for (int i = 0; i < sd_trainer_param_count(t); i++) {
		char n[512];
		snprintf(n, sizeof n, "param0.%s", sd_trainer_param_name(t, i));
		const sd_tensor *g = gold(f, n);
		if (!g || !sd_tensor_same_shape(g, sd_trainer_param(t, i))) {
			printf("  %s: missing from the golden or of another shape\n", n);
			test_failed_++;
			continue;
		}
		sd_tensor_copy(sd_trainer_param(t, i), g);
	}
	return t;
}

static void golden_batch(const sd_st *f, sd_train_batch *b, int64_t *ts)
{
	memset(b, 0, sizeof *b);
	b->pixels = gold(f, "pixel_values");
	b->eps_posterior = gold(f, "eps_posterior");
	b->noise = gold(f, "noise");
	b->input_ids = gold(f, "input_ids");
	const sd_tensor *t = gold(f, "timesteps");
	for (int i = 0; i < t->shape[0]; i++) ts[i] = ((const int64_t *)t->data)[i];
	b->timesteps = ts;
}

static float scalar(const sd_st *f, const char *name)
{
	const sd_tensor *t = gold(f, name);
	return t ? *(const float *)t->data : NAN;
}

/* Compare every "<prefix><param>" with the trainer's tensors (what: 0 grads, 1 params, 2 exp_avg,
 * 3 exp_avg_sq) and print the worst per component. */
static void compare_all(sd_trainer *t, const sd_st *f, const char *prefix, int what, double tol)
{
	static const char *const comp[3] = {"unet.", "text_encoder.", "vae."};
	double worst[3] = {0, 0, 0};
	const char *wname[3] = {"", "", ""};
	int nseen = 0;
	for (int i = 0; i < sd_trainer_param_count(t); i++) {
		const char *pn = sd_trainer_param_name(t, i);
		char n[512];
		snprintf(n, sizeof n, "%s%s", prefix, pn);
		const sd_tensor *want = gold(f, n);
		const sd_tensor *got = what == 0 ? sd_trainer_grad(t, i)
		                       : what == 1 ? sd_trainer_param(t, i)
		                       : what == 2 ? sd_optim_exp_avg(sd_trainer_optim(t), i)
		                                   : sd_optim_exp_avg_sq(sd_trainer_optim(t), i);
		if (!want) {
			/* params_without_grad: no gradient, no optimizer state change */
			if (what == 0 && got) {
				printf("  %s: the trainer has a gradient the golden lacks\n", pn);
				test_failed_++;
			}
			if (what == 1 || what == 0) continue;
			continue;
		}
		if (!got) {
			printf("  %s: no tensor in the trainer\n", n);
			test_failed_++;
			continue;
		}
		nseen++;
		double e = relerr(got->data, want->data, (long)sd_tensor_numel(want));
		int c = !strncmp(pn, comp[0], 5) ? 0 : !strncmp(pn, comp[1], 13) ? 1 : 2;
		if (e > worst[c]) worst[c] = e, wname[c] = pn;
		if (!(e <= tol)) {
			printf("  %s: rel %.3g > %.1g FAILED\n", n, e, tol);
			test_failed_++;
		}
	}
	for (int c = 0; c < 3; c++)
		if (*wname[c]) printf("  %s*: %d tensors, worst %s%.3g (%s)\n", prefix, nseen, comp[c], worst[c], wname[c]);
}

/* The parameters the golden says get no gradient are unchanged by the steps. */
static void check_untouched(sd_trainer *t, const sd_st *f, const char *prefix)
{
	for (int i = 0; i < sd_trainer_param_count(t); i++) {
		if (sd_trainer_grad(t, i)) continue;
		char n0[512], n1[512];
		snprintf(n0, sizeof n0, "param0.%s", sd_trainer_param_name(t, i));
		snprintf(n1, sizeof n1, "%s%s", prefix, sd_trainer_param_name(t, i));
		const sd_tensor *a = gold(f, n0), *b = gold(f, n1);
		const sd_tensor *p = sd_trainer_param(t, i);
		if (!a || !b || memcmp(p->data, a->data, sd_tensor_nbytes(a)) || memcmp(b->data, a->data, sd_tensor_nbytes(a))) {
			printf("  %s changed (it has no gradient)\n", sd_trainer_param_name(t, i));
			test_failed_++;
		}
	}
}

static void golden_step(const char *rel, int vae, int ckpt)
{
	const char *path = fixture(rel, 1);
	if (!path) SKIP("%s not found", rel);
	sd_st *f = sd_st_open(path);
	if (!f) {
		printf("  %s: %s\n", path, sd_errmsg());
		test_failed_++;
		return;
	}
	tiny m;
	OPEN_TINY(&m);
	sd_trainer *t = golden_trainer(&m, f, vae, ckpt);
	if (!t) goto done;
	sd_train_batch b;
	int64_t ts[16];
	golden_batch(f, &b, ts);
	double loss = NAN;
	CHECK_OK(sd_train_step(t, &b, &loss));
	static const char *const inter[4] = {"latents", "noisy_latents", "encoder_hidden_states", "model_pred"};
	for (int i = 0; i < 4; i++) {
		const sd_tensor *got = sd_trainer_last(t, inter[i]), *want = gold(f, inter[i]);
		CHECK(got && want && sd_tensor_same_shape(got, want));
		if (got && want && sd_tensor_same_shape(got, want))
			test_close_(__FILE__, __LINE__, inter[i], got->data, want->data, (long)sd_tensor_numel(want), 1e-4);
	}
	float l = (float)loss, lw = scalar(f, "loss");
	CHECK_CLOSE(&l, &lw, 1, 1e-5);
	compare_all(t, f, "grad.", 0, 1e-3);
	float gn = sd_trainer_grad_norm(t), gnw = scalar(f, "grad_total_norm");
	CHECK_CLOSE(&gn, &gnw, 1, 1e-4);
	compare_all(t, f, "param1.", 1, 1e-4);
	compare_all(t, f, "adam_exp_avg1.", 2, 1e-3);
	compare_all(t, f, "adam_exp_avg_sq1.", 3, 2e-3);
	check_untouched(t, f, "param1.");
	/* the same batch again */
	CHECK_OK(sd_train_step(t, &b, &loss));
	l = (float)loss, lw = scalar(f, "loss_step2");
	CHECK_CLOSE(&l, &lw, 1, 1e-5);
	compare_all(t, f, "grad_step2.", 0, 1e-3);
	compare_all(t, f, "param2.", 1, 1e-4);
	check_untouched(t, f, "param2.");
	printf("  activation memory of a step: %.1f MiB\n", sd_trainer_peak_bytes(t) / 1048576.0);
	sd_trainer_free(t);
done:
	tiny_close(&m);
	sd_st_close(f);
}

TEST(train_step_golden) { golden_step("golden/tiny/train_step.safetensors", 0, 0); }
TEST(train_step_golden_checkpointing) { golden_step("golden/tiny/train_step.safetensors", 0, 1); }
TEST(train_step_vae_lora_golden) { golden_step("golden/tiny/train_step_vae_lora.safetensors", 1, 0); }
TEST(train_step_vae_lora_golden_checkpointing) { golden_step("golden/tiny/train_step_vae_lora.safetensors", 1, 1); }

/* ==== finite differences ==== */

typedef double (*loss_fn)(void *ctx);

/* Central difference of loss with respect to p[i] (step h), against the analytic g; prints one line and
 * returns the relative error (relative to max(|fd|, |g|, floor)). */
static double fd_one(const char *what, float *p, long i, double g, loss_fn f, void *ctx, float h, double floor)
{
	float old = p[i];
	p[i] = old + h;
	double lp = f(ctx);
	float up = p[i];
	p[i] = old - h;
	double lm = f(ctx);
	float dn = p[i];
	p[i] = old;
	double fd = (lp - lm) / ((double)up - dn), den = fmax(fmax(fabs(fd), fabs(g)), floor);
	double e = fabs(fd - g) / den;
	printf("    %s[%ld]: analytic %.6g fd %.6g rel %.2g\n", what, i, g, fd, e);
	return e;
}

/* The index of the largest |g[i]| among n. */
static long argmax_abs(const float *g, long n)
{
	long k = 0;
	for (long i = 1; i < n; i++)
		if (fabsf(g[i]) > fabsf(g[k])) k = i;
	return k;
}

static void fill_random(float *p, long n, uint64_t *s, float scale)
{
	for (long i = 0; i < n; i++) {
		uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
		z ^= z >> 31;
		p[i] = scale * (float)((z >> 40) * (1.0 / 8388608.0) - 1.0);
	}
}

/* Σ out·w in double: a scalar loss whose gradient with respect to out is w. */
static double dot(const sd_tensor *a, const sd_tensor *w)
{
	double s = 0;
	const float *x = a->data, *y = w->data;
	for (int64_t i = 0, n = sd_tensor_numel(a); i < n; i++) s += (double)x[i] * y[i];
	return s;
}

/* ---- the whole step ---- */

struct step_ctx {
	sd_trainer *t;
	sd_train_batch *b;
};

static double step_loss(void *ctx)
{
	struct step_ctx *c = ctx;
	double loss = NAN;
	if (sd_trainer_accumulate(c->t, c->b, 1.0f, &loss)) printf("  accumulate: %s\n", sd_errmsg());
	return loss;
}

TEST(train_step_finite_differences)
{
	const char *path = fixture("golden/tiny/train_step_vae_lora.safetensors", 1);
	if (!path) SKIP("train_step_vae_lora.safetensors not found");
	sd_st *f = sd_st_open(path);
	tiny m;
	OPEN_TINY(&m);
	sd_trainer *t = f ? golden_trainer(&m, f, 1, 0) : NULL;
	CHECK(t != NULL);
	if (!t) goto done;
	sd_train_batch b;
	int64_t ts[16];
	golden_batch(f, &b, ts);
	double loss;
	CHECK_OK(sd_trainer_zero_grad(t));
	CHECK_OK(sd_trainer_accumulate(t, &b, 1.0f, &loss));
	/* analytic gradients, copied before the finite-difference evaluations add to them */
	int np = sd_trainer_param_count(t);
	float **g = calloc(np, sizeof *g);
	for (int i = 0; i < np; i++) {
		const sd_tensor *gr = sd_trainer_grad(t, i);
		if (!gr) continue;
		g[i] = malloc(sd_tensor_nbytes(gr));
		memcpy(g[i], gr->data, sd_tensor_nbytes(gr));
	}
	/* per component, the lora_A and the lora_B element with the largest gradient (where the loss's float
	 * rounding is small against the change), and three fixed elements of smaller gradients */
	struct step_ctx ctx = {t, &b};
	double worst = 0;
	static const char *const comp[3] = {"unet.", "text_encoder.", "vae.encoder."};
	for (int cpt = 0; cpt < 3; cpt++)
		for (int ab = 0; ab < 2; ab++) {
			int bi = -1;
			long be = 0;
			for (int i = 0; i < np; i++) {
				const char *n = sd_trainer_param_name(t, i);
				if (!g[i] || strncmp(n, comp[cpt], strlen(comp[cpt])) || !strstr(n, ab ? ".lora_B." : ".lora_A.")) continue;
				long e = argmax_abs(g[i], (long)sd_tensor_numel(sd_trainer_param(t, i)));
				if (bi < 0 || fabsf(g[i][e]) > fabsf(g[bi][be])) bi = i, be = e;
			}
			CHECK(bi >= 0);
			if (bi < 0) continue;
			double r = fd_one(sd_trainer_param_name(t, bi), sd_trainer_param(t, bi)->data, be, g[bi][be], step_loss,
			                  &ctx, 1e-2f, 1e-6);
			if (r > worst) worst = r;
		}
	const char *pick[] = {
		"unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.lora_B.weight",
		"text_encoder.text_model.encoder.layers.3.self_attn.v_proj.lora_B.weight",
		"vae.encoder.mid_block.attentions.0.to_v.lora_B.weight",
	};
	for (size_t k = 0; k < sizeof pick / sizeof *pick; k++) {
		int i = sd_trainer_find(t, pick[k]);
		CHECK(i >= 0 && g[i]);
		if (i < 0 || !g[i]) continue;
		long e = (long)(sd_tensor_numel(sd_trainer_param(t, i)) / 3);
		/* an absolute floor of 5e-5: the loss (~1) rounds at ~1e-8, a difference quotient at h = 1e-2 to ~5e-7 */
		double r = fd_one(pick[k], sd_trainer_param(t, i)->data, e, g[i][e], step_loss, &ctx, 1e-2f, 5e-5);
		if (r > worst) worst = r;
	}
	printf("  whole step: worst relative error %.3g\n", worst);
	CHECK(worst < 2e-2);
	for (int i = 0; i < np; i++) free(g[i]);
	free(g);
	sd_trainer_free(t);
done:
	tiny_close(&m);
	sd_st_close(f);
}

/* ---- one CLIP layer ---- */

struct clip_ctx {
	const sd_clip_layer *p;
	const sd_clip_config *cfg;
	sd_clip_layer_act *a;
	sd_tensor *x, *out, *w;
};

static double clip_loss(void *ctx)
{
	struct clip_ctx *c = ctx;
	if (sd_clip_layer_forward(c->out, c->a, c->x, c->p, c->cfg)) printf("  clip forward: %s\n", sd_errmsg());
	return dot(c->out, c->w);
}

/* An adapter (rank 4, random A and B) with gradients on a linear, for the block tests. */
typedef struct test_adapter {
	sd_tensor *a, *b, *da, *db;
	sd_lora_layer l;
	sd_lora_train tr;
} test_adapter;

static void adapter_make(test_adapter *t, int64_t O, int64_t I, uint64_t *seed, float dropout)
{
	int64_t sa[2] = {4, I}, sb[2] = {O, 4};
	t->a = sd_tensor_new(SD_DTYPE_F32, 2, sa);
	t->b = sd_tensor_new(SD_DTYPE_F32, 2, sb);
	t->da = sd_tensor_new(SD_DTYPE_F32, 2, sa);
	t->db = sd_tensor_new(SD_DTYPE_F32, 2, sb);
	fill_random(t->a->data, (long)sd_tensor_numel(t->a), seed, 0.3f);
	fill_random(t->b->data, (long)sd_tensor_numel(t->b), seed, 0.3f);
	t->l = (sd_lora_layer){t->a, t->b, 2.0f, dropout};
	t->tr = (sd_lora_train){t->da, t->db, dropout, 7, NULL, 3};
}

static void adapter_free(test_adapter *t)
{
	sd_tensor_free(t->a), sd_tensor_free(t->b), sd_tensor_free(t->da), sd_tensor_free(t->db);
}

/* FD checks of the input x (3 elements) and of the adapter (the largest dA and dB elements). */
static double fd_block(const char *name, sd_tensor *x, const float *dx, test_adapter *ad, loss_fn f, void *ctx, float h)
{
	double worst = 0, r;
	long n = (long)sd_tensor_numel(x);
	long idx[3] = {argmax_abs(dx, n), n / 3, (2 * n) / 3 + 1};
	char what[96];
	for (int k = 0; k < 3; k++) {
		snprintf(what, sizeof what, "%s dx", name);
		if ((r = fd_one(what, x->data, idx[k], dx[idx[k]], f, ctx, h, 1e-3)) > worst) worst = r;
	}
	if (ad) {
		float *ga = malloc(sd_tensor_nbytes(ad->da)), *gb = malloc(sd_tensor_nbytes(ad->db));
		memcpy(ga, ad->da->data, sd_tensor_nbytes(ad->da));
		memcpy(gb, ad->db->data, sd_tensor_nbytes(ad->db));
		long ia = argmax_abs(ga, (long)sd_tensor_numel(ad->da)), ib = argmax_abs(gb, (long)sd_tensor_numel(ad->db));
		snprintf(what, sizeof what, "%s dA", name);
		if ((r = fd_one(what, ad->a->data, ia, ga[ia], f, ctx, h, 1e-3)) > worst) worst = r;
		snprintf(what, sizeof what, "%s dB", name);
		if ((r = fd_one(what, ad->b->data, ib, gb[ib], f, ctx, h, 1e-3)) > worst) worst = r;
		free(ga), free(gb);
	}
	printf("  %s: worst relative error %.3g\n", name, worst);
	return worst;
}

static sd_tensor *t3(int64_t a, int64_t b, int64_t c)
{
	return sd_tensor_newv(SD_DTYPE_F32, 3, a, b, c);
}

static sd_tensor *t4(int64_t a, int64_t b, int64_t c, int64_t d)
{
	return sd_tensor_newv(SD_DTYPE_F32, 4, a, b, c, d);
}

TEST(clip_layer_backward_fd)
{
	tiny m;
	OPEN_TINY(&m);
	const sd_clip_config *cfg = sd_clip_get_config(m.te);
	sd_clip_layer p = *sd_clip_get_layer(m.te, 1);
	const int64_t N = 2, L = 7, D = cfg->hidden, F = cfg->intermediate, H = cfg->heads;
	uint64_t seed = 11;
	test_adapter q, v;
	adapter_make(&q, D, D, &seed, 0.25f); /* with dropout: the backward regenerates the masks */
	adapter_make(&v, D, D, &seed, 0);
	p.q.lora = &q.l, p.q.train = &q.tr;
	p.v.lora = &v.l, p.v.train = &v.tr;
	sd_clip_layer_act a = {t3(N, L, D), t3(N, L, D), t3(N, L, D), t3(N, L, D), t4(N, H, L, L), t3(N, L, D),
	                       t3(N, L, D), t3(N, L, D), t3(N, L, F), t3(N, L, F), t3(N, L, D), t3(N, L, 4)};
	struct clip_ctx c = {&p, cfg, &a, t3(N, L, D), t3(N, L, D), t3(N, L, D)};
	fill_random(c.x->data, N * L * D, &seed, 1.0f);
	fill_random(c.w->data, N * L * D, &seed, 1.0f);
	sd_tensor *dx = t3(N, L, D);
	sd_arena *s = sd_arena_new(SD_DEVICE_CPU, 0);
	clip_loss(&c);
	CHECK_OK(sd_clip_layer_backward(dx, c.w, &a, c.x, &p, cfg, s, 0));
	double worst = fd_block("clip layer (q_proj)", c.x, dx->data, &q, clip_loss, &c, 1e-2f);
	worst = fmax(worst, fd_block("clip layer (v_proj)", c.x, dx->data, &v, clip_loss, &c, 1e-2f));
	CHECK(worst < 1e-2);
	/* acc = 1 adds (the finite differences left the activations of a perturbed input: redo them) */
	clip_loss(&c);
	sd_tensor *dx2 = t3(N, L, D);
	memcpy(dx2->data, dx->data, sd_tensor_nbytes(dx));
	CHECK_OK(sd_clip_layer_backward(dx2, c.w, &a, c.x, &p, cfg, s, 1));
	int ok = 1;
	for (int64_t i = 0; i < N * L * D; i++) ok &= fabsf(((float *)dx2->data)[i] - 2 * ((float *)dx->data)[i]) <= 1e-5f * (1 + fabsf(((float *)dx->data)[i]));
	CHECK(ok);
	sd_tensor_free(dx), sd_tensor_free(dx2);
	sd_tensor **ts = (sd_tensor **)&a;
	for (size_t i = 0; i < sizeof a / sizeof *ts; i++) sd_tensor_free(ts[i]);
	sd_tensor_free(c.x), sd_tensor_free(c.out), sd_tensor_free(c.w);
	sd_arena_free(s);
	adapter_free(&q), adapter_free(&v);
	tiny_close(&m);
}

/* ---- a UNet resnet and transformer ---- */

struct res_ctx {
	const sd_unet_resnet *p;
	sd_unet_resnet_act *a;
	sd_tensor *x, *temb, *out, *w;
	int groups;
	float eps;
};

static double res_loss(void *ctx)
{
	struct res_ctx *c = ctx;
	if (sd_unet_resnet_forward(c->out, c->a, c->x, c->temb, c->p, c->groups, c->eps)) printf("  %s\n", sd_errmsg());
	return dot(c->out, c->w);
}

TEST(unet_resnet_backward_fd)
{
	tiny m;
	OPEN_TINY(&m);
	const sd_unet_config *cfg = sd_unet_get_config(m.u);
	/* the first resnet with a shortcut (cin != cout), and one without */
	double worst = 0;
	for (int want_sc = 1; want_sc >= 0; want_sc--) {
		sd_unet_resnet *p = NULL;
		for (int i = 0; i < sd_unet_resnet_count(m.u) && !p; i++) {
			sd_unet_resnet *r = sd_unet_get_resnet(m.u, i);
			if ((r->shortcut.w != NULL) == want_sc) p = r;
		}
		CHECK(p != NULL);
		if (!p) continue;
		sd_unet_resnet q = *p;
		q.out_scale = want_sc ? 1.0f : 1.5f; /* the mid block's output_scale_factor path */
		const int64_t N = 2, H = 5, W = 6, ci = q.cin, co = q.cout, T = cfg->temb_dim;
		uint64_t seed = 5 + want_sc;
		sd_unet_resnet_act a = {t4(N, ci, H, W), t4(N, ci, H, W), sd_tensor_newv(SD_DTYPE_F32, 2, N, co), t4(N, co, H, W),
		                        t4(N, co, H, W), t4(N, co, H, W), want_sc ? t4(N, co, H, W) : NULL};
		struct res_ctx c = {&q, &a, t4(N, ci, H, W), sd_tensor_newv(SD_DTYPE_F32, 2, N, T), t4(N, co, H, W),
		                    t4(N, co, H, W), cfg->groups, cfg->eps};
		fill_random(c.x->data, (long)sd_tensor_numel(c.x), &seed, 1.0f);
		fill_random(c.temb->data, (long)sd_tensor_numel(c.temb), &seed, 1.0f);
		fill_random(c.w->data, (long)sd_tensor_numel(c.w), &seed, 1.0f);
		sd_tensor *dx = t4(N, ci, H, W);
		sd_arena *s = sd_arena_new(SD_DEVICE_CPU, 0);
		res_loss(&c);
		CHECK_OK(sd_unet_resnet_backward(dx, c.w, &a, c.x, &q, cfg->groups, cfg->eps, s, 0));
		worst = fmax(worst, fd_block(want_sc ? "unet resnet (shortcut)" : "unet resnet (scaled)", c.x, dx->data, NULL,
		                             res_loss, &c, 1e-2f));
		sd_tensor **ts = (sd_tensor **)&a;
		for (size_t i = 0; i < sizeof a / sizeof *ts; i++) sd_tensor_free(ts[i]);
		sd_tensor_free(c.x), sd_tensor_free(c.temb), sd_tensor_free(c.out), sd_tensor_free(c.w), sd_tensor_free(dx);
		sd_arena_free(s);
	}
	CHECK(worst < 1e-2);
	tiny_close(&m);
}

struct tr_ctx {
	const sd_unet_transformer *p;
	sd_unet_transformer_act *a;
	sd_tensor *x, *ctx, *out, *w;
	int groups;
};

static double tr_loss(void *ctx)
{
	struct tr_ctx *c = ctx;
	if (sd_unet_transformer_forward(c->out, c->a, c->x, c->ctx, c->p, c->groups)) printf("  %s\n", sd_errmsg());
	return dot(c->out, c->w);
}

static void attn_alloc(sd_unet_attn_act *b, int64_t N, int64_t Lq, int64_t Lk, int64_t I, int64_t heads)
{
	b->q = t3(N, Lq, I), b->k = t3(N, Lk, I), b->v = t3(N, Lk, I), b->probs = t4(N, heads, Lq, Lk);
	b->o = t3(N, Lq, I), b->lora = t3(N, Lq > Lk ? Lq : Lk, 4);
}

static void attn_free(sd_unet_attn_act *b)
{
	sd_tensor_free(b->q), sd_tensor_free(b->k), sd_tensor_free(b->v), sd_tensor_free(b->probs);
	sd_tensor_free(b->o), sd_tensor_free(b->lora);
}

TEST(unet_transformer_backward_fd)
{
	tiny m;
	OPEN_TINY(&m);
	const sd_unet_config *cfg = sd_unet_get_config(m.u);
	sd_unet_transformer p = *sd_unet_get_transformer(m.u, 0);
	p.nlayers = 1;
	const int64_t N = 2, C = p.c, I = p.inner, H = 3, W = 4, L = H * W, Lc = 5,
	              Dc = p.blk[0].attn2.k.w->shape[1], heads = p.blk[0].attn1.heads;
	uint64_t seed = 21;
	/* adapters on attn1.to_q (dropout) and attn2.to_v (the context path) */
	test_adapter q, v;
	adapter_make(&q, I, C, &seed, 0.2f);
	adapter_make(&v, I, Dc, &seed, 0);
	sd_unet_linear *lq = &p.blk[0].attn1.q, *lv = &p.blk[0].attn2.v;
	lq->lora_a = q.a, lq->lora_b = q.b, lq->lora_scale = 2.0f, lq->train = &q.tr;
	lv->lora_a = v.a, lv->lora_b = v.b, lv->lora_scale = 2.0f, lv->train = &v.tr;
	sd_unet_transformer_act a;
	memset(&a, 0, sizeof a);
	a.n = t4(N, C, H, W), a.nl = t3(N, L, C), a.h[0] = t3(N, L, I), a.h[1] = t3(N, L, I), a.p = t3(N, L, C);
	sd_unet_tblock_act *b = &a.blk[0];
	b->ln1 = t3(N, L, I), b->r1 = t3(N, L, I), b->ln2 = t3(N, L, I), b->r2 = t3(N, L, I), b->ln3 = t3(N, L, I);
	b->ffh = t3(N, L, 8 * I), b->ffg = t3(N, L, 4 * I), b->tmp = t3(N, L, I);
	attn_alloc(&b->a1, N, L, L, I, heads);
	attn_alloc(&b->a2, N, L, Lc, I, heads);
	struct tr_ctx c = {&p, &a, t4(N, C, H, W), t3(N, Lc, Dc), t4(N, C, H, W), t4(N, C, H, W), cfg->groups};
	fill_random(c.x->data, (long)sd_tensor_numel(c.x), &seed, 1.0f);
	fill_random(c.ctx->data, (long)sd_tensor_numel(c.ctx), &seed, 1.0f);
	fill_random(c.w->data, (long)sd_tensor_numel(c.w), &seed, 1.0f);
	sd_tensor *dx = t4(N, C, H, W), *dctx = t3(N, Lc, Dc);
	sd_arena *s = sd_arena_new(SD_DEVICE_CPU, 0);
	tr_loss(&c);
	CHECK_OK(sd_unet_transformer_backward(dx, dctx, c.w, &a, c.x, c.ctx, &p, cfg->groups, s, 0));
	double worst = fd_block("unet transformer (attn1.to_q)", c.x, dx->data, &q, tr_loss, &c, 1e-2f);
	worst = fmax(worst, fd_block("unet transformer (attn2.to_v)", c.ctx, dctx->data, &v, tr_loss, &c, 1e-2f));
	CHECK(worst < 1e-2);
	attn_free(&b->a1), attn_free(&b->a2);
	sd_tensor *fr[] = {a.n, a.nl, a.h[0], a.h[1], a.p, b->ln1, b->r1, b->ln2, b->r2, b->ln3, b->ffh, b->ffg, b->tmp,
	                   c.x, c.ctx, c.out, c.w, dx, dctx};
	for (size_t i = 0; i < sizeof fr / sizeof *fr; i++) sd_tensor_free(fr[i]);
	sd_arena_free(s);
	adapter_free(&q), adapter_free(&v);
	tiny_close(&m);
}

/* ---- the whole UNet: dlatent and dcontext, recorded and checkpointed ---- */

struct unet_ctx {
	sd_unet *u;
	sd_tensor *x, *ctx, *out, *w;
	float t[2];
};

static double unet_loss(void *ctx)
{
	struct unet_ctx *c = ctx;
	if (sd_unet_forward(c->u, NULL, c->out, c->x, c->t, 2, c->ctx)) printf("  %s\n", sd_errmsg());
	return dot(c->out, c->w);
}

TEST(unet_backward_fd)
{
	tiny m;
	OPEN_TINY(&m);
	const sd_unet_config *cfg = sd_unet_get_config(m.u);
	const int64_t N = 2, h = 6, w = 6, Lc = 4, Dc = sd_unet_get_transformer(m.u, 0)->blk[0].attn2.k.w->shape[1];
	uint64_t seed = 33;
	struct unet_ctx c = {m.u, t4(N, cfg->in_channels, h, w), t3(N, Lc, Dc), t4(N, cfg->out_channels, h, w),
	                     t4(N, cfg->out_channels, h, w), {10.0f, 700.0f}};
	fill_random(c.x->data, (long)sd_tensor_numel(c.x), &seed, 1.0f);
	fill_random(c.ctx->data, (long)sd_tensor_numel(c.ctx), &seed, 1.0f);
	fill_random(c.w->data, (long)sd_tensor_numel(c.w), &seed, 1.0f);
	sd_tensor *dl[2] = {t4(N, cfg->in_channels, h, w), t4(N, cfg->in_channels, h, w)};
	sd_tensor *dc[2] = {t3(N, Lc, Dc), t3(N, Lc, Dc)};
	sd_arena *a = sd_arena_new(SD_DEVICE_CPU, 0);
	for (int ck = 0; ck < 2; ck++) {
		sd_unet_act act;
		sd_arena_reset(a);
		CHECK_OK(ck ? sd_unet_forward_checkpointed(m.u, &act, a, c.x, c.t, 2, c.ctx)
		            : sd_unet_forward_record(m.u, &act, a, c.x, c.t, 2, c.ctx));
		CHECK_OK(sd_unet_backward(m.u, &act, c.w, dl[ck], dc[ck]));
	}
	/* checkpointing recomputes the same numbers */
	CHECK_CLOSE(dl[1]->data, dl[0]->data, (long)sd_tensor_numel(dl[0]), 1e-6);
	CHECK_CLOSE(dc[1]->data, dc[0]->data, (long)sd_tensor_numel(dc[0]), 1e-6);
	double worst = fd_block("unet dlatent", c.x, dl[0]->data, NULL, unet_loss, &c, 1e-2f);
	worst = fmax(worst, fd_block("unet dcontext", c.ctx, dc[0]->data, NULL, unet_loss, &c, 1e-2f));
	CHECK(worst < 1e-2);
	sd_tensor *fr[] = {c.x, c.ctx, c.out, c.w, dl[0], dl[1], dc[0], dc[1]};
	for (size_t i = 0; i < sizeof fr / sizeof *fr; i++) sd_tensor_free(fr[i]);
	sd_arena_free(a);
	tiny_close(&m);
}

/* ---- the VAE encoder ---- */

struct vae_ctx {
	sd_vae *v;
	sd_tensor *x, *mom, *w;
};

static double vae_loss(void *ctx)
{
	struct vae_ctx *c = ctx;
	const sd_vae_tiling none = {-1, 0};
	if (sd_vae_encode(c->v, c->mom, c->x, &none)) printf("  %s\n", sd_errmsg());
	return dot(c->mom, c->w);
}

TEST(vae_encoder_backward_fd)
{
	tiny m;
	OPEN_TINY(&m);
	const sd_vae_config *cfg = sd_vae_get_config(m.vae);
	if (!cfg->mid_attention) SKIP("the tiny VAE has no mid-block attention");
	int f = sd_vae_factor(m.vae);
	const int64_t N = 2, H = 2 * f, W = 3 * f, C = sd_vae_encoder_attn(m.vae)->c;
	uint64_t seed = 44;
	test_adapter k;
	adapter_make(&k, C, C, &seed, 0);
	sd_vae_conv *lk = sd_vae_find_linear(m.vae, "encoder.mid_block.attentions.0.to_k");
	CHECK(lk != NULL);
	if (!lk) return;
	lk->lora = &k.l, lk->train = &k.tr;
	struct vae_ctx c = {m.vae, t4(N, cfg->in_channels, H, W), t4(N, 2 * cfg->latent_channels, H / f, W / f),
	                    t4(N, 2 * cfg->latent_channels, H / f, W / f)};
	fill_random(c.x->data, (long)sd_tensor_numel(c.x), &seed, 1.0f);
	fill_random(c.w->data, (long)sd_tensor_numel(c.w), &seed, 1.0f);
	sd_tensor *dx = t4(N, cfg->in_channels, H, W);
	sd_arena *a = sd_arena_new(SD_DEVICE_CPU, 0);
	sd_vae_enc_act act;
	CHECK_OK(sd_vae_encode_record(m.vae, &act, a, c.x));
	CHECK_OK(sd_vae_encode_backward(m.vae, &act, c.w, dx));
	double worst = fd_block("vae encoder (to_k)", c.x, dx->data, &k, vae_loss, &c, 1e-2f);
	CHECK(worst < 1e-2);
	/* the gaussian sample's backward, as the trainer chains it */
	lk->lora = NULL, lk->train = NULL;
	sd_tensor_free(c.x), sd_tensor_free(c.mom), sd_tensor_free(c.w), sd_tensor_free(dx);
	sd_arena_free(a);
	adapter_free(&k);
	tiny_close(&m);
}

/* ---- dropout: the step is reproducible, and masks change the loss ---- */

TEST(train_dropout_reproducible)
{
	const char *path = fixture("golden/tiny/train_step.safetensors", 1);
	if (!path) SKIP("train_step.safetensors not found");
	sd_st *f = sd_st_open(path);
	tiny m;
	OPEN_TINY(&m);
	sd_train_batch b;
	int64_t ts[16];
	golden_batch(f, &b, ts);
	double loss[3];
	float *g[2] = {NULL, NULL};
	long gn = 0;
	for (int run = 0; run < 3; run++) {
		sd_train_config c;
		sd_train_defaults(&c);
		c.train = SD_TRAIN_UNET | SD_TRAIN_TEXT;
		c.dropout = run < 2 ? 0.3f : 0;
		c.seed = 99;
		c.checkpointing = run == 1;
		sd_trainer *t = sd_trainer_new(&c, m.u, m.te, m.vae);
		CHECK(t != NULL);
		if (!t) break;
		/* B nonzero so that dropout on A's input matters */
		for (int i = 0; i < sd_trainer_param_count(t); i++) {
			char n[512];
			snprintf(n, sizeof n, "param0.%s", sd_trainer_param_name(t, i));
			const sd_tensor *p = gold(f, n);
			if (p) sd_tensor_copy(sd_trainer_param(t, i), p);
		}
		CHECK_OK(sd_trainer_zero_grad(t));
		CHECK_OK(sd_trainer_accumulate(t, &b, 1.0f, &loss[run]));
		if (run < 2) {
			const sd_tensor *gr = sd_trainer_grad(t, 0);
			g[run] = malloc(sd_tensor_nbytes(gr));
			gn = (long)sd_tensor_numel(gr);
			memcpy(g[run], gr->data, sd_tensor_nbytes(gr));
		}
		sd_trainer_free(t);
	}
	printf("  loss with dropout %.9g (checkpointed %.9g), without %.9g\n", loss[0], loss[1], loss[2]);
	CHECK(loss[0] == loss[1]);
	CHECK(loss[0] != loss[2]);
	if (g[0] && g[1]) CHECK_CLOSE(g[1], g[0], gn, 1e-6);
	free(g[0]), free(g[1]);
	tiny_close(&m);
	sd_st_close(f);
}


/* ---- the decoder-side VAE LoRA through the reconstruction loss (--vae-recon-weight) ---- */

static double recon_loss(void *ctx)
{
	struct step_ctx *c = ctx;
	double loss = NAN;
	if (sd_trainer_accumulate(c->t, c->b, 1.0f, &loss)) printf("  accumulate: %s\n", sd_errmsg());
	return sd_trainer_recon_loss(c->t);
}

TEST(train_vae_recon)
{
	const char *path = fixture("golden/tiny/train_step_vae_lora.safetensors", 1);
	if (!path) SKIP("train_step_vae_lora.safetensors not found");
	sd_st *f = sd_st_open(path);
	tiny m;
	OPEN_TINY(&m);
	sd_train_batch b;
	int64_t ts[16];
	golden_batch(f, &b, ts);
	static const char *const dec[3] = {"vae.decoder.mid_block.attentions.0.to_q.lora_B.weight",
	                                   "vae.decoder.mid_block.attentions.0.to_k.lora_B.weight",
	                                   "vae.decoder.mid_block.attentions.0.to_v.lora_B.weight"};
	for (int run = 0; run < 2; run++) {
		sd_train_config c;
		sd_train_defaults(&c);
		c.train = SD_TRAIN_VAE;
		c.dropout = 0;
		c.optim.lr = 1e-2;
		c.vae_recon_weight = run ? 1.0f : 0.0f;
		sd_trainer *t = sd_trainer_new(&c, m.u, m.te, m.vae);
		CHECK(t != NULL);
		if (!t) break;
		double loss, r0 = 0, rl = 0;
		if (!run) {
			/* (a) W = 0: no gradient, the decoder adapter stays as made (B zero) */
			for (int s = 0; s < 2; s++) CHECK_OK(sd_train_step(t, &b, &loss));
			CHECK(sd_trainer_recon_loss(t) == 0);
			for (int k = 0; k < 3; k++) {
				int i = sd_trainer_find(t, dec[k]);
				CHECK(i >= 0 && sd_trainer_grad(t, i) == NULL);
				if (i < 0) continue;
				const sd_tensor *p = sd_trainer_param(t, i);
				const float *pb = p->data;
				long nz = 0;
				for (int64_t j = 0; j < sd_tensor_numel(p); j++) nz += pb[j] != 0;
				CHECK(nz == 0);
			}
			sd_trainer_free(t);
			continue;
		}
		/* (b) W > 0: B gets non-zero gradients; (c) one element against central differences */
		CHECK_OK(sd_trainer_zero_grad(t));
		CHECK_OK(sd_trainer_accumulate(t, &b, 1.0f, &loss));
		r0 = sd_trainer_recon_loss(t);
		CHECK(r0 > 0);
		float *g = NULL;
		int gi = -1;
		long gn = 0;
		for (int k = 0; k < 3; k++) {
			int i = sd_trainer_find(t, dec[k]);
			const sd_tensor *gr = i >= 0 ? sd_trainer_grad(t, i) : NULL;
			CHECK(gr != NULL);
			if (!gr) continue;
			const float *p = gr->data;
			double ss = 0;
			for (int64_t j = 0; j < sd_tensor_numel(gr); j++) ss += (double)p[j] * p[j];
			printf("  %s: |grad| %.6g\n", dec[k], sqrt(ss));
			CHECK(ss > 0);
			if (k == 2) {
				gi = i, gn = (long)sd_tensor_numel(gr);
				g = malloc(sd_tensor_nbytes(gr));
				memcpy(g, gr->data, sd_tensor_nbytes(gr));
			}
		}
		if (g) {
			struct step_ctx ctx = {t, &b};
			long j = argmax_abs(g, gn);
			double e = fd_one("vae.decoder to_v lora_B", sd_trainer_param(t, gi)->data, j, g[j], recon_loss, &ctx,
			                  1e-2f, 1e-6);
			CHECK(e < 1e-2);
			free(g);
		}
		/* a few steps lower the reconstruction loss */
		for (int s = 0; s < 6; s++) {
			CHECK_OK(sd_train_step(t, &b, &loss));
			rl = sd_trainer_recon_loss(t);
		}
		printf("  recon loss %.6g → %.6g after 6 steps\n", r0, rl);
		CHECK(rl < r0);
		sd_trainer_free(t);
	}
	tiny_close(&m);
	sd_st_close(f);
}

int main(void)
{
	RUN(train_step_golden);
	RUN(train_step_golden_checkpointing);
	RUN(train_step_vae_lora_golden);
	RUN(train_step_vae_lora_golden_checkpointing);
	RUN(train_step_finite_differences);
	RUN(clip_layer_backward_fd);
	RUN(unet_resnet_backward_fd);
	RUN(unet_transformer_backward_fd);
	RUN(unet_backward_fd);
	RUN(vae_encoder_backward_fd);
	RUN(train_dropout_reproducible);
	RUN(train_vae_recon);
	return test_summary();
}
