/*
 * test_vae.c - lib/models/vae.c against diffusers' AutoencoderKL: golden/<model>/vae.safetensors (the
 * posterior of a test image and the decodes of its mean and of a sample with given eps) and
 * vae_intermediates.safetensors (every top-level module's output, through forward hooks), for the tiny
 * model from its diffusers folder (fp16 variant) and from its .ckpt, and for sd15-shape-small from its
 * folder and its single-file .safetensors when $SHARED holds them.  Also the pipelines' forms
 * (x = 2·image − 1, latent = 0.18215 · mean, decode clamped to [0,1]), the recorded encoder forward,
 * tiling (and its stated tolerance against untiled) and bad input.
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

/* A golden tensor by name (a failure is counted when absent). */
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

static sd_tensor *like(const sd_tensor *t)
{
	return sd_tensor_new(SD_DTYPE_F32, t->ndim, t->shape);
}

/* A VAE from a model path (folder or single file, with config dir or NULL); the weights come back in *w. */
static sd_vae *open_vae(const char *path, const char *config, sd_model **m, sd_weights **w)
{
	*m = sd_model_open(path, config);
	*w = *m ? sd_weights_load(*m, SD_VAE, SD_DEVICE_CPU) : NULL;
	sd_vae *v = *w ? sd_vae_new(*w) : NULL;
	if (!v) {
		printf("  %s: %s\n", path, sd_errmsg());
		test_failed_++;
	}
	return v;
}

static void close_vae(sd_vae *v, sd_model *m, sd_weights *w)
{
	sd_vae_free(v);
	sd_weights_free(w);
	sd_model_close(m);
}

static const sd_vae_tiling untiled = {-1, 0};

/* ==== golden/<kind>/vae.safetensors ==== */

/* Encode the golden image, split the posterior, sample with the given eps, decode both. */
static void check_vae_golden(sd_vae *v, const char *golden)
{
	sd_st *g = sd_st_open(golden);
	if (!g) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return;
	}
	const sd_tensor *image = gold(g, "image"), *moments = gold(g, "moments"), *mean = gold(g, "mean"),
	                *logvar = gold(g, "logvar"), *std = gold(g, "std"), *eps = gold(g, "eps"),
	                *z_sample = gold(g, "z_sample"), *dec_mean = gold(g, "decode_mean"),
	                *dec_z = gold(g, "decode_z_sample");
	if (!image || !moments || !mean || !logvar || !std || !eps || !z_sample || !dec_mean || !dec_z) goto out;
	sd_tensor *m = like(moments), *mu = like(mean), *lv = like(logvar), *sd = like(std), *z = like(z_sample),
	          *d1 = like(dec_mean), *d2 = like(dec_z);
	CHECK_OK(sd_vae_encode(v, m, image, &untiled));
	CHECK_CLOSE(m->data, moments->data, sd_tensor_numel(m), RTOL);
	CHECK_OK(sd_vae_posterior(mu, lv, sd, m));
	CHECK_CLOSE(mu->data, mean->data, sd_tensor_numel(mu), RTOL);
	CHECK_CLOSE(lv->data, logvar->data, sd_tensor_numel(lv), RTOL);
	CHECK_CLOSE(sd->data, std->data, sd_tensor_numel(sd), RTOL);
	/* z = mean + std·eps, as sd_vae_encode_image forms it (scaled there; unscaled here) */
	float *zp = z->data;
	for (int64_t i = 0; i < sd_tensor_numel(z); i++)
		zp[i] = ((float *)mu->data)[i] + ((float *)sd->data)[i] * ((const float *)eps->data)[i];
	CHECK_CLOSE(z->data, z_sample->data, sd_tensor_numel(z), RTOL);
	CHECK_OK(sd_vae_decode(v, d1, mean, &untiled));
	CHECK_CLOSE(d1->data, dec_mean->data, sd_tensor_numel(d1), RTOL);
	CHECK_OK(sd_vae_decode(v, d2, z_sample, &untiled));
	CHECK_CLOSE(d2->data, dec_z->data, sd_tensor_numel(d2), RTOL);
	printf("  activation peak %.2f MiB\n", sd_vae_peak_bytes(v) / 1048576.0);
	sd_tensor *tt[] = {m, mu, lv, sd, z, d1, d2};
	for (size_t i = 0; i < sizeof tt / sizeof *tt; i++) sd_tensor_free(tt[i]);
out:
	sd_st_close(g);
}

/* ==== golden/<kind>/vae_intermediates.safetensors ==== */

struct hooked {
	const sd_st *g;
	int seen, bad;
};

static void on_module(void *ctx, const char *name, const sd_tensor *out)
{
	struct hooked *h = ctx;
	int i = sd_st_find(h->g, name);
	if (i < 0) return; /* not dumped */
	const sd_tensor *want = sd_st_tensor(h->g, i);
	h->seen++;
	if (!sd_tensor_same_shape(out, want)) {
		char a[96], b[96];
		printf("  %s: shape %s, golden %s\n", name, sd_shape_str(out->ndim, out->shape, a, sizeof a),
		       sd_shape_str(want->ndim, want->shape, b, sizeof b));
		h->bad++;
		test_failed_++;
		return;
	}
	printf("  %-24s", name);
	if (!test_close_(__FILE__, __LINE__, name, out->data, want->data, sd_tensor_numel(out), RTOL)) h->bad++;
}

static void check_intermediates(sd_vae *v, const char *golden, int nmodules)
{
	sd_st *g = sd_st_open(golden);
	if (!g) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return;
	}
	const sd_tensor *image = gold(g, "image"), *mean = gold(g, "mean"), *logvar = gold(g, "logvar"),
	                *dec = gold(g, "decode_mean");
	if (!image || !mean || !logvar || !dec) goto out;
	struct hooked h = {g, 0, 0};
	int64_t ms[4] = {1, 2 * mean->shape[1], mean->shape[2], mean->shape[3]};
	sd_tensor *m = sd_tensor_new(SD_DTYPE_F32, 4, ms), *mu = like(mean), *lv = like(logvar), *d = like(dec);
	sd_vae_set_hook(v, on_module, &h);
	CHECK_OK(sd_vae_encode(v, m, image, &untiled));
	CHECK_OK(sd_vae_posterior(mu, lv, NULL, m));
	CHECK_CLOSE(mu->data, mean->data, sd_tensor_numel(mu), RTOL);
	CHECK_CLOSE(lv->data, logvar->data, sd_tensor_numel(lv), RTOL);
	CHECK_OK(sd_vae_decode(v, d, mean, &untiled));
	CHECK_CLOSE(d->data, dec->data, sd_tensor_numel(d), RTOL);
	sd_vae_set_hook(v, NULL, NULL);
	printf("  %d modules compared\n", h.seen);
	CHECK(h.seen == nmodules);
	sd_tensor_free(m);
	sd_tensor_free(mu);
	sd_tensor_free(lv);
	sd_tensor_free(d);
out:
	sd_st_close(g);
}

/* encoder: conv_in, down_blocks.*, mid_block, conv_norm_out, conv_out, quant_conv; decoder: post_quant_conv,
 * conv_in, mid_block, up_blocks.*, conv_norm_out, conv_out */
static int module_count(int nblocks)
{
	return 2 * (5 + nblocks);
}

/* ==== tests ==== */

TEST(tiny_folder)
{
	char model[4096], golden[4096];
	snprintf(model, sizeof model, "%s/tiny", fixtures());
	snprintf(golden, sizeof golden, "%s/golden/tiny/vae.safetensors", fixtures());
	sd_model *m;
	sd_weights *w;
	sd_vae *v = open_vae(model, NULL, &m, &w);
	if (!v) return;
	const sd_vae_config *c = sd_vae_get_config(v);
	CHECK(c->nblocks == 2 && c->block_out[0] == 32 && c->block_out[1] == 64 && c->layers_per_block == 1);
	CHECK(c->latent_channels == 4 && c->groups == 32 && fabsf(c->scaling_factor - 0.18215f) < 1e-7f);
	CHECK(sd_vae_factor(v) == 2);
	check_vae_golden(v, golden);
	close_vae(v, m, w);
}

TEST(tiny_intermediates)
{
	char model[4096], golden[4096];
	snprintf(model, sizeof model, "%s/tiny", fixtures());
	snprintf(golden, sizeof golden, "%s/golden/tiny/vae_intermediates.safetensors", fixtures());
	sd_model *m;
	sd_weights *w;
	sd_vae *v = open_vae(model, NULL, &m, &w);
	if (!v) return;
	check_intermediates(v, golden, module_count(2));
	close_vae(v, m, w);
}

TEST(tiny_ckpt)
{
	char model[3000], config[3000], golden[3000];
	snprintf(model, sizeof model, "%s/tiny.ldm.ckpt", fixtures());
	snprintf(config, sizeof config, "%s/tiny", fixtures());
	snprintf(golden, sizeof golden, "%s/golden/tiny/vae.safetensors", fixtures());
	if (!exists(model)) SKIP("tiny.ldm.ckpt is absent from $SD_FIXTURES");
	sd_model *m;
	sd_weights *w;
	sd_vae *v = open_vae(model, config, &m, &w);
	if (!v) return;
	check_vae_golden(v, golden);
	close_vae(v, m, w);
	/* without a config folder the sizes come from the shapes alone */
	v = open_vae(model, NULL, &m, &w);
	if (!v) return;
	CHECK(sd_vae_get_config(v)->nblocks == 2 && sd_vae_get_config(v)->layers_per_block == 1);
	close_vae(v, m, w);
}

static void sd15(const char *model, const char *config)
{
	char path[3000], cfg[3000], golden[3000];
	const char *s = shared();
	snprintf(path, sizeof path, "%s/%s", s, model);
	snprintf(cfg, sizeof cfg, "%s/%s", s, config ? config : "");
	sd_model *m;
	sd_weights *w;
	sd_vae *v = open_vae(path, config ? cfg : NULL, &m, &w);
	if (!v) return;
	const sd_vae_config *c = sd_vae_get_config(v);
	CHECK(c->nblocks == 4 && c->layers_per_block == 2 && c->block_out[3] == 64 && sd_vae_factor(v) == 8);
	snprintf(golden, sizeof golden, "%s/golden/sd15-shape-small/vae.safetensors", s);
	check_vae_golden(v, golden);
	snprintf(golden, sizeof golden, "%s/golden/sd15-shape-small/vae_intermediates.safetensors", s);
	check_intermediates(v, golden, module_count(4));
	close_vae(v, m, w);
}

TEST(sd15_folder)
{
	if (!shared()) SKIP("$SHARED is not set");
	char p[4096];
	snprintf(p, sizeof p, "%s/sd15-shape-small/vae/config.json", shared());
	if (!exists(p)) SKIP("the sd15-shape-small fixtures are absent from $SHARED");
	sd15("sd15-shape-small", NULL);
}

TEST(sd15_single_file)
{
	if (!shared()) SKIP("$SHARED is not set");
	char p[4096];
	snprintf(p, sizeof p, "%s/sd15-shape-small.ldm.fp16.safetensors", shared());
	if (!exists(p)) SKIP("the sd15-shape-small fixtures are absent from $SHARED");
	sd15("sd15-shape-small.ldm.fp16.safetensors", "sd15-shape-small");
}

/* The pipelines' forms: the PPM through pnm → encode_image = 0.18215 · mean; decode_image = the clamped
 * golden decode. */
TEST(image_forms)
{
	char model[4096], golden[4096], ppm[4096];
	snprintf(model, sizeof model, "%s/tiny", fixtures());
	snprintf(golden, sizeof golden, "%s/golden/tiny/vae.safetensors", fixtures());
	snprintf(ppm, sizeof ppm, "%s/golden/test_image_64.ppm", fixtures());
	sd_model *m;
	sd_weights *w;
	sd_vae *v = open_vae(model, NULL, &m, &w);
	sd_st *g = sd_st_open(golden);
	FILE *f = fopen(ppm, "rb");
	sd_pnm_reader *r = f ? sd_pnm_reader_new(f, ppm) : NULL;
	sd_tensor *img = NULL;
	if (!v || !g || !r || sd_pnm_read(r, &img, NULL) != 1) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		goto out;
	}
	const sd_tensor *image = gold(g, "image"), *mean = gold(g, "mean"), *eps = gold(g, "eps"),
	                *z_sample = gold(g, "z_sample"), *dec = gold(g, "decode_mean");
	if (!image || !mean || !eps || !z_sample || !dec) goto out;
	/* the model input the PPM gives is the golden image */
	sd_tensor *x = like(img);
	for (int64_t i = 0; i < sd_tensor_numel(img); i++) ((float *)x->data)[i] = 2.0f * ((float *)img->data)[i] - 1.0f;
	CHECK_CLOSE(x->data, image->data, sd_tensor_numel(x), 1e-6);
	sd_tensor *lat = like(mean), *want = like(mean), *out = like(dec), *outw = like(dec);
	CHECK_OK(sd_vae_encode_image(v, lat, img, NULL, NULL));
	for (int64_t i = 0; i < sd_tensor_numel(mean); i++) ((float *)want->data)[i] = 0.18215f * ((float *)mean->data)[i];
	CHECK_CLOSE(lat->data, want->data, sd_tensor_numel(lat), RTOL);
	CHECK_OK(sd_vae_encode_image(v, lat, img, eps, NULL));
	for (int64_t i = 0; i < sd_tensor_numel(mean); i++) ((float *)want->data)[i] = 0.18215f * ((float *)z_sample->data)[i];
	CHECK_CLOSE(lat->data, want->data, sd_tensor_numel(lat), RTOL);
	/* decode_image(0.18215 · mean) = clamp(decode_mean / 2 + 0.5, 0, 1) */
	for (int64_t i = 0; i < sd_tensor_numel(mean); i++) ((float *)want->data)[i] = 0.18215f * ((float *)mean->data)[i];
	CHECK_OK(sd_vae_decode_image(v, out, want, NULL));
	for (int64_t i = 0; i < sd_tensor_numel(dec); i++) {
		float y = ((const float *)dec->data)[i] / 2 + 0.5f;
		((float *)outw->data)[i] = y < 0 ? 0 : y > 1 ? 1 : y;
	}
	CHECK_CLOSE(out->data, outw->data, sd_tensor_numel(out), RTOL);
	sd_tensor_free(x);
	sd_tensor_free(lat);
	sd_tensor_free(want);
	sd_tensor_free(out);
	sd_tensor_free(outw);
out:
	sd_tensor_free(img);
	sd_pnm_reader_free(r);
	if (f) fclose(f);
	sd_st_close(g);
	if (v) close_vae(v, m, w);
}

/* Recording the encoder keeps every activation and gives the same moments. */
TEST(record)
{
	char model[4096], golden[4096];
	snprintf(model, sizeof model, "%s/tiny", fixtures());
	snprintf(golden, sizeof golden, "%s/golden/tiny/vae.safetensors", fixtures());
	sd_model *m;
	sd_weights *w;
	sd_vae *v = open_vae(model, NULL, &m, &w);
	sd_st *g = sd_st_open(golden);
	sd_arena *a = sd_arena_new(SD_DEVICE_CPU, 0);
	if (!v || !g || !a) goto out;
	const sd_tensor *image = gold(g, "image"), *moments = gold(g, "moments");
	if (!image || !moments) goto out;
	sd_vae_enc_act act;
	CHECK_OK(sd_vae_encode_record(v, &act, a, image));
	CHECK(act.nres == 4 && act.moments && act.conv_in && act.down[0] && act.attn.probs && act.norm_out);
	if (act.moments) CHECK_CLOSE(act.moments->data, moments->data, sd_tensor_numel(moments), RTOL);
	/* distinct activations: the fused paths were not taken */
	for (int i = 0; i < act.nres; i++) {
		const sd_vae_resnet_act *r = &act.res[i];
		CHECK(r->n1 != r->h1 && r->a1 != r->n2 && r->n2 != r->h2);
		CHECK(act.res_out[i] && act.res_in[i] && act.res_in[i] != act.res_out[i]);
	}
	/* attention rows sum to 1 */
	const sd_tensor *p = act.attn.probs;
	int64_t Lk = p->shape[3];
	double worst = 0;
	for (int64_t r = 0; r < p->shape[2]; r++) {
		double s = 0;
		for (int64_t j = 0; j < Lk; j++) s += ((const float *)p->data)[r * Lk + j];
		if (fabs(s - 1) > worst) worst = fabs(s - 1);
	}
	printf("  attention rows: max |sum - 1| = %.2g; record arena %.2f MiB\n", worst, sd_arena_peak(a) / 1048576.0);
	CHECK(worst < 1e-5);
	/* a second call on a reset arena gives the same */
	sd_arena_reset(a);
	CHECK_OK(sd_vae_encode_record(v, &act, a, image));
	if (act.moments) CHECK_CLOSE(act.moments->data, moments->data, sd_tensor_numel(moments), RTOL);
out:
	sd_arena_free(a);
	sd_st_close(g);
	if (v) close_vae(v, m, w);
}

/* Mean |a − b| and mean |b| over n floats. */
static void mean_diff(const float *a, const float *b, int64_t n, double *md, double *mb)
{
	double d = 0, r = 0;
	for (int64_t i = 0; i < n; i++) {
		d += fabs((double)a[i] - b[i]);
		r += fabs((double)b[i]);
	}
	*md = d / (double)n;
	*mb = r / (double)n;
}

/*
 * Tiles.  The machinery is checked exactly: one tile as large as the image is the untiled result, and
 * where only the first tile has weight the result is the decode of that latent crop.  Against untiled,
 * tiles differ because each sees its own GroupNorm statistics and its own mid-block attention; the
 * tiny model's random weights make that large (measured: mean |tiled − untiled| 0.098 for decode
 * outputs whose mean magnitude is 0.24, 0.050 for moments of magnitude 0.20, with 48-pixel tiles), so
 * the stated bound is on the mean difference: TILE_MEAN_TOL of the mean magnitude.
 */
#define TILE_MEAN_TOL 0.5
TEST(tiling)
{
	char model[4096], golden[4096];
	snprintf(model, sizeof model, "%s/tiny", fixtures());
	snprintf(golden, sizeof golden, "%s/golden/tiny/vae.safetensors", fixtures());
	sd_model *m;
	sd_weights *w;
	sd_vae *v = open_vae(model, NULL, &m, &w);
	sd_st *g = sd_st_open(golden);
	if (!v || !g) goto out;
	const sd_tensor *image = gold(g, "image"), *mean = gold(g, "mean"), *moments = gold(g, "moments"),
	                *dec = gold(g, "decode_mean");
	if (!image || !mean || !moments || !dec) goto out;
	sd_tensor *d = like(dec), *mo = like(moments);
	sd_vae_tiling whole = {64, 0}, t48 = {48, 0}, bad = {33, 0};
	double md, mb;
	CHECK_OK(sd_vae_decode(v, d, mean, &whole));
	CHECK_CLOSE(d->data, dec->data, sd_tensor_numel(d), RTOL);

	/* 48-pixel tiles = 24 latents, overlap 12 pixels: tiles at latent 0 and 8 per axis; pixels [0,16)² have
	 * weight from the first tile only */
	CHECK_OK(sd_vae_decode(v, d, mean, &t48));
	sd_tensor *crop = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 24, 24), *cd = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 3, 48, 48);
	sd_tensor *a = sd_tensor_newv(SD_DTYPE_F32, 3, 3, 16, 16), *b = sd_tensor_newv(SD_DTYPE_F32, 3, 3, 16, 16);
	for (int c = 0; c < 4; c++)
		for (int y = 0; y < 24; y++)
			for (int x = 0; x < 24; x++)
				((float *)crop->data)[(c * 24 + y) * 24 + x] = ((const float *)mean->data)[(c * 32 + y) * 32 + x];
	CHECK_OK(sd_vae_decode(v, cd, crop, &untiled));
	for (int c = 0; c < 3; c++)
		for (int y = 0; y < 16; y++)
			for (int x = 0; x < 16; x++) {
				((float *)a->data)[(c * 16 + y) * 16 + x] = ((float *)d->data)[(c * 64 + y) * 64 + x];
				((float *)b->data)[(c * 16 + y) * 16 + x] = ((float *)cd->data)[(c * 48 + y) * 48 + x];
			}
	printf("  first tile's own pixels = the decode of its latent crop:\n");
	CHECK_CLOSE(a->data, b->data, sd_tensor_numel(a), 1e-6);
	mean_diff(d->data, dec->data, sd_tensor_numel(d), &md, &mb);
	printf("  decode, 48-pixel tiles: mean |tiled - untiled| %.3g, mean |untiled| %.3g (bound %.2g of it)\n", md, mb,
	       TILE_MEAN_TOL);
	CHECK(md <= TILE_MEAN_TOL * mb);
	CHECK_OK(sd_vae_encode(v, mo, image, &t48));
	mean_diff(mo->data, moments->data, sd_tensor_numel(mo), &md, &mb);
	printf("  encode, 48-pixel tiles: mean |tiled - untiled| %.3g, mean |untiled| %.3g (bound %.2g of it)\n", md, mb,
	       TILE_MEAN_TOL);
	CHECK(md <= TILE_MEAN_TOL * mb);
	CHECK(sd_vae_decode(v, d, mean, &bad) < 0);
	printf("  (bad tile: %s)\n", sd_errmsg());

	/* a batch of two is two samples, tiled or not */
	int64_t zs[4] = {2, mean->shape[1], mean->shape[2], mean->shape[3]}, ds[4] = {2, 3, dec->shape[2], dec->shape[3]};
	sd_tensor *z2 = sd_tensor_new(SD_DTYPE_F32, 4, zs), *d2 = sd_tensor_new(SD_DTYPE_F32, 4, ds);
	size_t zn = sd_tensor_nbytes(mean);
	int64_t dn = sd_tensor_numel(dec);
	memcpy(z2->data, mean->data, zn);
	memcpy((char *)z2->data + zn, mean->data, zn);
	CHECK_OK(sd_vae_decode(v, d, mean, &t48));
	CHECK_OK(sd_vae_decode(v, d2, z2, &t48));
	CHECK_CLOSE((float *)d2->data + dn, d->data, dn, 0);
	CHECK_OK(sd_vae_decode(v, d2, z2, NULL));
	CHECK_CLOSE((float *)d2->data + dn, dec->data, dn, RTOL);
	sd_tensor *tt[] = {z2, d2, d, mo, crop, cd, a, b};
	for (size_t i = 0; i < sizeof tt / sizeof *tt; i++) sd_tensor_free(tt[i]);
out:
	sd_st_close(g);
	if (v) close_vae(v, m, w);
}

/* Clear errors for what a stream can bring. */
TEST(bad_input)
{
	char model[4096];
	snprintf(model, sizeof model, "%s/tiny", fixtures());
	sd_model *m;
	sd_weights *w;
	sd_vae *v = open_vae(model, NULL, &m, &w);
	if (!v) return;
	sd_tensor *gray = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 1, 64, 64), *odd = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 3, 63, 64);
	sd_tensor *lat3 = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 3, 8, 8), *lat = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 4, 32, 32);
	sd_tensor *img = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 3, 64, 64), *small = sd_tensor_newv(SD_DTYPE_F32, 4, 1, 3, 8, 8);
	sd_tensor *i16 = sd_tensor_newv(SD_DTYPE_F16, 4, 1, 3, 64, 64);
	CHECK(sd_vae_encode_image(v, lat, gray, NULL, NULL) < 0 && strstr(sd_errmsg(), "1 channel"));
	printf("  %s\n", sd_errmsg());
	CHECK(sd_vae_encode_image(v, lat, odd, NULL, NULL) < 0 && strstr(sd_errmsg(), "multiple of 2"));
	printf("  %s\n", sd_errmsg());
	CHECK(sd_vae_decode_image(v, img, lat3, NULL) < 0 && strstr(sd_errmsg(), "3 channels"));
	printf("  %s\n", sd_errmsg());
	CHECK(sd_vae_decode_image(v, small, lat, NULL) < 0 && strstr(sd_errmsg(), "shape"));
	printf("  %s\n", sd_errmsg());
	CHECK(sd_vae_encode_image(v, lat, i16, NULL, NULL) < 0 && strstr(sd_errmsg(), "f16"));
	printf("  %s\n", sd_errmsg());
	sd_tensor *tt[] = {gray, odd, lat3, lat, img, small, i16};
	for (size_t i = 0; i < sizeof tt / sizeof *tt; i++) sd_tensor_free(tt[i]);
	close_vae(v, m, w);
	/* a component that is not the VAE */
	m = sd_model_open(model, NULL);
	w = m ? sd_weights_load(m, SD_TEXT_ENCODER, SD_DEVICE_CPU) : NULL;
	if (w) {
		CHECK(sd_vae_new(w) == NULL);
		printf("  %s\n", sd_errmsg());
	}
	sd_weights_free(w);
	sd_model_close(m);
}

int main(void)
{
	RUN(tiny_folder);
	RUN(tiny_intermediates);
	RUN(tiny_ckpt);
	RUN(sd15_folder);
	RUN(sd15_single_file);
	RUN(image_forms);
	RUN(record);
	RUN(tiling);
	RUN(bad_input);
	return test_summary();
}
