/*
 * test_unet.c - lib/models/unet.c against diffusers' UNet2DConditionModel: golden/<model>/unet.safetensors
 * (noise predictions for three integer timesteps broadcast over a batch of 2, per-sample timesteps and a
 * fractional timestep) and unet_intermediates.safetensors (every top-level module's output through
 * forward hooks), for the tiny model (DownBlock2D + CrossAttnDownBlock2D) from its diffusers folder
 * (fp16 variant) and from its .ckpt, and for sd15-shape-small (the SD 1.5 block layout) from its folder
 * and its single-file .safetensors when $SHARED holds them.  Also the recorded forward, PEFT LoRA on
 * the attention projections (golden/tiny/lora_outputs, via $SHARED), odd latent sizes and bad input.
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

static const char *shared(void)
{
	const char *s = getenv("SHARED");
	return s && *s ? s : NULL;
}

static int exists(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (f) fclose(f);
	return f != NULL;
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

/* A UNet from a model path (folder or single file, with a config dir or NULL).  *why gets the loader's
 * message when the weights cannot be loaded (the caller decides whether that skips). */
static sd_unet *open_unet(const char *path, const char *config, sd_model **m, sd_weights **w, char *why, size_t n)
{
	*m = sd_model_open(path, config);
	*w = *m ? sd_weights_load(*m, SD_UNET, SD_DEVICE_CPU) : NULL;
	if (!*w) {
		snprintf(why, n, "%s", sd_errmsg());
		return NULL;
	}
	sd_unet *u = sd_unet_new(*w);
	if (!u) {
		printf("  %s: %s\n", path, sd_errmsg());
		test_failed_++;
	}
	return u;
}

static void close_unet(sd_unet *u, sd_model *m, sd_weights *w)
{
	sd_unet_free(u);
	sd_weights_free(w);
	sd_model_close(m);
}

/* A view of the k-th (N,…) slab of a golden tensor with a leading index. */
static sd_tensor slab(const sd_tensor *t, int k)
{
	sd_tensor v = *t;
	v.ndim = t->ndim - 1;
	for (int i = 0; i < v.ndim; i++) v.shape[i] = t->shape[i + 1];
	v.data = (char *)t->data + (size_t)k * sd_tensor_nbytes(&v);
	v.owns = 0;
	return v;
}

static float scalar(const sd_tensor *t, int i)
{
	switch (t->dtype) {
	case SD_DTYPE_I64: return (float)((const int64_t *)t->data)[i];
	case SD_DTYPE_I32: return (float)((const int32_t *)t->data)[i];
	default: return ((const float *)t->data)[i];
	}
}

/* ==== golden/<kind>/unet.safetensors ==== */

static void check_unet_golden(sd_unet *u, const char *golden, sd_arena *a)
{
	sd_st *g = sd_st_open(golden);
	if (!g) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return;
	}
	const sd_tensor *lat = gold(g, "latent"), *ctx = gold(g, "encoder_hidden_states"), *ts = gold(g, "timesteps"),
	                *np = gold(g, "noise_pred"), *pst = gold(g, "per_sample_timesteps"),
	                *nps = gold(g, "noise_pred_per_sample"), *ft = gold(g, "float_timestep"),
	                *npf = gold(g, "noise_pred_float_timestep");
	if (!lat || !ctx || !ts || !np || !pst || !nps || !ft || !npf) goto out;
	sd_tensor *eps = sd_tensor_new(SD_DTYPE_F32, 4, lat->shape);
	int64_t n = sd_tensor_numel(eps);
	for (int k = 0; k < ts->shape[0]; k++) {
		float t = scalar(ts, k);
		sd_tensor want = slab(np, k);
		if (a) sd_arena_reset(a);
		CHECK_OK(sd_unet_forward(u, a, eps, lat, &t, 1, ctx));
		printf("  timestep %g:\n", t);
		CHECK_CLOSE((const float *)eps->data, (const float *)want.data, n, RTOL);
	}
	float tt[2] = {scalar(pst, 0), scalar(pst, 1)};
	CHECK_OK(sd_unet_forward(u, a, eps, lat, tt, 2, ctx));
	printf("  per-sample timesteps %g, %g:\n", tt[0], tt[1]);
	CHECK_CLOSE((const float *)eps->data, (const float *)nps->data, n, RTOL);
	float tf = scalar(ft, 0);
	CHECK_OK(sd_unet_forward(u, a, eps, lat, &tf, 1, ctx));
	printf("  fractional timestep %.6g:\n", tf);
	CHECK_CLOSE((const float *)eps->data, (const float *)npf->data, n, RTOL);
	sd_tensor_free(eps);
out:
	sd_st_close(g);
}

/* ==== unet_intermediates.safetensors: module outputs through the hook ==== */

#define MAX_HOOKED 64
struct hooked {
	int n;
	char name[MAX_HOOKED][64];
	sd_tensor *t[MAX_HOOKED];
};

static void on_module(void *ctx, const char *module, const sd_tensor *out)
{
	struct hooked *h = ctx;
	if (h->n == MAX_HOOKED) return;
	snprintf(h->name[h->n], sizeof h->name[0], "%s", module);
	h->t[h->n] = sd_tensor_to_device(out, SD_DEVICE_CPU);
	h->n++;
}

static void check_intermediates(sd_unet *u, const char *golden)
{
	sd_st *g = sd_st_open(golden);
	if (!g) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return;
	}
	const sd_tensor *lat = gold(g, "latent"), *ctx = gold(g, "encoder_hidden_states"), *ts = gold(g, "timestep"),
	                *np = gold(g, "noise_pred");
	if (lat && ctx && ts && np) {
		struct hooked h = {0};
		sd_unet_set_hook(u, on_module, &h);
		sd_tensor *eps = sd_tensor_new(SD_DTYPE_F32, 4, lat->shape);
		float t = scalar(ts, 0);
		CHECK_OK(sd_unet_forward(u, NULL, eps, lat, &t, 1, ctx));
		sd_unet_set_hook(u, NULL, NULL);
		CHECK_CLOSE((const float *)eps->data, (const float *)np->data, sd_tensor_numel(np), RTOL);
		int compared = 0;
		for (int i = 0; i < sd_st_count(g); i++) {
			const char *name = sd_st_name(g, i);
			if (!strcmp(name, "latent") || !strcmp(name, "encoder_hidden_states") || !strcmp(name, "timestep") ||
			    !strcmp(name, "noise_pred"))
				continue;
			const sd_tensor *want = sd_st_tensor(g, i);
			const sd_tensor *got = NULL;
			for (int k = 0; k < h.n; k++)
				if (!strcmp(h.name[k], name)) got = h.t[k];
			if (!got) {
				printf("  no hook call for '%s'\n", name);
				test_failed_++;
				continue;
			}
			if (!sd_tensor_same_shape(got, want)) {
				char s1[64], s2[64];
				printf("  %s: shape %s, golden %s\n", name, sd_shape_str(got->ndim, got->shape, s1, sizeof s1),
				       sd_shape_str(want->ndim, want->shape, s2, sizeof s2));
				test_failed_++;
				continue;
			}
			printf("  %-28s", name);
			CHECK_CLOSE((const float *)got->data, (const float *)want->data, sd_tensor_numel(want), RTOL);
			compared++;
		}
		CHECK(compared >= 10);
		for (int k = 0; k < h.n; k++) sd_tensor_free(h.t[k]);
		sd_tensor_free(eps);
	}
	sd_st_close(g);
}

/* ==== cases ==== */

static void model_case(const char *path, const char *config, const char *golden_dir, int skip_on_load_error)
{
	char p[1024], why[512] = "";
	sd_model *m;
	sd_weights *w;
	sd_unet *u = open_unet(path, config, &m, &w, why, sizeof why);
	if (!u && *why) {
		if (skip_on_load_error) {
			sd_model_close(m);
			SKIP("loader: %.200s", why);
		}
		printf("  %s: %s\n", path, why);
		test_failed_++;
	}
	if (u) {
		sd_arena *a = sd_arena_new(SD_DEVICE_CPU, 0);
		snprintf(p, sizeof p, "%s/unet.safetensors", golden_dir);
		check_unet_golden(u, p, a);
		snprintf(p, sizeof p, "%s/unet_intermediates.safetensors", golden_dir);
		check_intermediates(u, p);
		sd_arena_free(a);
	}
	close_unet(u, m, w);
}

TEST(tiny_folder)
{
	char p[512], g[512];
	snprintf(p, sizeof p, "%s/tiny", fixtures());
	snprintf(g, sizeof g, "%s/golden/tiny", fixtures());
	model_case(p, NULL, g, 0);
}

TEST(tiny_ckpt)
{
	char p[512], c[512], g[512];
	snprintf(p, sizeof p, "%s/tiny.ldm.ckpt", fixtures());
	snprintf(c, sizeof c, "%s/tiny", fixtures());
	snprintf(g, sizeof g, "%s/golden/tiny", fixtures());
	if (!exists(p)) SKIP("%.200s is absent", p);
	model_case(p, c, g, 1);
}

TEST(sd15_folder)
{
	char p[512], g[512];
	if (!shared()) SKIP("$SHARED is not set");
	snprintf(p, sizeof p, "%s/sd15-shape-small/unet/config.json", shared());
	if (!exists(p)) SKIP("the sd15-shape-small fixtures are absent from $SHARED");
	snprintf(p, sizeof p, "%s/sd15-shape-small", shared());
	snprintf(g, sizeof g, "%s/golden/sd15-shape-small", shared());
	model_case(p, NULL, g, 0);
}

TEST(sd15_single_file)
{
	char p[512], c[512], g[512];
	if (!shared()) SKIP("$SHARED is not set");
	snprintf(p, sizeof p, "%s/sd15-shape-small.ldm.fp16.safetensors", shared());
	if (!exists(p)) SKIP("the sd15-shape-small fixtures are absent from $SHARED");
	snprintf(c, sizeof c, "%s/sd15-shape-small", shared());
	snprintf(g, sizeof g, "%s/golden/sd15-shape-small", shared());
	model_case(p, c, g, 1);
}

/* Heads, widths and block layout as read from the two configs. */
TEST(config)
{
	char p[512], why[512] = "";
	sd_model *m;
	sd_weights *w;
	snprintf(p, sizeof p, "%s/tiny", fixtures());
	sd_unet *u = open_unet(p, NULL, &m, &w, why, sizeof why);
	if (!u) {
		printf("  %s\n", why);
		test_failed_++;
		close_unet(u, m, w);
		return;
	}
	const sd_unet_config *c = sd_unet_get_config(u);
	CHECK(c->nblocks == 2 && c->block_out[0] == 32 && c->block_out[1] == 64);
	CHECK(!c->down_attn[0] && c->down_attn[1] && c->up_attn[0] && !c->up_attn[1] && c->mid_attn);
	CHECK(c->heads[0] == 8 && c->heads[1] == 8 && c->cross_dim[1] == 32 && c->temb_dim == 128);
	/* 2 + 2 down, 2 mid, 3 + 3 up; transformers 2 down, 1 mid, 3 up */
	CHECK(sd_unet_resnet_count(u) == 12 && sd_unet_transformer_count(u) == 6);
	sd_unet_transformer *t = sd_unet_get_transformer(u, 0);
	CHECK(t && t->blk[0].attn1.heads == 8 && t->blk[0].attn1.dim_head == 8);
	CHECK(sd_unet_find_linear(u, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") ==
	      &t->blk[0].attn2.k);
	CHECK(sd_unet_find_linear(u, "up_blocks.0.attentions.2.proj_out") != NULL);
	CHECK(sd_unet_find_linear(u, "down_blocks.0.attentions.0.proj_out") == NULL);
	close_unet(u, m, w);
}

/* The recorded forward gives the same output as the plain one, with distinct activations. */
TEST(record)
{
	char p[512], why[512] = "";
	sd_model *m;
	sd_weights *w;
	snprintf(p, sizeof p, "%s/tiny", fixtures());
	sd_unet *u = open_unet(p, NULL, &m, &w, why, sizeof why);
	snprintf(p, sizeof p, "%s/golden/tiny/unet.safetensors", fixtures());
	sd_st *g = u ? sd_st_open(p) : NULL;
	if (!g) {
		printf("  %s\n", *why ? why : sd_errmsg());
		test_failed_++;
		close_unet(u, m, w);
		return;
	}
	const sd_tensor *lat = gold(g, "latent"), *ctx = gold(g, "encoder_hidden_states"), *ts = gold(g, "timesteps"),
	                *np = gold(g, "noise_pred");
	if (lat && ctx && ts && np) {
		sd_arena *a = sd_arena_new(SD_DEVICE_CPU, 0);
		sd_unet_act act;
		float t = scalar(ts, 1);
		CHECK_OK(sd_unet_forward_record(u, &act, a, lat, &t, 1, ctx));
		sd_tensor want = slab(np, 1);
		if (act.out) CHECK_CLOSE((const float *)act.out->data, (const float *)want.data, sd_tensor_numel(&want), RTOL);
		CHECK(act.nres == 12 && act.ntr == 6);
		CHECK(act.res[0].n1 != act.res[0].h1 && act.res[0].a1 != act.res[0].n2);
		CHECK(act.tr[0].blk[0].a1.probs != NULL && act.tr[0].blk[0].r1 != act.tr[0].h[0]);
		CHECK(act.tr[0].blk[0].a1.probs->shape[1] == 8 && act.tr[0].blk[0].a2.probs->shape[3] == 77);
		/* an up block's first resnet takes the concatenation: 64 (mid) + 64 (skip) channels */
		CHECK(act.res_in[6] && act.res_in[6]->shape[1] == 128);
		/* the recorded softmax rows sum to one */
		const float *pr = act.tr[0].blk[0].a2.probs->data;
		double sum = 0;
		for (int j = 0; j < 77; j++) sum += pr[j];
		CHECK(fabs(sum - 1) < 1e-5);
		sd_arena_free(a);
	}
	sd_st_close(g);
	close_unet(u, m, w);
}

/* PEFT LoRA (r 8, alpha 16: scale 2) on to_q / to_v against golden/tiny/lora_outputs. */
TEST(lora)
{
	char p[512], why[512] = "";
	if (!shared()) SKIP("$SHARED is not set");
	snprintf(p, sizeof p, "%s/golden/tiny/lora_outputs.safetensors", shared());
	if (!exists(p)) SKIP("golden/tiny/lora_outputs.safetensors is absent from $SHARED");
	sd_st *lg = sd_st_open(p);
	snprintf(p, sizeof p, "%s/golden/tiny/unet.safetensors", fixtures());
	sd_st *g = sd_st_open(p);
	sd_model *m;
	sd_weights *w;
	snprintf(p, sizeof p, "%s/tiny", fixtures());
	sd_unet *u = g && lg ? open_unet(p, NULL, &m, &w, why, sizeof why) : NULL;
	if (!u) {
		printf("  %s\n", *why ? why : sd_errmsg());
		test_failed_++;
		sd_st_close(g);
		sd_st_close(lg);
		return;
	}
	int set = 0;
	for (int i = 0; i < sd_st_count(lg); i++) {
		const char *name = sd_st_name(lg, i), *pre = "weights.unet.", *suf = ".lora_A.weight";
		size_t n = strlen(name), lp = strlen(pre), ls = strlen(suf);
		if (n <= lp + ls || strncmp(name, pre, lp) || strcmp(name + n - ls, suf)) continue;
		char mod[256], bname[300];
		snprintf(mod, sizeof mod, "%.*s", (int)(n - lp - ls), name + lp);
		snprintf(bname, sizeof bname, "weights.unet.%s.lora_B.weight", mod);
		sd_unet_linear *l = sd_unet_find_linear(u, mod);
		int bi = sd_st_find(lg, bname);
		CHECK(l != NULL && bi >= 0);
		if (!l || bi < 0) continue;
		l->lora_a = sd_st_tensor(lg, i);
		l->lora_b = sd_st_tensor(lg, bi);
		l->lora_scale = 2.0f;
		set++;
	}
	CHECK(set == 24); /* 6 transformers × attn1/attn2 × to_q/to_v */
	const sd_tensor *lat = gold(g, "latent"), *ctx = gold(g, "encoder_hidden_states"), *ts = gold(g, "timesteps"),
	                *np = gold(lg, "unet_noise_pred");
	if (lat && ctx && ts && np) {
		sd_tensor *eps = sd_tensor_new(SD_DTYPE_F32, 4, lat->shape);
		for (int k = 0; k < ts->shape[0]; k++) {
			float t = scalar(ts, k);
			sd_tensor want = slab(np, k);
			CHECK_OK(sd_unet_forward(u, NULL, eps, lat, &t, 1, ctx));
			CHECK_CLOSE((const float *)eps->data, (const float *)want.data, sd_tensor_numel(eps), RTOL);
		}
		sd_tensor_free(eps);
	}
	close_unet(u, m, w);
	sd_st_close(g);
	sd_st_close(lg);
}

/* Latent sides that are not multiples of 2^(blocks-1): diffusers' forward_upsample_size path. */
TEST(odd_size)
{
	char p[512], why[512] = "";
	sd_model *m;
	sd_weights *w;
	snprintf(p, sizeof p, "%s/tiny", fixtures());
	sd_unet *u = open_unet(p, NULL, &m, &w, why, sizeof why);
	if (!u) {
		printf("  %s\n", why);
		test_failed_++;
		close_unet(u, m, w);
		return;
	}
	sd_tensor *lat = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 7, 5), *eps = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 7, 5);
	sd_tensor *ctx = sd_tensor_newv(SD_DTYPE_F32, 3, 1, 77, 32);
	float t = 10;
	for (int i = 0; i < 140; i++) ((float *)lat->data)[i] = (float)((i * 37) % 11) / 11.0f - 0.5f;
	CHECK_OK(sd_unet_forward(u, NULL, eps, lat, &t, 1, ctx));
	int finite = 1;
	for (int i = 0; i < 140; i++) finite &= isfinite(((float *)eps->data)[i]) != 0;
	CHECK(finite);
	sd_tensor_free(lat);
	sd_tensor_free(eps);
	sd_tensor_free(ctx);
	close_unet(u, m, w);
}

/* Wrong channels, context width or batch, timestep count: clear "unet: …" errors, nothing run. */
TEST(bad_input)
{
	char p[512], why[512] = "";
	sd_model *m;
	sd_weights *w;
	snprintf(p, sizeof p, "%s/tiny", fixtures());
	sd_unet *u = open_unet(p, NULL, &m, &w, why, sizeof why);
	if (!u) {
		printf("  %s\n", why);
		test_failed_++;
		close_unet(u, m, w);
		return;
	}
	sd_tensor *lat3 = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 3, 8, 8), *lat = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 8, 8);
	sd_tensor *eps = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 8, 8), *ctx = sd_tensor_newv(SD_DTYPE_F32, 3, 1, 77, 32);
	sd_tensor *ctx768 = sd_tensor_newv(SD_DTYPE_F32, 3, 1, 77, 768), *ctx2 = sd_tensor_newv(SD_DTYPE_F32, 3, 2, 77, 32);
	sd_tensor *eps_bad = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 16, 16);
	float t[2] = {1, 2};
	CHECK(sd_unet_forward(u, NULL, eps, lat3, t, 1, ctx) == -1);
	printf("  %s\n", sd_errmsg());
	CHECK(strstr(sd_errmsg(), "unet: latent") && strstr(sd_errmsg(), "3 channels") && strstr(sd_errmsg(), "takes 4"));
	CHECK(sd_unet_forward(u, NULL, eps, lat, t, 1, ctx768) == -1);
	printf("  %s\n", sd_errmsg());
	CHECK(strstr(sd_errmsg(), "width 768") != NULL);
	CHECK(sd_unet_forward(u, NULL, eps, lat, t, 1, ctx2) == -1);
	printf("  %s\n", sd_errmsg());
	CHECK(strstr(sd_errmsg(), "batch") != NULL);
	CHECK(sd_unet_forward(u, NULL, eps, lat, t, 1, NULL) == -1);
	CHECK(strstr(sd_errmsg(), "no context") != NULL);
	CHECK(sd_unet_forward(u, NULL, eps, lat, t, 2, ctx) == -1);
	CHECK(strstr(sd_errmsg(), "timesteps") != NULL);
	CHECK(sd_unet_forward(u, NULL, eps_bad, lat, t, 1, ctx) == -1);
	printf("  %s\n", sd_errmsg());
	CHECK(strstr(sd_errmsg(), "unet: output") != NULL);
	CHECK_OK(sd_unet_forward(u, NULL, eps, lat, t, 1, ctx)); /* and still works */
	/* a UNet from the wrong component */
	sd_weights *vw = sd_weights_load(m, SD_VAE, SD_DEVICE_CPU);
	CHECK(vw && sd_unet_new(vw) == NULL && strstr(sd_errmsg(), "unet:"));
	sd_weights_free(vw);
	sd_tensor_free(lat3), sd_tensor_free(lat), sd_tensor_free(eps), sd_tensor_free(ctx), sd_tensor_free(ctx768);
	sd_tensor_free(ctx2), sd_tensor_free(eps_bad);
	close_unet(u, m, w);
}

int main(void)
{
	RUN(tiny_folder);
	RUN(tiny_ckpt);
	RUN(sd15_folder);
	RUN(sd15_single_file);
	RUN(config);
	RUN(record);
	RUN(lora);
	RUN(odd_size);
	RUN(bad_input);
	return test_summary();
}
