/*
 * test_lora.c - lib/models/lora.c and merge.c against PEFT and diffusers: golden/<kind>/lora_outputs
 * (text encoder, VAE and UNet outputs with PEFT adapters, r 8, alpha 16) from the PEFT folders and from
 * the kohya file (also with LDM-style kohya names), lora_diffusers_loaded (the diffusers file, no alpha:
 * scale 1), lora_merged_weights (W + 2·B·A) from sd_lora_merge and from a written-and-reopened
 * checkpoint, merged outputs equal to unmerged ones, two adapters at once, the inverse LDM names
 * (against the names of tiny.ldm.ckpt), and bad adapters (wrong shape, unknown layer, unknown key,
 * missing B, truncated file) failing with the key named.  The sd15-shape-small goldens run when $SHARED
 * holds them.
 */
#include <stdint.h>
#include <unistd.h>
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
	return s && *s && access(s, R_OK) == 0 ? s : NULL;
}

/* the config folder for single files (the tiny model's head counts are not SD's, which a single file
 * cannot tell) */
static const char *config_dir;

static char pbuf[32][1024];
static int pnext;
/* printf into one of a few rotating static buffers */
#define P(...) (snprintf(pbuf[pnext & 31], sizeof pbuf[0], __VA_ARGS__), pbuf[pnext++ & 31])

static const sd_tensor *gold(const sd_st *f, const char *name)
{
	int i = f ? sd_st_find(f, name) : -1;
	if (i < 0) {
		printf("  golden tensor '%s' is missing\n", name);
		test_failed_++;
		return NULL;
	}
	return sd_st_tensor(f, i);
}

/* A kind of fixture: the model, its goldens, its adapters. */
typedef struct kind {
	const char *model, *golden, *lora;
} kind;

static kind tiny(void)
{
	kind k = {strdup(P("%s/tiny", fixtures())), strdup(P("%s/golden/tiny", fixtures())),
	          strdup(P("%s/tiny-lora", fixtures()))};
	return k;
}

static kind small(const char *sh)
{
	kind k = {strdup(P("%s/sd15-shape-small", sh)), strdup(P("%s/golden/sd15-shape-small", sh)),
	          strdup(P("%s/sd15-shape-small-lora", sh))};
	return k;
}

static void kind_free(kind *k)
{
	free((char *)k->model);
	free((char *)k->golden);
	free((char *)k->lora);
}

static sd_lora *load1(const char *arg)
{
	sd_lora *s = sd_lora_load(&arg, 1);
	if (!s) {
		printf("  %s: %s\n", arg, sd_errmsg());
		test_failed_++;
	}
	return s;
}

/* ==== running the three components with a set (attached, or merged when merge) ==== */

/* text_encoder last_hidden_state for the golden input_ids: a new tensor, or NULL. */
static sd_tensor *run_text(const char *model, const kind *k, sd_lora *s, int merge)
{
	sd_st *g = sd_st_open(P("%s/text_encoder.safetensors", k->golden));
	sd_model *m = sd_model_open(model, config_dir);
	sd_weights *w = m ? sd_weights_load(m, SD_TEXT_ENCODER, SD_DEVICE_CPU) : NULL;
	if (w && s && merge && sd_lora_merge(s, w) < 0) sd_weights_free(w), w = NULL;
	sd_clip *c = w ? sd_clip_new(w) : NULL;
	sd_tensor *out = NULL;
	if (c && (!s || merge || sd_lora_attach_clip(s, c, w) == 0) && g) {
		const sd_tensor *ids = gold(g, "input_ids");
		out = ids ? sd_tensor_newv(SD_DTYPE_F32, 3, ids->shape[0], ids->shape[1], (int64_t)sd_clip_get_config(c)->hidden) : NULL;
		if (out && sd_clip_encode(c, out, ids, 0, NULL) < 0) sd_tensor_free(out), out = NULL;
	}
	if (!out) {
		printf("  text encoder of %s: %s\n", model, sd_errmsg());
		test_failed_++;
	}
	sd_clip_free(c);
	sd_weights_free(w);
	sd_model_close(m);
	sd_st_close(g);
	return out;
}

/* VAE: mean, logvar of the golden image; decode of the base posterior mean (golden "mean"). */
static int run_vae(const char *model, const kind *k, sd_lora *s, int merge, sd_tensor *out[3])
{
	out[0] = out[1] = out[2] = NULL;
	sd_st *g = sd_st_open(P("%s/vae.safetensors", k->golden));
	sd_model *m = sd_model_open(model, config_dir);
	sd_weights *w = m ? sd_weights_load(m, SD_VAE, SD_DEVICE_CPU) : NULL;
	if (w && s && merge && sd_lora_merge(s, w) < 0) sd_weights_free(w), w = NULL;
	sd_vae *v = w ? sd_vae_new(w) : NULL;
	int rc = -1;
	const sd_vae_tiling untiled = {-1, 0};
	if (v && (!s || merge || sd_lora_attach_vae(s, v, w) == 0) && g) {
		const sd_tensor *img = gold(g, "image"), *mean = gold(g, "mean"), *mom = gold(g, "moments");
		if (img && mean && mom) {
			sd_tensor *moments = sd_tensor_new(SD_DTYPE_F32, 4, mom->shape);
			out[0] = sd_tensor_new(SD_DTYPE_F32, 4, mean->shape);
			out[1] = sd_tensor_new(SD_DTYPE_F32, 4, mean->shape);
			out[2] = sd_tensor_new(SD_DTYPE_F32, 4, img->shape);
			if (moments && out[2] && sd_vae_encode(v, moments, img, &untiled) == 0 &&
			    sd_vae_posterior(out[0], out[1], NULL, moments) == 0 && sd_vae_decode(v, out[2], mean, &untiled) == 0)
				rc = 0;
			sd_tensor_free(moments);
		}
	}
	if (rc < 0) {
		printf("  vae of %s: %s\n", model, sd_errmsg());
		test_failed_++;
		for (int i = 0; i < 3; i++) sd_tensor_free(out[i]), out[i] = NULL;
	}
	sd_vae_free(v);
	sd_weights_free(w);
	sd_model_close(m);
	sd_st_close(g);
	return rc;
}

/* UNet noise predictions (T, N, 4, h, w) for the golden latent, context and each timestep (nt: how many). */
static sd_tensor *run_unet(const char *model, const kind *k, sd_lora *s, int merge, int nt)
{
	sd_st *g = sd_st_open(P("%s/unet.safetensors", k->golden));
	sd_model *m = sd_model_open(model, config_dir);
	sd_weights *w = m ? sd_weights_load(m, SD_UNET, SD_DEVICE_CPU) : NULL;
	if (w && s && merge && sd_lora_merge(s, w) < 0) sd_weights_free(w), w = NULL;
	sd_unet *u = w ? sd_unet_new(w) : NULL;
	sd_tensor *out = NULL;
	if (u && (!s || merge || sd_lora_attach_unet(s, u, w) == 0) && g) {
		const sd_tensor *lat = gold(g, "latent"), *ctx = gold(g, "encoder_hidden_states"), *ts = gold(g, "timesteps");
		if (lat && ctx && ts) {
			if (nt > ts->shape[0]) nt = (int)ts->shape[0];
			out = sd_tensor_newv(SD_DTYPE_F32, 5, (int64_t)nt, lat->shape[0], lat->shape[1], lat->shape[2], lat->shape[3]);
			for (int i = 0; out && i < nt; i++) {
				sd_tensor eps = *lat;
				eps.owns = 0;
				eps.data = (float *)out->data + i * sd_tensor_numel(lat);
				float t = (float)((const int64_t *)ts->data)[i];
				if (sd_unet_forward(u, NULL, &eps, lat, &t, 1, ctx) < 0) sd_tensor_free(out), out = NULL;
			}
		}
	}
	if (!out) {
		printf("  unet of %s: %s\n", model, sd_errmsg());
		test_failed_++;
	}
	sd_unet_free(u);
	sd_weights_free(w);
	sd_model_close(m);
	sd_st_close(g);
	return out;
}

static void close_to(const char *what, const sd_tensor *got, const sd_tensor *want, double rtol)
{
	if (!got || !want) {
		test_failed_++;
		return;
	}
	if (sd_tensor_numel(got) > sd_tensor_numel(want)) {
		printf("  %s: %lld values, the reference has %lld\n", what, (long long)sd_tensor_numel(got),
		       (long long)sd_tensor_numel(want));
		test_failed_++;
		return;
	}
	printf("  %s:\n", what);
	CHECK_CLOSE((const float *)got->data, (const float *)want->data, sd_tensor_numel(got), rtol);
}

/* Every lora_outputs entry the set s reproduces: comps is a mask of (1 << component). */
static void check_outputs(const kind *k, sd_lora *s, int merge, int comps, int unet_steps)
{
	sd_st *g = sd_st_open(P("%s/lora_outputs.safetensors", k->golden));
	if (!g) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return;
	}
	if (comps & (1 << SD_TEXT_ENCODER)) {
		sd_tensor *t = run_text(k->model, k, s, merge);
		close_to("text_encoder_last_hidden_state", t, gold(g, "text_encoder_last_hidden_state"), RTOL);
		sd_tensor_free(t);
	}
	if (comps & (1 << SD_VAE)) {
		sd_tensor *v[3];
		if (run_vae(k->model, k, s, merge, v) == 0) {
			close_to("vae_mean", v[0], gold(g, "vae_mean"), RTOL);
			close_to("vae_logvar", v[1], gold(g, "vae_logvar"), RTOL);
			close_to("vae_decode_mean", v[2], gold(g, "vae_decode_mean"), RTOL);
		}
		for (int i = 0; i < 3; i++) sd_tensor_free(v[i]);
	}
	if (comps & (1 << SD_UNET)) {
		sd_tensor *u = run_unet(k->model, k, s, merge, unet_steps);
		close_to("unet_noise_pred", u, gold(g, "unet_noise_pred"), RTOL);
		sd_tensor_free(u);
	}
	sd_st_close(g);
}

#define ALL ((1 << SD_TEXT_ENCODER) | (1 << SD_VAE) | (1 << SD_UNET))
#define TEXT_UNET ((1 << SD_TEXT_ENCODER) | (1 << SD_UNET))

/* ==== tests ==== */

TEST(parse_arg)
{
	char *p;
	float s;
	CHECK_OK(sd_lora_parse_arg("style.safetensors:0.8", &p, &s));
	CHECK(p && !strcmp(p, "style.safetensors") && s == 0.8f);
	free(p);
	CHECK_OK(sd_lora_parse_arg("a:b/c.safetensors", &p, &s));
	CHECK(p && !strcmp(p, "a:b/c.safetensors") && s == 1.0f);
	free(p);
	CHECK_OK(sd_lora_parse_arg("x:y/z:-0.5", &p, &s));
	CHECK(p && !strcmp(p, "x:y/z") && s == -0.5f);
	free(p);
	CHECK_OK(sd_lora_parse_arg("dir/", &p, &s));
	CHECK(p && !strcmp(p, "dir/") && s == 1.0f);
	free(p);
	CHECK(sd_lora_parse_arg(":0.5", &p, &s) == -1);
}

TEST(peft_tiny)
{
	kind k = tiny();
	sd_lora *s = load1(P("%s/peft", k.lora)); /* the parent folder: unet/, text_encoder/, vae/ */
	if (s) {
		CHECK(sd_lora_count(s, SD_UNET) == 24 && sd_lora_count(s, SD_TEXT_ENCODER) == 10 &&
		      sd_lora_count(s, SD_VAE) == 6);
		check_outputs(&k, s, 0, ALL, 3);
	}
	sd_lora_free(s);
	/* one component folder alone, as a tool would get it */
	s = load1(P("%s/peft/vae", k.lora));
	if (s) {
		CHECK(sd_lora_count(s, SD_VAE) == 6 && sd_lora_count(s, SD_UNET) == 0);
		check_outputs(&k, s, 0, 1 << SD_VAE, 0);
	}
	sd_lora_free(s);
	kind_free(&k);
}

TEST(kohya_tiny)
{
	kind k = tiny();
	sd_lora *s = load1(P("%s/kohya/lora.safetensors", k.lora));
	if (s) {
		CHECK(sd_lora_count(s, SD_UNET) == 24 && sd_lora_count(s, SD_TEXT_ENCODER) == 10);
		check_outputs(&k, s, 0, TEXT_UNET, 3);
	}
	sd_lora_free(s);
	kind_free(&k);
}

/* The fixture's kohya file renamed to LDM-style names (lora_unet_input_blocks_4_1_…), as A1111-era
 * trainers wrote them: the same outputs. */
TEST(kohya_ldm_names)
{
	kind k = tiny();
	sd_st *f = sd_st_open(P("%s/kohya/lora.safetensors", k.lora));
	sd_model *m = sd_model_open(k.model, NULL);
	sd_weights *w = m ? sd_weights_load(m, SD_UNET, SD_DEVICE_CPU) : NULL;
	char tmpl[] = "/tmp/test_lora.XXXXXX";
	char *dir = mkdtemp(tmpl);
	if (!f || !w || !dir) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		goto out;
	}
	int n = sd_st_count(f), renamed = 0;
	char **names = calloc(n, sizeof *names);
	const sd_tensor **ts = calloc(n, sizeof *ts);
	for (int i = 0; i < n; i++) {
		const char *key = sd_st_name(f, i);
		ts[i] = sd_st_tensor(f, i);
		names[i] = strdup(key);
		if (strncmp(key, "lora_unet_", 10)) continue;
		/* find the weight whose flattened diffusers path is the key's module */
		const char *dot = strchr(key, '.');
		for (int j = 0; j < sd_weights_count(w); j++) {
			char flat[512], ldm[512];
			const char *wn = sd_weights_name(w, j);
			size_t len = strlen(wn);
			if (len < 8 || strcmp(wn + len - 7, ".weight")) continue;
			snprintf(flat, sizeof flat, "%.*s", (int)(len - 7), wn);
			for (char *c = flat; *c; c++) if (*c == '.') *c = '_';
			if ((size_t)(dot - key - 10) != strlen(flat) || strncmp(key + 10, flat, strlen(flat))) continue;
			int unsq;
			if (sd_ldm_name(w, wn, ldm, sizeof ldm, &unsq) != 1) break;
			ldm[strlen(ldm) - 7] = 0;
			char *mod = ldm + strlen("model.diffusion_model.");
			for (char *c = mod; *c; c++) if (*c == '.') *c = '_';
			free(names[i]);
			names[i] = strdup(P("lora_unet_%s%s", mod, dot));
			renamed++;
			break;
		}
	}
	CHECK(renamed == 72);
	printf("  e.g. %s\n", names[n - 1]);
	char *path = strdup(P("%s/ldm-kohya.safetensors", dir));
	CHECK_OK(sd_st_write(path, n, (const char *const *)names, ts, NULL));
	int has_input_blocks = 0;
	for (int i = 0; i < n; i++) has_input_blocks += strstr(names[i], "input_blocks_") != NULL;
	CHECK(has_input_blocks > 0);
	sd_lora *s = load1(path);
	if (s) check_outputs(&k, s, 0, 1 << SD_UNET, 1);
	sd_lora_free(s);
	unlink(path);
	free(path);
	for (int i = 0; i < n; i++) free(names[i]);
	free(names);
	free(ts);
out:
	if (dir) rmdir(dir);
	sd_weights_free(w);
	sd_model_close(m);
	sd_st_close(f);
	kind_free(&k);
}

TEST(diffusers_file)
{
	kind k = tiny();
	sd_lora *s = load1(P("%s/diffusers/pytorch_lora_weights.safetensors", k.lora));
	if (!s) goto out;
	CHECK(sd_lora_count(s, SD_UNET) == 24 && sd_lora_count(s, SD_TEXT_ENCODER) == 10);
	/* no alpha: scale 1 (alpha = r), what diffusers 0.25 computes */
	sd_st *g = sd_st_open(P("%s/lora_diffusers_loaded.safetensors", k.golden));
	sd_tensor *u = run_unet(k.model, &k, s, 0, 1);
	close_to("unet_noise_pred_t0 (scale 1)", u, g ? gold(g, "unet_noise_pred_t0") : NULL, RTOL);
	sd_tensor_free(u);
	sd_st_close(g);
	sd_lora_free(s);
	/* at user scale 2 it is the PEFT adapter (alpha 16 / r 8): every key mapped, text part too */
	s = load1(P("%s/diffusers/pytorch_lora_weights.safetensors:2", k.lora));
	if (s) check_outputs(&k, s, 0, TEXT_UNET, 1);
out:
	sd_lora_free(s);
	kind_free(&k);
}

/* The merged weights of lora_merged_weights, from sd_lora_merge. */
static void check_merged_weights(const kind *k, const char *model, sd_lora *s, double rtol)
{
	sd_st *g = sd_st_open(P("%s/lora_merged_weights.safetensors", k->golden));
	sd_model *m = sd_model_open(model, config_dir);
	if (!g || !m) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		sd_st_close(g);
		sd_model_close(m);
		return;
	}
	for (int c = 0; c < SD_TEXT_ENCODER_2; c++) {
		sd_weights *w = sd_weights_load(m, c, SD_DEVICE_CPU);
		if (!w || (s && sd_lora_merge(s, w) < 0)) {
			printf("  %s: %s\n", sd_component_name(c), sd_errmsg());
			test_failed_++;
			sd_weights_free(w);
			continue;
		}
		int n = 0;
		double worst = 0;
		const char *pre = sd_component_name(c);
		size_t pl = strlen(pre);
		for (int i = 0; i < sd_st_count(g); i++) {
			const char *name = sd_st_name(g, i);
			if (strncmp(name, pre, pl) || name[pl] != '.') continue;
			const sd_tensor *want = sd_st_tensor(g, i), *got = sd_weights_get(w, name + pl + 1);
			if (!got || sd_tensor_numel(got) != sd_tensor_numel(want)) {
				printf("  %s: missing or of another size\n", name);
				test_failed_++;
				continue;
			}
			double md = 0, mr = 0;
			for (int64_t j = 0; j < sd_tensor_numel(got); j++) {
				double d = fabs(((const float *)got->data)[j] - ((const float *)want->data)[j]);
				if (d > md) md = d;
				if (fabs(((const float *)want->data)[j]) > mr) mr = fabs(((const float *)want->data)[j]);
			}
			if (md / mr > worst) worst = md / mr;
			n++;
		}
		printf("  %s: %d merged weights, largest relative difference %.3g (tol %.0e)\n", pre, n, worst, rtol);
		if (worst > rtol || n == 0) test_failed_++;
		sd_weights_free(w);
	}
	sd_st_close(g);
	sd_model_close(m);
}

TEST(merged_weights)
{
	kind k = tiny();
	sd_lora *s = load1(P("%s/peft", k.lora));
	if (s) check_merged_weights(&k, k.model, s, 1e-6);
	sd_lora_free(s);
	kind_free(&k);
}

/* Merged into the weights, the outputs are those of the unmerged adapters. */
TEST(merged_outputs)
{
	kind k = tiny();
	sd_lora *s = load1(P("%s/peft", k.lora));
	if (!s) goto out;
	sd_tensor *a = run_text(k.model, &k, s, 0), *b = run_text(k.model, &k, s, 1);
	close_to("text merged vs unmerged", b, a, 1e-5);
	sd_tensor_free(a), sd_tensor_free(b);
	sd_tensor *va[3], *vb[3];
	if (run_vae(k.model, &k, s, 0, va) == 0 && run_vae(k.model, &k, s, 1, vb) == 0) {
		close_to("vae mean merged vs unmerged", vb[0], va[0], 1e-5);
		close_to("vae decode merged vs unmerged", vb[2], va[2], 1e-5);
	}
	for (int i = 0; i < 3; i++) sd_tensor_free(va[i]), sd_tensor_free(vb[i]);
	sd_tensor *ua = run_unet(k.model, &k, s, 0, 1), *ub = run_unet(k.model, &k, s, 1, 1);
	close_to("unet merged vs unmerged", ub, ua, 1e-5);
	sd_tensor_free(ua), sd_tensor_free(ub);
out:
	sd_lora_free(s);
	kind_free(&k);
}

/* Two adapters on the same layers add up: the same adapter twice at 0.5 is the adapter at 1, and
 * PEFT at 0.5 + kohya at 0.5 likewise. */
TEST(two_adapters)
{
	kind k = tiny();
	const char *args[2] = {strdup(P("%s/peft:0.5", k.lora)), strdup(P("%s/kohya/lora.safetensors:0.5", k.lora))};
	const char *twice[2] = {args[0], args[0]};
	sd_lora *s = sd_lora_load(twice, 2);
	if (!s) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
	} else {
		CHECK(sd_lora_count(s, SD_TEXT_ENCODER) == 20);
		check_outputs(&k, s, 0, ALL, 1);
		check_outputs(&k, s, 1, 1 << SD_TEXT_ENCODER, 0); /* merged, too */
	}
	sd_lora_free(s);
	s = sd_lora_load(args, 2);
	if (s) check_outputs(&k, s, 0, TEXT_UNET, 1);
	sd_lora_free(s);
	free((char *)args[0]);
	free((char *)args[1]);
	kind_free(&k);
}

/* The set's adapter layers are what a trainer sees: A (r, in), B (out, r) and the scale alpha/r. */
TEST(layer_forward)
{
	float x[2 * 3] = {1, 2, 3, -1, 0.5f, 2}, w[4 * 3], b[4] = {0.1f, 0.2f, 0.3f, 0.4f}, A[2 * 3], B[4 * 2];
	for (int i = 0; i < 12; i++) w[i] = 0.1f * (i - 5);
	for (int i = 0; i < 6; i++) A[i] = 0.2f * (i - 2);
	for (int i = 0; i < 8; i++) B[i] = 0.05f * (i + 1);
	int64_t sx[2] = {2, 3}, sw[2] = {4, 3}, sb[1] = {4}, sa[2] = {2, 3}, sB[2] = {4, 2}, so[2] = {2, 4}, sh[2] = {2, 2};
	sd_tensor *tx = sd_tensor_wrap(SD_DTYPE_F32, 2, sx, x), *tw = sd_tensor_wrap(SD_DTYPE_F32, 2, sw, w),
	          *tb = sd_tensor_wrap(SD_DTYPE_F32, 1, sb, b), *ta = sd_tensor_wrap(SD_DTYPE_F32, 2, sa, A),
	          *tB = sd_tensor_wrap(SD_DTYPE_F32, 2, sB, B), *out = sd_tensor_new(SD_DTYPE_F32, 2, so),
	          *ax = sd_tensor_new(SD_DTYPE_F32, 2, sh);
	sd_lora_layer l = {ta, tB, 2.0f, 0.05f};
	CHECK(sd_lora_rank(&l) == 2 && sd_lora_rank(NULL) == 0);
	CHECK_OK(sd_lora_linear_forward(out, tx, tw, tb, &l, ax));
	float want[8], wax[4];
	for (int n = 0; n < 2; n++) {
		for (int r = 0; r < 2; r++) {
			double s = 0;
			for (int i = 0; i < 3; i++) s += (double)x[n * 3 + i] * A[r * 3 + i];
			wax[n * 2 + r] = (float)s;
		}
		for (int o = 0; o < 4; o++) {
			double s = b[o];
			for (int i = 0; i < 3; i++) s += (double)x[n * 3 + i] * w[o * 3 + i];
			for (int r = 0; r < 2; r++) s += 2.0 * B[o * 2 + r] * wax[n * 2 + r];
			want[n * 4 + o] = (float)s;
		}
	}
	CHECK_CLOSE((const float *)out->data, want, 8, 1e-6);
	CHECK_CLOSE((const float *)ax->data, wax, 4, 1e-6);
	CHECK(sd_lora_linear_forward(out, tx, tw, tb, &l, NULL) == -1); /* no scratch: an error, not a crash */
	CHECK_OK(sd_lora_linear_forward(out, tx, tw, tb, NULL, NULL));
	sd_tensor_free(tx), sd_tensor_free(tw), sd_tensor_free(tb), sd_tensor_free(ta), sd_tensor_free(tB);
	sd_tensor_free(out), sd_tensor_free(ax);
}

/* kohya's conv LoRA (LoCon: down (r,C,3,3), up (O,r,1,1)) on a resnet conv is merged exactly:
 * W' = W + scale·up·down, and the UNet runs with it; a 1×1 one on proj_in likewise. */
TEST(conv_lora)
{
	kind k = tiny();
	char tmpl[] = "/tmp/test_lora.XXXXXX";
	char *dir = mkdtemp(tmpl);
	sd_model *m = sd_model_open(k.model, NULL);
	sd_weights *w = m ? sd_weights_load(m, SD_UNET, SD_DEVICE_CPU) : NULL;
	sd_weights *w2 = m ? sd_weights_load(m, SD_UNET, SD_DEVICE_CPU) : NULL;
	const sd_tensor *W = w ? sd_weights_get(w, "down_blocks.0.resnets.0.conv1.weight") : NULL;
	const sd_tensor *Wp = w ? sd_weights_get(w, "down_blocks.1.attentions.0.proj_in.weight") : NULL;
	if (!dir || !W || !Wp || W->ndim != 4 || Wp->ndim != 4) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		goto out;
	}
	const int64_t O = W->shape[0], C = W->shape[1], r = 4, Op = Wp->shape[0], Cp = Wp->shape[1];
	sd_tensor *down = sd_tensor_newv(SD_DTYPE_F32, 4, r, C, (int64_t)3, (int64_t)3);
	sd_tensor *up = sd_tensor_newv(SD_DTYPE_F32, 4, O, r, (int64_t)1, (int64_t)1);
	sd_tensor *pdown = sd_tensor_newv(SD_DTYPE_F32, 4, r, Cp, (int64_t)1, (int64_t)1);
	sd_tensor *pup = sd_tensor_newv(SD_DTYPE_F32, 2, Op, r);
	sd_tensor *alpha = sd_tensor_newv(SD_DTYPE_F32, 0);
	for (int64_t i = 0; i < sd_tensor_numel(down); i++) ((float *)down->data)[i] = 0.01f * (float)((i * 7) % 13 - 6);
	for (int64_t i = 0; i < sd_tensor_numel(up); i++) ((float *)up->data)[i] = 0.02f * (float)((i * 5) % 11 - 5);
	for (int64_t i = 0; i < sd_tensor_numel(pdown); i++) ((float *)pdown->data)[i] = 0.03f * (float)((i * 3) % 7 - 3);
	for (int64_t i = 0; i < sd_tensor_numel(pup); i++) ((float *)pup->data)[i] = 0.01f * (float)((i * 11) % 9 - 4);
	*(float *)alpha->data = 2.0f; /* scale alpha / r = 0.5 */
	const char *names[] = {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
	                       "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight",
	                       "lora_unet_down_blocks_0_resnets_0_conv1.alpha",
	                       "lora_unet_input_blocks_4_1_proj_in.lora_down.weight", /* LDM-style name */
	                       "lora_unet_input_blocks_4_1_proj_in.lora_up.weight"};
	const sd_tensor *ts[] = {down, up, alpha, pdown, pup};
	char *path = strdup(P("%s/locon.safetensors", dir));
	CHECK_OK(sd_st_write(path, 5, names, ts, NULL));
	sd_lora *s = load1(path);
	if (s) {
		CHECK_OK(sd_lora_merge(s, w));
		const sd_tensor *W0 = sd_weights_get(w2, "down_blocks.0.resnets.0.conv1.weight"), *Wp0 = sd_weights_get(w2, "down_blocks.1.attentions.0.proj_in.weight");
		float *want = malloc(sizeof(float) * sd_tensor_numel(W)), *wantp = malloc(sizeof(float) * sd_tensor_numel(Wp));
		const int64_t K = C * 9;
		for (int64_t o = 0; o < O; o++)
			for (int64_t q = 0; q < K; q++) {
				double acc = 0;
				for (int64_t j = 0; j < r; j++) acc += (double)((float *)up->data)[o * r + j] * ((float *)down->data)[j * K + q];
				want[o * K + q] = ((const float *)W0->data)[o * K + q] + (float)(0.5 * acc);
			}
		for (int64_t o = 0; o < Op; o++)
			for (int64_t q = 0; q < Cp; q++) {
				double acc = 0;
				for (int64_t j = 0; j < r; j++) acc += (double)((float *)pup->data)[o * r + j] * ((float *)pdown->data)[j * Cp + q];
				wantp[o * Cp + q] = ((const float *)Wp0->data)[o * Cp + q] + (float)acc; /* no alpha: scale 1 */
			}
		printf("  conv1 (3x3 LoCon):\n");
		CHECK_CLOSE((const float *)W->data, want, sd_tensor_numel(W), 1e-6);
		printf("  proj_in (1x1, LDM name):\n");
		CHECK_CLOSE((const float *)Wp->data, wantp, sd_tensor_numel(Wp), 1e-6);
		free(want);
		free(wantp);
		/* attached to a UNet: merged too (no run-time slot for convs), and it runs */
		sd_unet *u = sd_unet_new(w2);
		CHECK(u && sd_lora_attach_unet(s, u, w2) == 0);
		CHECK(!memcmp(W->data, sd_weights_get(w2, "down_blocks.0.resnets.0.conv1.weight")->data, sd_tensor_nbytes(W)));
		sd_unet_free(u);
	}
	sd_lora_free(s);
	unlink(path);
	free(path);
	sd_tensor_free(down), sd_tensor_free(up), sd_tensor_free(pdown), sd_tensor_free(pup), sd_tensor_free(alpha);
out:
	if (dir) rmdir(dir);
	sd_weights_free(w);
	sd_weights_free(w2);
	sd_model_close(m);
	kind_free(&k);
}

/* sd_ldm_name is the inverse of the single-file renaming: the names of tiny.ldm.ckpt, exactly. */
TEST(ldm_names)
{
	kind k = tiny();
	sd_model *m = sd_model_open(k.model, NULL);
	sd_ckpt *ck = sd_ckpt_open(P("%s/tiny.ldm.ckpt", fixtures()));
	if (!m || !ck) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		goto out;
	}
	int total = 0, found = 0;
	for (int c = 0; c < SD_TEXT_ENCODER_2; c++) {
		sd_weights *w = sd_weights_load(m, c, SD_DEVICE_CPU);
		if (!w) {
			test_failed_++;
			continue;
		}
		for (int i = 0; i < sd_weights_count(w); i++) {
			char name[512];
			int unsq;
			total++;
			if (sd_ldm_name(w, sd_weights_name(w, i), name, sizeof name, &unsq) != 1) {
				printf("  no LDM name for %s\n", sd_weights_name(w, i));
				continue;
			}
			int j = sd_ckpt_find(ck, name);
			if (j < 0) {
				printf("  %s -> %s: not in tiny.ldm.ckpt\n", sd_weights_name(w, i), name);
				continue;
			}
			const sd_tensor *t = sd_ckpt_tensor(ck, j), *x = sd_weights_at(w, i);
			/* diffusers' conversion script (which made the .ckpt) writes the VAE attention biases as
			 * (C,1,1); the original CompVis checkpoints, and sd_ldm_name, have (C) */
			int bias3 = t->ndim == 3 && strstr(name, "attn_1.") && strstr(name, ".bias");
			if (t->ndim != x->ndim + unsq && !bias3) {
				printf("  %s: %d dims there, %d + %d here\n", name, t->ndim, x->ndim, unsq);
				continue;
			}
			found++;
		}
		sd_weights_free(w);
	}
	printf("  %d of %d weights named as in tiny.ldm.ckpt\n", found, total);
	CHECK(found == total && total > 0);
out:
	sd_ckpt_close(ck);
	sd_model_close(m);
	kind_free(&k);
}

/* Write merged weights as a diffusers folder and as a single file; both reopen with the golden merged
 * weights and the same outputs. */
TEST(write_and_reopen)
{
	kind k = tiny();
	sd_lora *s = load1(P("%s/peft", k.lora));
	char tmpl[] = "/tmp/test_lora.XXXXXX";
	char *dir = mkdtemp(tmpl);
	sd_model *m = sd_model_open(k.model, NULL);
	sd_weights *ws[SD_COMPONENT_COUNT] = {0};
	if (!s || !dir || !m) goto out;
	for (int c = 0; c < SD_TEXT_ENCODER_2; c++) {
		ws[c] = sd_weights_load(m, c, SD_DEVICE_CPU);
		CHECK(ws[c] && sd_lora_merge(s, ws[c]) == 0);
	}
	char *folder = strdup(P("%s/merged", dir)), *single = strdup(P("%s/merged.safetensors", dir)),
	     *half = strdup(P("%s/merged-f16.safetensors", dir));
	CHECK_OK(sd_model_write_diffusers(folder, ws, SD_DTYPE_F32, sd_model_tokenizer_dir(m), sd_model_scheduler_json(m)));
	CHECK(sd_model_write_diffusers(folder, ws, SD_DTYPE_F32, NULL, NULL) == -1); /* exists */
	CHECK_OK(sd_model_write_single(single, ws, SD_DTYPE_F32));
	CHECK_OK(sd_model_write_single(half, ws, SD_DTYPE_F16));
	sd_model *f = sd_model_open(folder, NULL);
	CHECK(f && sd_model_tokenizer_dir(f) && sd_model_scheduler_json(f));
	sd_model_close(f);
	check_merged_weights(&k, folder, NULL, 1e-6);
	config_dir = k.model;
	check_merged_weights(&k, single, NULL, 1e-6);
	/* the merged files give the adapters' outputs without them */
	check_outputs(&(kind){folder, k.golden, k.lora}, NULL, 0, ALL, 1);
	check_outputs(&(kind){single, k.golden, k.lora}, NULL, 0, ALL, 1);
	/* f16 rounding of the merged weights: close, not equal */
	sd_st *g = sd_st_open(P("%s/lora_outputs.safetensors", k.golden));
	sd_tensor *t = run_text(half, &k, NULL, 0);
	close_to("text_encoder_last_hidden_state from the f16 file (tol 1e-2)", t,
	         g ? gold(g, "text_encoder_last_hidden_state") : NULL, 1e-2);
	sd_tensor_free(t);
	sd_st_close(g);
	config_dir = NULL;
	char cmd[2048];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	CHECK(system(cmd) == 0);
	free(folder), free(single), free(half);
out:
	for (int c = 0; c < SD_TEXT_ENCODER_2; c++) sd_weights_free(ws[c]);
	sd_model_close(m);
	sd_lora_free(s);
	kind_free(&k);
}

/* A bad adapter file: written from (name, shape) pairs; loading or attaching must fail naming `key`. */
static void expect_bad(const char *dir, const char *what, int n, const char *const *names, const int64_t (*shapes)[2],
                       const char *key, int at_attach)
{
	sd_tensor *ts[8];
	for (int i = 0; i < n; i++)
		ts[i] = shapes[i][0] == 0 ? sd_tensor_newv(SD_DTYPE_F32, 0) : sd_tensor_newv(SD_DTYPE_F32, 2, shapes[i][0], shapes[i][1]);
	char *path = strdup(P("%s/%s.safetensors", dir, what));
	CHECK_OK(sd_st_write(path, n, names, (const sd_tensor *const *)ts, NULL));
	for (int i = 0; i < n; i++) sd_tensor_free(ts[i]);
	sd_lora *s = sd_lora_load((const char *const *)&path, 1);
	int rc = s ? 0 : -1;
	if (s) {
		kind k = tiny();
		sd_model *m = sd_model_open(k.model, NULL);
		sd_weights *w = m ? sd_weights_load(m, SD_TEXT_ENCODER, SD_DEVICE_CPU) : NULL;
		sd_clip *c = w ? sd_clip_new(w) : NULL;
		rc = c ? sd_lora_attach_clip(s, c, w) : 0;
		sd_clip_free(c), sd_weights_free(w), sd_model_close(m);
		kind_free(&k);
	}
	printf("  %s: %s\n", what, rc < 0 ? sd_errmsg() : "(accepted)");
	CHECK(rc == -1 && (s != NULL) == at_attach && strstr(sd_errmsg(), key));
	sd_lora_free(s);
	unlink(path);
	free(path);
}

TEST(bad_adapters)
{
	char tmpl[] = "/tmp/test_lora.XXXXXX";
	char *dir = mkdtemp(tmpl);
	if (!dir) SKIP("no temporary folder");
	const char *q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
	{ /* A does not fit the layer's input (32) */
		const char *n[] = {P("%s.lora_down.weight", q), P("%s.lora_up.weight", q)};
		const int64_t s[][2] = {{8, 33}, {32, 8}};
		expect_bad(dir, "wrong-shape", 2, n, s, "layers_0_self_attn_q_proj.lora_down.weight", 1);
	}
	{ /* a layer the model lacks */
		const char *n[] = {"lora_te_text_model_encoder_layers_9_self_attn_q_proj.lora_down.weight",
		                   "lora_te_text_model_encoder_layers_9_self_attn_q_proj.lora_up.weight"};
		const int64_t s[][2] = {{8, 32}, {32, 8}};
		expect_bad(dir, "unknown-layer", 2, n, s, "layers_9_self_attn_q_proj.lora_down.weight", 1);
	}
	{ /* a key that is no part of a LoRA */
		const char *n[] = {P("%s.lora_down.weight", q), P("%s.lora_up.weight", q), P("%s.lora_mid.weight", q)};
		const int64_t s[][2] = {{8, 32}, {32, 8}, {8, 8}};
		expect_bad(dir, "unknown-key", 3, n, s, "q_proj.lora_mid.weight", 0);
	}
	{ /* A without B */
		const char *n[] = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"};
		const int64_t s[][2] = {{8, 32}};
		expect_bad(dir, "no-b", 1, n, s, "q_proj.lora_A.weight", 0);
	}
	{ /* B's rank differs from A's */
		const char *n[] = {"unet.x.lora_A.weight", "unet.x.lora_B.weight"};
		const int64_t s[][2] = {{8, 32}, {32, 4}};
		expect_bad(dir, "rank", 2, n, s, "unet.x.lora_A.weight", 0);
	}
	/* a truncated file */
	kind k = tiny();
	size_t len;
	char *data = sd_read_file(P("%s/kohya/lora.safetensors", k.lora), 0, &len);
	char *path = strdup(P("%s/truncated.safetensors", dir));
	CHECK(data && sd_write_file_atomic(path, data, len / 2) == 0);
	sd_lora *s = sd_lora_load((const char *const *)&path, 1);
	printf("  truncated: %s\n", s ? "(accepted)" : sd_errmsg());
	CHECK(!s && strstr(sd_errmsg(), "truncated.safetensors"));
	sd_lora_free(s);
	unlink(path);
	free(path);
	free(data);
	/* a folder that holds no adapter, a missing path */
	s = sd_lora_load((const char *[]){dir}, 1);
	CHECK(!s && strstr(sd_errmsg(), "not a LoRA adapter folder"));
	s = sd_lora_load((const char *[]){"/nonexistent/lora.safetensors"}, 1);
	CHECK(!s && strstr(sd_errmsg(), "/nonexistent/lora.safetensors"));
	/* the VAE adapter on the text encoder's weights: its layers are not there */
	s = load1(P("%s/peft/vae", k.lora));
	if (s) {
		sd_model *m = sd_model_open(k.model, NULL);
		sd_weights *w = m ? sd_weights_load(m, SD_TEXT_ENCODER, SD_DEVICE_CPU) : NULL;
		CHECK(w && sd_lora_merge(s, w) == 0); /* nothing of the text encoder's in a VAE adapter */
		CHECK(sd_lora_count(s, SD_TEXT_ENCODER) == 0);
		sd_weights_free(w);
		sd_model_close(m);
	}
	sd_lora_free(s);
	rmdir(dir);
	kind_free(&k);
}

/* ==== sd15-shape-small (in $SHARED) ==== */

TEST(small_peft_kohya)
{
	const char *sh = shared();
	if (!sh) SKIP("$SHARED fixtures not found");
	kind k = small(sh);
	sd_lora *s = load1(P("%s/peft", k.lora));
	if (s) check_outputs(&k, s, 0, ALL, 3);
	sd_lora_free(s);
	s = load1(P("%s/kohya/lora.safetensors", k.lora));
	if (s) check_outputs(&k, s, 0, TEXT_UNET, 1);
	sd_lora_free(s);
	kind_free(&k);
}

TEST(small_diffusers_merged)
{
	const char *sh = shared();
	if (!sh) SKIP("$SHARED fixtures not found");
	kind k = small(sh);
	sd_lora *s = load1(P("%s/diffusers/pytorch_lora_weights.safetensors", k.lora));
	if (s) {
		sd_st *g = sd_st_open(P("%s/lora_diffusers_loaded.safetensors", k.golden));
		sd_tensor *u = run_unet(k.model, &k, s, 0, 1);
		close_to("unet_noise_pred_t0 (scale 1)", u, g ? gold(g, "unet_noise_pred_t0") : NULL, RTOL);
		sd_tensor_free(u);
		sd_st_close(g);
	}
	sd_lora_free(s);
	s = load1(P("%s/peft", k.lora));
	if (s) {
		check_merged_weights(&k, k.model, s, 1e-6);
		/* the single-file LDM fp16 model takes the same adapters (names resolved through the LDM mapping) */
		check_outputs(&(kind){P("%s/sd15-shape-small.ldm.fp16.safetensors", sh), k.golden, k.lora}, s, 0,
		              1 << SD_VAE, 0);
	}
	sd_lora_free(s);
	kind_free(&k);
}

int main(void)
{
	RUN(parse_arg);
	RUN(layer_forward);
	RUN(peft_tiny);
	RUN(kohya_tiny);
	RUN(kohya_ldm_names);
	RUN(diffusers_file);
	RUN(merged_weights);
	RUN(merged_outputs);
	RUN(two_adapters);
	RUN(conv_lora);
	RUN(ldm_names);
	RUN(write_and_reopen);
	RUN(bad_adapters);
	RUN(small_peft_kohya);
	RUN(small_diffusers_merged);
	return test_summary();
}
