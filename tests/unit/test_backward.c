/*
 * test_backward.c - every backward op of sd.h ("backward ops, loss, optimizers") against central finite
 * differences: for random inputs and a random r, L = Σ r ⊙ f(inputs) with f a double-precision forward
 * written here from the PyTorch definitions, each input element perturbed by ±h (h = 1e-5, scaled),
 * dL/dinput = (L₊ − L₋)/2h.  The backward under test gets dy = r.  Each input gradient is checked twice:
 * overwriting (acc = 0) a NaN-filled buffer, and accumulating (acc = 1) onto random values; parameter
 * gradients (dw, dA, dB, dgamma) are checked to accumulate.  Also: the LoRA training forward, the loss,
 * noising and min-SNR weights, dropout masks, Adam/AdamW (one and two steps against torch's formulas,
 * and against torch's own numbers in golden/tiny/train_step.safetensors when present), clip_grad_norm,
 * saving and loading the optimizer state, and shape errors.
 */
#include <stdint.h>
#include <unistd.h>
#include "sd.h"
#include "test.h"

#define TOL 1e-4 /* relative to the largest reference gradient; float backward vs double differences */

/* ==== helpers ==== */

static uint64_t rng = 0x2545f4914f6cdd1dull;
static uint64_t xorshift(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}
static float urand(void) { return (float)((double)(xorshift() >> 11) / 4503599627370496.0 - 1.0); }

#define DIMS(...) (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (int64_t[]){__VA_ARGS__}
#define F(t) ((float *)(t)->data)
#define N_(t) sd_tensor_numel(t)
#define FREE(...) do {                                                                   \
	sd_tensor *fl_[] = {__VA_ARGS__};                                                   \
	for (size_t i_ = 0; i_ < sizeof fl_ / sizeof *fl_; i_++) sd_tensor_free(fl_[i_]);   \
} while (0)

static sd_tensor *fill(sd_tensor *t, float v)
{
	for (int64_t i = 0; i < N_(t); i++) F(t)[i] = v;
	return t;
}
static sd_tensor *rnd(int ndim, const int64_t *shape)
{
	sd_tensor *t = sd_tensor_new(SD_DTYPE_F32, ndim, shape);
	for (int64_t i = 0; i < N_(t); i++) F(t)[i] = urand();
	return t;
}
static sd_tensor *nans(int ndim, const int64_t *shape)
{
	return fill(sd_tensor_new(SD_DTYPE_F32, ndim, shape), NAN);
}
static sd_tensor *zeros(int ndim, const int64_t *shape)
{
	return sd_tensor_new(SD_DTYPE_F32, ndim, shape);
}
static sd_tensor *like(const sd_tensor *t, float v)
{
	return fill(sd_tensor_new(SD_DTYPE_F32, t->ndim, t->shape), v);
}
static double *dcopy(const sd_tensor *t)
{
	double *d = malloc((size_t)(N_(t) ? N_(t) : 1) * sizeof(double));
	for (int64_t i = 0; i < N_(t); i++) d[i] = F(t)[i];
	return d;
}

/* ==== finite differences ==== */

/* a double forward: out (nout) from the inputs in[] (sizes in the globals below) */
typedef void (*dfwd)(double *out, double **in);

static double loss_of(dfwd f, double **in, const float *r, int64_t nout, double *out)
{
	f(out, in);
	double L = 0;
	for (int64_t i = 0; i < nout; i++) L += (double)r[i] * out[i];
	return L;
}

/* dL/din[k] (n elements) by central differences, as floats (malloc'd) */
static float *fd(dfwd f, double **in, int k, int64_t n, const float *r, int64_t nout)
{
	double *out = malloc((size_t)(nout ? nout : 1) * sizeof(double));
	float *g = malloc((size_t)(n ? n : 1) * sizeof(float));
	for (int64_t i = 0; i < n; i++) {
		double save = in[k][i], h = 1e-5 * fmax(1.0, fabs(save));
		in[k][i] = save + h;
		double Lp = loss_of(f, in, r, nout, out);
		in[k][i] = save - h;
		double Lm = loss_of(f, in, r, nout, out);
		in[k][i] = save;
		g[i] = (float)((Lp - Lm) / (2 * h));
	}
	free(out);
	return g;
}

/*
 * Check an input-gradient call both ways: `acc` = 0 into a NaN-filled dx, then `acc` = 1 onto random
 * values z (dx − z compared).  CALL is an expression using the variable acc.
 */
#define CHECK_GRAD(dx, ref, CALL) do {                                                   \
	int64_t n_ = N_(dx);                                                                \
	int acc = 0;                                                                        \
	fill(dx, NAN);                                                                      \
	CHECK_OK(CALL);                                                                     \
	CHECK_CLOSE(F(dx), ref, n_, TOL);                                                   \
	float *z_ = malloc((size_t)(n_ ? n_ : 1) * sizeof(float));                          \
	for (int64_t i_ = 0; i_ < n_; i_++) F(dx)[i_] = z_[i_] = urand();                   \
	acc = 1;                                                                            \
	CHECK_OK(CALL);                                                                     \
	for (int64_t i_ = 0; i_ < n_; i_++) F(dx)[i_] -= z_[i_];                            \
	CHECK_CLOSE(F(dx), ref, n_, TOL);                                                   \
	free(z_);                                                                           \
} while (0)

/* A parameter gradient: starts at random z, the call must add: dp − z compared. */
static float *preset(sd_tensor *dp)
{
	float *z = malloc((size_t)N_(dp) * sizeof(float));
	for (int64_t i = 0; i < N_(dp); i++) F(dp)[i] = z[i] = urand();
	return z;
}
static void check_added(sd_tensor *dp, float *z, const float *ref, const char *what)
{
	for (int64_t i = 0; i < N_(dp); i++) F(dp)[i] -= z[i];
	printf("  %s (accumulated):\n", what);
	CHECK_CLOSE(F(dp), ref, N_(dp), TOL);
	free(z);
}

/* ==== sizes of the op under test ==== */

static int64_t gN, gC, gH, gW, gO, gkh, gkw, grows, gI, gD, gLq, gLk, gd, gdv, gA, gm, gS;
static int gstride, gpt, gpb, gpl, gpr, ggroups, gsilu, gheads, gcausal, gact;
static double geps, gscale, galpha, gbeta;

/* ==== double forwards (PyTorch definitions) ==== */

static double d_sig(double x) { return 1.0 / (1.0 + exp(-x)); }
static double d_gelu(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }
static double d_act(double x, int a)
{
	switch (a) {
	case SD_ACT_SILU: return x * d_sig(x);
	case SD_ACT_GELU: return d_gelu(x);
	case SD_ACT_GELU_TANH: return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
	case SD_ACT_QUICK_GELU: return x * d_sig(1.702 * x);
	default: return NAN;
	}
}

/* out (rows, O) = x (rows, I) · wᵀ + b;  in: x, w, b (may be NULL) */
static void f_linear(double *out, double **in)
{
	for (int64_t r = 0; r < grows; r++)
		for (int64_t o = 0; o < gO; o++) {
			double s = in[2] ? in[2][o] : 0;
			for (int64_t i = 0; i < gI; i++) s += in[0][r * gI + i] * in[1][o * gI + i];
			out[r * gO + o] = s;
		}
}

/* PEFT LoRA: in: x, A (r, I), B (O, r), w, b, mask (or NULL) — r in gD */
static void f_lora(double *out, double **in)
{
	double *ax = malloc((size_t)gD * sizeof(double));
	for (int64_t row = 0; row < grows; row++) {
		const double *x = in[0] + row * gI;
		for (int64_t k = 0; k < gD; k++) {
			double s = 0;
			for (int64_t i = 0; i < gI; i++) s += x[i] * (in[5] ? in[5][row * gI + i] : 1.0) * in[1][k * gI + i];
			ax[k] = s;
		}
		for (int64_t o = 0; o < gO; o++) {
			double s = in[4][o], t = 0;
			for (int64_t i = 0; i < gI; i++) s += x[i] * in[3][o * gI + i];
			for (int64_t k = 0; k < gD; k++) t += ax[k] * in[2][o * gD + k];
			out[row * gO + o] = s + gscale * t;
		}
	}
	free(ax);
}

/* F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, stride);  in: x, w */
static void f_conv(double *out, double **in)
{
	int64_t Ho = (gH + gpt + gpb - gkh) / gstride + 1, Wo = (gW + gpl + gpr - gkw) / gstride + 1;
	for (int64_t n = 0; n < gN; n++)
		for (int64_t o = 0; o < gO; o++)
			for (int64_t oy = 0; oy < Ho; oy++)
				for (int64_t ox = 0; ox < Wo; ox++) {
					double s = 0;
					for (int64_t c = 0; c < gC; c++)
						for (int64_t ky = 0; ky < gkh; ky++)
							for (int64_t kx = 0; kx < gkw; kx++) {
								int64_t iy = oy * gstride - gpt + ky, ix = ox * gstride - gpl + kx;
								if (iy < 0 || iy >= gH || ix < 0 || ix >= gW) continue;
								s += in[1][((o * gC + c) * gkh + ky) * gkw + kx] * in[0][((n * gC + c) * gH + iy) * gW + ix];
							}
					out[((n * gO + o) * Ho + oy) * Wo + ox] = s;
				}
}

/* F.group_norm(x, groups, gamma, beta, eps) then SiLU when gsilu;  x (N, C, S = gS);  in: x, gamma, beta */
static void f_group_norm(double *out, double **in)
{
	int64_t cg = gC / ggroups, cnt = cg * gS;
	for (int64_t n = 0; n < gN; n++)
		for (int64_t g = 0; g < ggroups; g++) {
			const double *xs = in[0] + (n * gC + g * cg) * gS;
			double mean = 0, var = 0;
			for (int64_t i = 0; i < cnt; i++) mean += xs[i];
			mean /= cnt;
			for (int64_t i = 0; i < cnt; i++) var += (xs[i] - mean) * (xs[i] - mean);
			var /= cnt;
			for (int64_t c = 0; c < cg; c++)
				for (int64_t i = 0; i < gS; i++) {
					int64_t ch = g * cg + c;
					double y = (xs[c * gS + i] - mean) / sqrt(var + geps) * in[1][ch] + in[2][ch];
					out[(n * gC + ch) * gS + i] = gsilu ? y * d_sig(y) : y;
				}
		}
}

/* F.layer_norm over D;  in: x, gamma, beta */
static void f_layer_norm(double *out, double **in)
{
	for (int64_t r = 0; r < grows; r++) {
		const double *x = in[0] + r * gD;
		double mean = 0, var = 0;
		for (int64_t i = 0; i < gD; i++) mean += x[i];
		mean /= gD;
		for (int64_t i = 0; i < gD; i++) var += (x[i] - mean) * (x[i] - mean);
		var /= gD;
		for (int64_t i = 0; i < gD; i++) out[r * gD + i] = (x[i] - mean) / sqrt(var + geps) * in[1][i] + in[2][i];
	}
}

static void f_act(double *out, double **in)
{
	for (int64_t i = 0; i < grows; i++) out[i] = d_act(in[0][i], gact);
}

/* GEGLU: x (rows, 2D) = [a | g] → a·gelu(g) */
static void f_geglu(double *out, double **in)
{
	for (int64_t r = 0; r < grows; r++)
		for (int64_t i = 0; i < gD; i++) out[r * gD + i] = in[0][r * 2 * gD + i] * d_gelu(in[0][r * 2 * gD + gD + i]);
}

static void f_softmax(double *out, double **in)
{
	for (int64_t r = 0; r < grows; r++) {
		const double *x = in[0] + r * gD;
		double mx = -INFINITY, s = 0;
		for (int64_t j = 0; j < gD; j++) mx = fmax(mx, x[j]);
		for (int64_t j = 0; j < gD; j++) s += exp(x[j] - mx);
		for (int64_t j = 0; j < gD; j++) out[r * gD + j] = exp(x[j] - mx) / s;
	}
}

/* scaled_dot_product_attention with heads as view(N, L, H, d).transpose(1, 2);  in: q, k, v */
static void f_attention(double *out, double **in)
{
	int64_t H = gheads;
	double *s = malloc((size_t)gLk * sizeof(double));
	for (int64_t n = 0; n < gN; n++)
		for (int64_t h = 0; h < H; h++)
			for (int64_t i = 0; i < gLq; i++) {
				const double *qi = in[0] + ((n * gLq + i) * H + h) * gd;
				double mx = -INFINITY, sum = 0;
				for (int64_t j = 0; j < gLk; j++) {
					if (gcausal && j > i) { s[j] = -INFINITY; continue; }
					const double *kj = in[1] + ((n * gLk + j) * H + h) * gd;
					double dot = 0;
					for (int64_t c = 0; c < gd; c++) dot += qi[c] * kj[c];
					s[j] = dot * gscale;
					mx = fmax(mx, s[j]);
				}
				for (int64_t j = 0; j < gLk; j++) sum += s[j] = exp(s[j] - mx);
				for (int64_t e = 0; e < gdv; e++) {
					double acc = 0;
					for (int64_t j = 0; j < gLk; j++) acc += s[j] / sum * in[2][((n * gLk + j) * H + h) * gdv + e];
					out[((n * gLq + i) * H + h) * gdv + e] = acc;
				}
			}
	free(s);
}

/* alpha·a + beta·b[(i / S) % m] over gA·gm·gS elements (the three broadcasts of sd_add) */
static void f_add(double *out, double **in)
{
	int64_t n = gA * gm * gS;
	for (int64_t i = 0; i < n; i++) out[i] = galpha * in[0][i] + gbeta * in[1][(i / gS) % gm];
}

/* concat along dim 1 of a (N, Ca = gC, S) and b (N, Cb = gO, S) */
static void f_concat(double *out, double **in)
{
	for (int64_t n = 0; n < gN; n++) {
		memcpy(out + n * (gC + gO) * gS, in[0] + n * gC * gS, (size_t)(gC * gS) * sizeof(double));
		memcpy(out + n * (gC + gO) * gS + gC * gS, in[1] + n * gO * gS, (size_t)(gO * gS) * sizeof(double));
	}
}

/* nearest ×2 of (gA = N·C, H, W) */
static void f_up(double *out, double **in)
{
	for (int64_t p = 0; p < gA; p++)
		for (int64_t y = 0; y < 2 * gH; y++)
			for (int64_t x = 0; x < 2 * gW; x++) out[(p * 2 * gH + y) * 2 * gW + x] = in[0][(p * gH + y / 2) * gW + x / 2];
}

/* (N, C, S) → (N, S, C) */
static void f_nchw_to_nlc(double *out, double **in)
{
	for (int64_t n = 0; n < gN; n++)
		for (int64_t c = 0; c < gC; c++)
			for (int64_t s = 0; s < gS; s++) out[(n * gS + s) * gC + c] = in[0][(n * gC + c) * gS + s];
}
static void f_nlc_to_nchw(double *out, double **in)
{
	for (int64_t n = 0; n < gN; n++)
		for (int64_t c = 0; c < gC; c++)
			for (int64_t s = 0; s < gS; s++) out[(n * gC + c) * gS + s] = in[0][(n * gS + s) * gC + c];
}

static void f_mul(double *out, double **in)
{
	for (int64_t i = 0; i < grows; i++) out[i] = in[0][i] * in[1][i];
}

/* mean + exp(½·clamp(logvar, −30, 20))·eps; in: moments (N, 2C, S), eps (N, C, S) */
static void f_gauss(double *out, double **in)
{
	for (int64_t n = 0; n < gN; n++)
		for (int64_t c = 0; c < gC; c++)
			for (int64_t s = 0; s < gS; s++) {
				double mu = in[0][(n * 2 * gC + c) * gS + s], lv = in[0][(n * 2 * gC + gC + c) * gS + s];
				lv = fmin(fmax(lv, -30.0), 20.0);
				out[(n * gC + c) * gS + s] = mu + exp(0.5 * lv) * in[1][(n * gC + c) * gS + s];
			}
}

/* mean over samples of w[n]·mean((pred − target)²) (w = in[2] or NULL); one output */
static void f_mse(double *out, double **in)
{
	double L = 0;
	for (int64_t n = 0; n < gN; n++) {
		double s = 0;
		for (int64_t i = 0; i < gS; i++) {
			double e = in[0][n * gS + i] - in[1][n * gS + i];
			s += e * e;
		}
		L += (in[2] ? in[2][n] : 1.0) * s / gS;
	}
	out[0] = L / gN;
}

/* ==== linear and LoRA ==== */

TEST(linear)
{
	grows = 6, gI = 5, gO = 4;
	sd_tensor *x = rnd(DIMS(2, 3, 5)), *w = rnd(DIMS(4, 5)), *b = rnd(DIMS(4)), *r = rnd(DIMS(2, 3, 4));
	sd_tensor *dx = like(x, 0), *dw = like(w, 0), *db = like(b, 0);
	double *in[3] = {dcopy(x), dcopy(w), dcopy(b)};
	float *gx = fd(f_linear, in, 0, N_(x), F(r), N_(r)), *gw = fd(f_linear, in, 1, N_(w), F(r), N_(r));
	float *gb = fd(f_linear, in, 2, N_(b), F(r), N_(r));
	printf("  dx:\n");
	CHECK_GRAD(dx, gx, sd_linear_backward(dx, NULL, NULL, r, NULL, w, acc));
	float *zw = preset(dw), *zb = preset(db);
	fill(dx, NAN);
	CHECK_OK(sd_linear_backward(NULL, dw, db, r, x, w, 0));
	check_added(dw, zw, gw, "dw");
	check_added(db, zb, gb, "db");
	CHECK(isnan(F(dx)[0])); /* dx NULL: untouched */
	for (int i = 0; i < 3; i++) free(in[i]);
	free(gx), free(gw), free(gb);
	FREE(x, w, b, r, dx, dw, db);
}

static void check_lora(int dropout, float p)
{
	int64_t rk = 3;
	grows = 6, gI = 7, gO = 5, gD = rk, gscale = 2.0;
	sd_tensor *x = rnd(DIMS(2, 3, 7)), *w = rnd(DIMS(5, 7)), *b = rnd(DIMS(5)), *A = rnd(DIMS(3, 7)),
	          *B = rnd(DIMS(5, 3)), *r = rnd(DIMS(2, 3, 5));
	sd_tensor *mask = dropout ? zeros(DIMS(2, 3, 7)) : NULL;
	if (mask) CHECK_OK(sd_dropout_mask(mask, p, 1234, sd_dropout_stream(7, 3, 0)));
	sd_lora_layer l = {A, B, (float)gscale, p};
	/* the training forward against the double one; ax longer than needed (a view of its start) */
	sd_tensor *out = nans(DIMS(2, 3, 5)), *ax = nans(DIMS(40));
	CHECK_OK(sd_lora_linear_forward_train(out, ax, x, w, b, &l, mask));
	double *in[6] = {dcopy(x), dcopy(A), dcopy(B), dcopy(w), dcopy(b), mask ? dcopy(mask) : NULL};
	double *want = malloc((size_t)N_(out) * sizeof(double));
	f_lora(want, in);
	float *wantf = malloc((size_t)N_(out) * sizeof(float));
	for (int64_t i = 0; i < N_(out); i++) wantf[i] = (float)want[i];
	printf("  forward (dropout %d, p %.2f):\n", dropout, p);
	CHECK_CLOSE(F(out), wantf, N_(out), 1e-5);
	float *gx = fd(f_lora, in, 0, N_(x), F(r), N_(r)), *gA = fd(f_lora, in, 1, N_(A), F(r), N_(r));
	float *gB = fd(f_lora, in, 2, N_(B), F(r), N_(r));
	sd_tensor *dx = like(x, 0), *dA = like(A, 0), *dB = like(B, 0);
	printf("  dx:\n");
	CHECK_GRAD(dx, gx, sd_lora_linear_backward(dx, NULL, NULL, r, x, w, &l, ax, mask, acc));
	float *zA = preset(dA), *zB = preset(dB);
	CHECK_OK(sd_lora_linear_backward(NULL, dA, dB, r, x, w, &l, ax, mask, 0));
	check_added(dA, zA, gA, "dA");
	check_added(dB, zB, gB, "dB");
	/* all three in one call */
	zA = preset(dA), zB = preset(dB);
	fill(dx, NAN);
	CHECK_OK(sd_lora_linear_backward(dx, dA, dB, r, x, w, &l, ax, mask, 0));
	printf("  dx, dA, dB together:\n");
	CHECK_CLOSE(F(dx), gx, N_(dx), TOL);
	check_added(dA, zA, gA, "dA");
	check_added(dB, zB, gB, "dB");
	for (int i = 0; i < 6; i++) free(in[i]);
	free(want), free(wantf), free(gx), free(gA), free(gB);
	FREE(x, w, b, A, B, r, mask, out, ax, dx, dA, dB);
}

TEST(lora)
{
	check_lora(0, 0.0f);
	check_lora(1, 0.3f);
	/* a frozen linear (no adapter): only dx */
	sd_tensor *x = rnd(DIMS(4, 3)), *w = rnd(DIMS(2, 3)), *r = rnd(DIMS(4, 2)), *dx = nans(DIMS(4, 3)),
	          *dx2 = nans(DIMS(4, 3));
	CHECK_OK(sd_lora_linear_backward(dx, NULL, NULL, r, x, w, NULL, NULL, NULL, 0));
	CHECK_OK(sd_linear_backward(dx2, NULL, NULL, r, NULL, w, 0));
	CHECK(!memcmp(dx->data, dx2->data, sd_tensor_nbytes(dx)));
	FREE(x, w, r, dx, dx2);
}

TEST(dropout_mask)
{
	int64_t n = 100000;
	sd_tensor *m = nans(DIMS(n)), *m2 = nans(DIMS(n)), *m3 = nans(DIMS(n));
	float p = 0.05f, keepv = 1.0f / (float)(1.0 - (double)p);
	CHECK_OK(sd_dropout_mask(m, p, 42, sd_dropout_stream(1, 2, 0)));
	CHECK_OK(sd_dropout_mask(m2, p, 42, sd_dropout_stream(1, 2, 0)));
	CHECK_OK(sd_dropout_mask(m3, p, 42, sd_dropout_stream(1, 3, 0)));
	int64_t kept = 0, bad = 0, same3 = 0;
	for (int64_t i = 0; i < n; i++) {
		kept += F(m)[i] != 0.0f;
		bad += F(m)[i] != 0.0f && F(m)[i] != keepv;
		same3 += F(m)[i] == F(m3)[i];
	}
	double frac = (double)kept / n;
	printf("  kept %.4f (expected %.2f), other stream agrees on %.3f\n", frac, 1 - p, (double)same3 / n);
	CHECK(fabs(frac - (1 - p)) < 0.005);
	CHECK(bad == 0);
	CHECK(!memcmp(m->data, m2->data, sd_tensor_nbytes(m)));
	CHECK(same3 < n * 0.95); /* independent masks agree on ≈ 0.95² + 0.05² ≈ 0.905 */
	/* p = 0 keeps everything with value 1 */
	CHECK_OK(sd_dropout_mask(m, 0.0f, 1, 1));
	int ones = 1;
	for (int64_t i = 0; i < n; i++) ones &= F(m)[i] == 1.0f;
	CHECK(ones);
	CHECK(sd_dropout_mask(m, 1.0f, 1, 1) == -1);
	CHECK(sd_dropout_stream(1, 2, 0) != sd_dropout_stream(2, 2, 0) && sd_dropout_stream(1, 2, 0) != sd_dropout_stream(1, 2, 1));
	FREE(m, m2, m3);
}

/* ==== convolution ==== */

static void check_conv(int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, int64_t k, int stride, int pt, int pb,
                       int pl, int pr)
{
	gN = N, gC = C, gH = H, gW = W, gO = O, gkh = gkw = k, gstride = stride, gpt = pt, gpb = pb, gpl = pl, gpr = pr;
	int64_t Ho = (H + pt + pb - k) / stride + 1, Wo = (W + pl + pr - k) / stride + 1;
	sd_tensor *x = rnd(DIMS(N, C, H, W)), *w = rnd(DIMS(O, C, k, k)), *r = rnd(DIMS(N, O, Ho, Wo)), *dx = like(x, 0);
	double *in[2] = {dcopy(x), dcopy(w)};
	float *gx = fd(f_conv, in, 0, N_(x), F(r), N_(r));
	printf("  %lldx%lld stride %d pad (%d,%d,%d,%d), x (%lld,%lld,%lld,%lld) -> %lld channels:\n", (long long)k,
	       (long long)k, stride, pt, pb, pl, pr, (long long)N, (long long)C, (long long)H, (long long)W, (long long)O);
	CHECK_GRAD(dx, gx, sd_conv2d_backward(dx, r, w, stride, pt, pb, pl, pr, acc));
	free(in[0]), free(in[1]), free(gx);
	FREE(x, w, r, dx);
}

TEST(conv2d)
{
	check_conv(2, 3, 6, 5, 4, 3, 1, 1, 1, 1, 1); /* the ResNet conv */
	check_conv(2, 3, 7, 6, 4, 3, 2, 1, 1, 1, 1); /* UNet downsampler (odd size) */
	check_conv(1, 3, 8, 6, 2, 3, 2, 0, 1, 0, 1); /* VAE downsampler: pad (0,1,0,1) */
	check_conv(2, 5, 4, 3, 3, 1, 1, 0, 0, 0, 0); /* 1×1 (shortcut, proj_in) */
	check_conv(1, 2, 5, 5, 3, 3, 1, 0, 0, 0, 0); /* no padding */
	check_conv(1, 2, 4, 4, 2, 3, 1, 3, 3, 3, 3); /* padding past the kernel (the general path) */
}

/* ==== normalisation ==== */

static void check_group_norm(int silu)
{
	gN = 2, gC = 6, ggroups = 3, gS = 10, geps = 1e-5, gsilu = silu;
	sd_tensor *x = rnd(DIMS(2, 6, 2, 5)), *ga = rnd(DIMS(6)), *be = rnd(DIMS(6)), *r = rnd(DIMS(2, 6, 2, 5));
	for (int64_t i = 0; i < N_(x); i++) F(x)[i] = 2 * F(x)[i] + 0.5f; /* a mean and a variance that are not 0, 1 */
	double *in[3] = {dcopy(x), dcopy(ga), dcopy(be)};
	float *gx = fd(f_group_norm, in, 0, N_(x), F(r), N_(r)), *gg = fd(f_group_norm, in, 1, 6, F(r), N_(r));
	float *gb = fd(f_group_norm, in, 2, 6, F(r), N_(r));
	sd_tensor *dx = like(x, 0), *dg = like(ga, 0), *db = like(be, 0);
	printf("  silu %d, dx:\n", silu);
	CHECK_GRAD(dx, gx, sd_group_norm_backward(dx, NULL, NULL, r, x, 3, ga, be, 1e-5f, silu, acc));
	float *zg = preset(dg), *zb = preset(db);
	CHECK_OK(sd_group_norm_backward(dx, dg, db, r, x, 3, ga, be, 1e-5f, silu, 0));
	check_added(dg, zg, gg, "dgamma");
	check_added(db, zb, gb, "dbeta");
	for (int i = 0; i < 3; i++) free(in[i]);
	free(gx), free(gg), free(gb);
	FREE(x, ga, be, r, dx, dg, db);
}

TEST(group_norm)
{
	check_group_norm(0);
	check_group_norm(1);
	/* without gamma/beta = gamma 1, beta 0 */
	gN = 1, gC = 4, ggroups = 2, gS = 6, geps = 1e-6, gsilu = 1;
	sd_tensor *x = rnd(DIMS(1, 4, 6)), *r = rnd(DIMS(1, 4, 6)), *dx = like(x, 0);
	double one[4] = {1, 1, 1, 1}, zero4[4] = {0};
	double *in[3] = {dcopy(x), one, zero4};
	float *gx = fd(f_group_norm, in, 0, N_(x), F(r), N_(r));
	printf("  no affine, silu, eps 1e-6:\n");
	CHECK_GRAD(dx, gx, sd_group_norm_backward(dx, NULL, NULL, r, x, 2, NULL, NULL, 1e-6f, 1, acc));
	free(in[0]), free(gx);
	FREE(x, r, dx);
}

TEST(layer_norm)
{
	grows = 6, gD = 9, geps = 1e-5;
	sd_tensor *x = rnd(DIMS(2, 3, 9)), *ga = rnd(DIMS(9)), *be = rnd(DIMS(9)), *r = rnd(DIMS(2, 3, 9));
	double *in[3] = {dcopy(x), dcopy(ga), dcopy(be)};
	float *gx = fd(f_layer_norm, in, 0, N_(x), F(r), N_(r)), *gg = fd(f_layer_norm, in, 1, 9, F(r), N_(r));
	float *gb = fd(f_layer_norm, in, 2, 9, F(r), N_(r));
	sd_tensor *dx = like(x, 0), *dg = like(ga, 0), *db = like(be, 0);
	printf("  dx:\n");
	CHECK_GRAD(dx, gx, sd_layer_norm_backward(dx, NULL, NULL, r, x, ga, 1e-5f, acc));
	float *zg = preset(dg), *zb = preset(db);
	CHECK_OK(sd_layer_norm_backward(dx, dg, db, r, x, ga, 1e-5f, 0));
	check_added(dg, zg, gg, "dgamma");
	check_added(db, zb, gb, "dbeta");
	for (int i = 0; i < 3; i++) free(in[i]);
	free(gx), free(gg), free(gb);
	FREE(x, ga, be, r, dx, dg, db);
}

/* ==== elementwise ==== */

TEST(act)
{
	static const char *names[] = {"silu", "gelu", "gelu_tanh", "quick_gelu"};
	for (int a = 0; a < SD_ACT_COUNT; a++) {
		grows = 60, gact = a;
		sd_tensor *x = rnd(DIMS(3, 20)), *r = rnd(DIMS(3, 20)), *dx = like(x, 0);
		for (int64_t i = 0; i < N_(x); i++) F(x)[i] *= 4; /* [-4, 4]: both tails */
		double *in[1] = {dcopy(x)};
		float *gx = fd(f_act, in, 0, N_(x), F(r), N_(r));
		printf("  %s:\n", names[a]);
		CHECK_GRAD(dx, gx, sd_act_backward(dx, r, x, (enum sd_act)a, acc));
		free(in[0]), free(gx);
		FREE(x, r, dx);
	}
}

TEST(geglu)
{
	grows = 6, gD = 5;
	sd_tensor *x = rnd(DIMS(2, 3, 10)), *r = rnd(DIMS(2, 3, 5)), *dx = like(x, 0);
	for (int64_t i = 0; i < N_(x); i++) F(x)[i] *= 3;
	double *in[1] = {dcopy(x)};
	float *gx = fd(f_geglu, in, 0, N_(x), F(r), N_(r));
	CHECK_GRAD(dx, gx, sd_geglu_backward(dx, r, x, acc));
	free(in[0]), free(gx);
	FREE(x, r, dx);
}

TEST(softmax)
{
	grows = 4, gD = 7;
	sd_tensor *x = rnd(DIMS(4, 7)), *y = zeros(DIMS(4, 7)), *r = rnd(DIMS(4, 7)), *dx = like(x, 0);
	for (int64_t i = 0; i < N_(x); i++) F(x)[i] *= 3;
	CHECK_OK(sd_softmax(y, x));
	double *in[1] = {dcopy(x)};
	float *gx = fd(f_softmax, in, 0, N_(x), F(r), N_(r));
	CHECK_GRAD(dx, gx, sd_softmax_backward(dx, r, y, acc));
	/* in place (dx = dy) */
	sd_tensor *d2 = zeros(DIMS(4, 7));
	memcpy(d2->data, r->data, sd_tensor_nbytes(r));
	CHECK_OK(sd_softmax_backward(d2, d2, y, 0));
	printf("  in place:\n");
	CHECK_CLOSE(F(d2), gx, N_(d2), TOL);
	CHECK(sd_softmax_backward(d2, d2, y, 1) == -1);
	free(in[0]), free(gx);
	FREE(x, y, r, dx, d2);
}

TEST(add)
{
	/* same shape; trailing (b (3, 5) onto a (2, 3, 5)); (N, C) over space (b (2, 3) onto a (2, 3, 4, 2)) */
	struct { int64_t as[4]; int an; int64_t bs[4]; int bn; int64_t A, m, S; } cs[] = {
		{{2, 3, 5}, 3, {2, 3, 5}, 3, 1, 30, 1},
		{{2, 3, 5}, 3, {3, 5}, 2, 2, 15, 1},
		{{2, 3, 4, 2}, 4, {2, 3}, 2, 1, 6, 8},
	};
	for (int c = 0; c < 3; c++) {
		gA = cs[c].A, gm = cs[c].m, gS = cs[c].S, galpha = 0.75, gbeta = -1.5;
		sd_tensor *a = rnd(cs[c].an, cs[c].as), *b = rnd(cs[c].bn, cs[c].bs), *r = rnd(cs[c].an, cs[c].as);
		sd_tensor *da = like(a, 0), *db = like(b, 0);
		double *in[2] = {dcopy(a), dcopy(b)};
		float *ga = fd(f_add, in, 0, N_(a), F(r), N_(r)), *gb = fd(f_add, in, 1, N_(b), F(r), N_(r));
		printf("  case %d: da:\n", c);
		CHECK_GRAD(da, ga, sd_add_backward(da, NULL, r, 0.75f, -1.5f, acc));
		printf("  case %d: db:\n", c);
		CHECK_GRAD(db, gb, sd_add_backward(NULL, db, r, 0.75f, -1.5f, acc));
		free(in[0]), free(in[1]), free(ga), free(gb);
		FREE(a, b, r, da, db);
	}
}

TEST(mul)
{
	grows = 24;
	sd_tensor *a = rnd(DIMS(2, 3, 4)), *b = rnd(DIMS(2, 3, 4)), *r = rnd(DIMS(2, 3, 4)), *da = like(a, 0),
	          *db = like(b, 0);
	double *in[2] = {dcopy(a), dcopy(b)};
	float *ga = fd(f_mul, in, 0, N_(a), F(r), N_(r)), *gb = fd(f_mul, in, 1, N_(b), F(r), N_(r));
	CHECK_GRAD(da, ga, sd_mul_backward(da, NULL, r, NULL, b, acc));
	CHECK_GRAD(db, gb, sd_mul_backward(NULL, db, r, a, NULL, acc));
	free(in[0]), free(in[1]), free(ga), free(gb);
	FREE(a, b, r, da, db);
}

/* ==== attention ==== */

static void check_attention(int64_t N, int H, int64_t Lq, int64_t Lk, int64_t d, int64_t dv, int causal, int use_probs)
{
	gN = N, gheads = H, gLq = Lq, gLk = Lk, gd = d, gdv = dv, gcausal = causal, gscale = 1.0 / sqrt((double)d);
	sd_tensor *q = rnd(DIMS(N, Lq, H * d)), *k = rnd(DIMS(N, Lk, H * d)), *v = rnd(DIMS(N, Lk, H * dv));
	sd_tensor *r = rnd(DIMS(N, Lq, H * dv)), *out = nans(DIMS(N, Lq, H * dv));
	sd_tensor *P = use_probs ? nans(DIMS(N, H, Lq, Lk)) : NULL;
	for (int64_t i = 0; i < N_(q); i++) F(q)[i] *= 2;
	CHECK_OK(sd_attention(out, q, k, v, H, (float)gscale, causal, P));
	double *in[3] = {dcopy(q), dcopy(k), dcopy(v)};
	float *gq = fd(f_attention, in, 0, N_(q), F(r), N_(r)), *gk = fd(f_attention, in, 1, N_(k), F(r), N_(r));
	float *gv = fd(f_attention, in, 2, N_(v), F(r), N_(r));
	sd_tensor *dq = like(q, 0), *dk = like(k, 0), *dv_ = like(v, 0);
	printf("  N %lld H %d Lq %lld Lk %lld d %lld dv %lld causal %d probs %s:\n", (long long)N, H, (long long)Lq,
	       (long long)Lk, (long long)d, (long long)dv, causal, use_probs ? "kept" : "recomputed");
	CHECK_GRAD(dq, gq, sd_attention_backward(dq, NULL, NULL, r, q, k, v, P, H, (float)gscale, causal, acc));
	CHECK_GRAD(dk, gk, sd_attention_backward(NULL, dk, NULL, r, q, k, v, P, H, (float)gscale, causal, acc));
	CHECK_GRAD(dv_, gv, sd_attention_backward(NULL, NULL, dv_, r, q, k, v, P, H, (float)gscale, causal, acc));
	/* all three at once */
	fill(dq, NAN), fill(dk, NAN), fill(dv_, NAN);
	CHECK_OK(sd_attention_backward(dq, dk, dv_, r, q, k, v, P, H, (float)gscale, causal, 0));
	CHECK_CLOSE(F(dq), gq, N_(dq), TOL);
	CHECK_CLOSE(F(dk), gk, N_(dk), TOL);
	CHECK_CLOSE(F(dv_), gv, N_(dv_), TOL);
	for (int i = 0; i < 3; i++) free(in[i]);
	free(gq), free(gk), free(gv);
	FREE(q, k, v, r, out, P, dq, dk, dv_);
}

TEST(attention)
{
	check_attention(2, 2, 5, 5, 3, 3, 1, 1);  /* CLIP: causal self-attention */
	check_attention(2, 2, 5, 5, 3, 3, 1, 0);
	check_attention(2, 2, 4, 7, 3, 2, 0, 1);  /* cross-attention: Lq ≠ Lk, dv ≠ d */
	check_attention(1, 3, 6, 4, 2, 4, 0, 0);
	check_attention(1, 1, 9, 9, 4, 4, 0, 1);  /* VAE mid-block: one head */
}

/*
 * Several row blocks (Lq past the block of 8M scores / (H·Lk)), causal, checked against the gradient
 * formulas in double (FD would be too slow at this size): with P the softmax, dP = dO·Vᵀ,
 * dS = scale·P⊙(dP − Σ dP⊙P): dq = dS·K, dk = dSᵀ·Q, dv = Pᵀ·dO.
 */
TEST(attention_blocks)
{
	int64_t Lq = 2100, Lk = 4096, d = 2;
	double scale = 0.7;
	sd_tensor *q = rnd(DIMS(1, Lq, d)), *k = rnd(DIMS(1, Lk, d)), *v = rnd(DIMS(1, Lk, d)), *r = rnd(DIMS(1, Lq, d));
	sd_tensor *dq = nans(DIMS(1, Lq, d)), *dk = nans(DIMS(1, Lk, d)), *dv = nans(DIMS(1, Lk, d));
	CHECK_OK(sd_attention_backward(dq, dk, dv, r, q, k, v, NULL, 1, (float)scale, 1, 0));
	double *rq = calloc(Lq * d, sizeof(double)), *rk = calloc(Lk * d, sizeof(double)), *rv = calloc(Lk * d, sizeof(double));
	double *p = malloc(Lk * sizeof(double)), *dp = malloc(Lk * sizeof(double));
	for (int64_t i = 0; i < Lq; i++) {
		double mx = -INFINITY, sum = 0, dot = 0;
		int64_t lim = i + 1;
		for (int64_t j = 0; j < lim; j++) {
			p[j] = scale * ((double)F(q)[i * d] * F(k)[j * d] + (double)F(q)[i * d + 1] * F(k)[j * d + 1]);
			mx = fmax(mx, p[j]);
		}
		for (int64_t j = 0; j < lim; j++) sum += p[j] = exp(p[j] - mx);
		for (int64_t j = 0; j < lim; j++) {
			p[j] /= sum;
			dp[j] = (double)F(r)[i * d] * F(v)[j * d] + (double)F(r)[i * d + 1] * F(v)[j * d + 1];
			dot += dp[j] * p[j];
		}
		for (int64_t j = 0; j < lim; j++) {
			double ds = scale * p[j] * (dp[j] - dot);
			for (int c = 0; c < 2; c++) {
				rq[i * d + c] += ds * F(k)[j * d + c];
				rk[j * d + c] += ds * F(q)[i * d + c];
				rv[j * d + c] += p[j] * F(r)[i * d + c];
			}
		}
	}
	float *fq = malloc(Lq * d * sizeof(float)), *fk = malloc(Lk * d * sizeof(float)), *fv = malloc(Lk * d * sizeof(float));
	for (int64_t i = 0; i < Lq * d; i++) fq[i] = (float)rq[i];
	for (int64_t i = 0; i < Lk * d; i++) fk[i] = (float)rk[i], fv[i] = (float)rv[i];
	CHECK_CLOSE(F(dq), fq, Lq * d, TOL);
	CHECK_CLOSE(F(dk), fk, Lk * d, TOL);
	CHECK_CLOSE(F(dv), fv, Lk * d, TOL);
	free(rq), free(rk), free(rv), free(p), free(dp), free(fq), free(fk), free(fv);
	FREE(q, k, v, r, dq, dk, dv);
}

/* ==== layout ==== */

TEST(layout)
{
	gN = 2, gC = 3, gS = 20;
	sd_tensor *x = rnd(DIMS(2, 3, 4, 5)), *r = rnd(DIMS(2, 20, 3)), *dx = like(x, 0);
	double *in[1] = {dcopy(x)};
	float *g = fd(f_nchw_to_nlc, in, 0, N_(x), F(r), N_(r));
	printf("  nchw_to_nlc:\n");
	CHECK_GRAD(dx, g, sd_nchw_to_nlc_backward(dx, r, acc));
	free(in[0]), free(g);
	sd_tensor *y = rnd(DIMS(2, 20, 3)), *r2 = rnd(DIMS(2, 3, 4, 5)), *dy = like(y, 0);
	double *in2[1] = {dcopy(y)};
	g = fd(f_nlc_to_nchw, in2, 0, N_(y), F(r2), N_(r2));
	printf("  nlc_to_nchw:\n");
	CHECK_GRAD(dy, g, sd_nlc_to_nchw_backward(dy, r2, acc));
	free(in2[0]), free(g);
	FREE(x, r, dx, y, r2, dy);
}

TEST(upsample2x)
{
	gA = 6, gH = 3, gW = 4;
	sd_tensor *x = rnd(DIMS(2, 3, 3, 4)), *r = rnd(DIMS(2, 3, 6, 8)), *dx = like(x, 0);
	double *in[1] = {dcopy(x)};
	float *g = fd(f_up, in, 0, N_(x), F(r), N_(r));
	CHECK_GRAD(dx, g, sd_upsample2x_backward(dx, r, acc));
	free(in[0]), free(g);
	FREE(x, r, dx);
}

TEST(concat1)
{
	gN = 2, gC = 3, gO = 2, gS = 6;
	sd_tensor *a = rnd(DIMS(2, 3, 2, 3)), *b = rnd(DIMS(2, 2, 2, 3)), *r = rnd(DIMS(2, 5, 2, 3));
	sd_tensor *da = like(a, 0), *db = like(b, 0);
	double *in[2] = {dcopy(a), dcopy(b)};
	float *ga = fd(f_concat, in, 0, N_(a), F(r), N_(r)), *gb = fd(f_concat, in, 1, N_(b), F(r), N_(r));
	CHECK_GRAD(da, ga, sd_concat1_backward(da, NULL, r, acc));
	CHECK_GRAD(db, gb, sd_concat1_backward(NULL, db, r, acc));
	fill(da, NAN), fill(db, NAN);
	CHECK_OK(sd_concat1_backward(da, db, r, 0));
	CHECK_CLOSE(F(da), ga, N_(da), TOL);
	CHECK_CLOSE(F(db), gb, N_(db), TOL);
	sd_tensor *bad = zeros(DIMS(2, 3, 2, 3));
	CHECK(sd_concat1_backward(da, bad, r, 0) == -1); /* 3 + 3 ≠ 5 */
	free(in[0]), free(in[1]), free(ga), free(gb);
	FREE(a, b, r, da, db, bad);
}

TEST(gaussian_sample)
{
	gN = 2, gC = 2, gS = 6;
	sd_tensor *mom = rnd(DIMS(2, 4, 2, 3)), *eps = rnd(DIMS(2, 2, 2, 3)), *r = rnd(DIMS(2, 2, 2, 3));
	/* two logvars beyond the clamp: no gradient there */
	F(mom)[2 * 6 + 1] = 25.0f;
	F(mom)[4 * 6 + 3 * 6 + 2] = -35.0f;
	sd_tensor *dm = like(mom, 0);
	double *in[2] = {dcopy(mom), dcopy(eps)};
	float *g = fd(f_gauss, in, 0, N_(mom), F(r), N_(r));
	CHECK_GRAD(dm, g, sd_gaussian_sample_backward(dm, r, mom, eps, acc));
	fill(dm, NAN);
	CHECK_OK(sd_gaussian_sample_backward(dm, r, mom, eps, 0));
	CHECK(F(dm)[2 * 6 + 1] == 0.0f && F(dm)[4 * 6 + 3 * 6 + 2] == 0.0f);
	free(in[0]), free(in[1]), free(g);
	FREE(mom, eps, r, dm);
}

/* ==== loss ==== */

TEST(mse_loss)
{
	gN = 3, gS = 20;
	sd_tensor *p = rnd(DIMS(3, 4, 5)), *t = rnd(DIMS(3, 4, 5)), *dp = nans(DIMS(3, 4, 5));
	float one = 1.0f, w[3] = {0.5f, 2.0f, 1.25f};
	for (int weighted = 0; weighted < 2; weighted++) {
		double wd[3] = {w[0], w[1], w[2]};
		double *in[3] = {dcopy(p), dcopy(t), weighted ? wd : NULL}, want;
		f_mse(&want, in);
		float *g = fd(f_mse, in, 0, N_(p), &one, 1);
		double loss = 0;
		fill(dp, NAN);
		CHECK_OK(sd_mse_loss(&loss, dp, p, t, weighted ? w : NULL, 1.0f));
		printf("  weighted %d: loss %.9g, want %.9g (rel %.2g)\n", weighted, loss, want, fabs(loss - want) / want);
		CHECK(fabs(loss - want) <= 1e-7 * want);
		CHECK_CLOSE(F(dp), g, N_(dp), TOL);
		/* gscale multiplies the gradient only */
		CHECK_OK(sd_mse_loss(&loss, dp, p, t, weighted ? w : NULL, 0.25f));
		for (int64_t i = 0; i < N_(dp); i++) g[i] *= 0.25f;
		CHECK_CLOSE(F(dp), g, N_(dp), TOL);
		CHECK(fabs(loss - want) <= 1e-7 * want);
		free(in[0]), free(in[1]), free(g);
	}
	/* torch's unweighted gradient: (float)(2/numel)·(p − t), bit for bit */
	CHECK_OK(sd_mse_loss(NULL, dp, p, t, NULL, 1.0f));
	int exact = 1;
	for (int64_t i = 0; i < N_(p); i++) exact &= F(dp)[i] == (float)(2.0 / 60) * (F(p)[i] - F(t)[i]);
	CHECK(exact);
	sd_tensor *bad = zeros(DIMS(3, 4, 4));
	CHECK(sd_mse_loss(NULL, dp, p, bad, NULL, 1.0f) == -1);
	FREE(p, t, dp, bad);
}

TEST(noise_targets)
{
	float ac[1000];
	double prod = 1;
	for (int i = 0; i < 1000; i++) { /* scaled-linear betas 0.00085..0.012 */
		double b = pow(sqrt(0.00085) + (sqrt(0.012) - sqrt(0.00085)) * i / 999.0, 2);
		prod *= 1 - b;
		ac[i] = (float)prod;
	}
	int64_t ts[2] = {3, 981};
	sd_tensor *x0 = rnd(DIMS(2, 4, 3)), *e = rnd(DIMS(2, 4, 3)), *noisy = nans(DIMS(2, 4, 3)), *v = nans(DIMS(2, 4, 3));
	CHECK_OK(sd_train_add_noise(noisy, x0, e, ac, 1000, ts));
	CHECK_OK(sd_v_target(v, x0, e, ac, 1000, ts));
	int exact = 1;
	for (int n = 0; n < 2; n++) {
		float a = sqrtf(ac[ts[n]]), s = sqrtf(1.0f - ac[ts[n]]);
		for (int i = 0; i < 12; i++) {
			float xv = F(x0)[n * 12 + i], ev = F(e)[n * 12 + i];
			float wn = a * xv, wn2 = s * ev, wv = a * ev, wv2 = s * xv;
			exact &= F(noisy)[n * 12 + i] == wn + wn2 && F(v)[n * 12 + i] == wv - wv2;
		}
	}
	CHECK(exact);
	/* in place */
	CHECK_OK(sd_train_add_noise(x0, x0, e, ac, 1000, ts));
	CHECK(!memcmp(x0->data, noisy->data, sd_tensor_nbytes(x0)));
	int64_t badt[2] = {3, 1000};
	CHECK(sd_train_add_noise(noisy, x0, e, ac, 1000, badt) == -1);
	/* min-SNR-γ: snr = ᾱ/(1−ᾱ) */
	float w[2], wv[2];
	CHECK_OK(sd_min_snr_weights(w, ac, 1000, ts, 2, 5.0f, 0));
	CHECK_OK(sd_min_snr_weights(wv, ac, 1000, ts, 2, 5.0f, 1));
	for (int n = 0; n < 2; n++) {
		double snr = (double)ac[ts[n]] / (1 - (double)ac[ts[n]]);
		double want = fmin(snr, 5.0) / snr, wantv = fmin(snr, 5.0) / (snr + 1);
		printf("  t %lld: snr %.6g, weight %.7g (want %.7g), v %.7g (want %.7g)\n", (long long)ts[n], snr, w[n], want,
		       wv[n], wantv);
		CHECK(fabs(w[n] - want) <= 1e-5 * want && fabs(wv[n] - wantv) <= 1e-5 * wantv);
	}
	CHECK(w[0] < 1.0f && w[1] == 1.0f); /* t = 3 has snr > γ; t = 981 below */
	FREE(x0, e, noisy, v);
}

/* ==== optimizers ==== */

/* torch's single-tensor step in float, written out here independently of lib/train/optim.c */
static void ref_adam(float *p, const float *g, float *m, float *v, int n, int adamw, double lr, double b1, double b2,
                     double eps, double wd, int t)
{
	double bc1 = 1 - pow(b1, t), bc2 = 1 - pow(b2, t);
	float step = (float)(lr / bc1), bc2s = (float)sqrt(bc2);
	for (int i = 0; i < n; i++) {
		float pv = p[i], gv = g[i];
		if (adamw) pv *= (float)(1 - lr * wd);
		else if (wd != 0) gv = gv + (float)wd * pv;
		m[i] = m[i] * (float)b1 + (float)(1 - b1) * gv;      /* mul_, add_ */
		v[i] = v[i] * (float)b2 + (float)(1 - b2) * gv * gv; /* mul_, addcmul_ */
		float denom = sqrtf(v[i]) / bc2s + (float)eps;
		p[i] = pv - step * m[i] / denom;
	}
}

static void check_adam(enum sd_optim_kind kind, double wd)
{
	sd_optim_config c;
	sd_optim_defaults(&c, kind);
	c.lr = 1e-2, c.weight_decay = wd;
	sd_tensor *p0 = rnd(DIMS(3, 4)), *p1 = rnd(DIMS(5));
	sd_tensor *g0 = rnd(DIMS(3, 4)), *g1 = rnd(DIMS(5));
	float rp0[12], rp1[5], rm0[12] = {0}, rv0[12] = {0}, rm1[5] = {0}, rv1[5] = {0};
	memcpy(rp0, p0->data, sizeof rp0), memcpy(rp1, p1->data, sizeof rp1);
	sd_tensor *params[2] = {p0, p1};
	const char *names[2] = {"a.weight", "b.weight"};
	sd_optim *o = sd_optim_new(&c, 2, params, names);
	CHECK(o != NULL);
	if (!o) return;
	/* step 1: m = 0.1 g, v = 0.001 g², bias-corrected m̂ = g, v̂ = g²: p − lr·g/(|g| + eps) ≈ p − lr·sign(g) */
	const sd_tensor *grads[2] = {g0, g1};
	float before[12];
	memcpy(before, p0->data, sizeof before);
	CHECK_OK(sd_optim_step(o, grads));
	ref_adam(rp0, F(g0), rm0, rv0, 12, kind == SD_OPTIM_ADAMW, c.lr, c.beta1, c.beta2, c.eps, wd, 1);
	ref_adam(rp1, F(g1), rm1, rv1, 5, kind == SD_OPTIM_ADAMW, c.lr, c.beta1, c.beta2, c.eps, wd, 1);
	printf("  %s wd %g, step 1:\n", sd_optim_name(kind), wd);
	CHECK_CLOSE(F(p0), rp0, 12, 1e-6);
	CHECK_CLOSE(F(p1), rp1, 5, 1e-6);
	CHECK_CLOSE(F(sd_optim_exp_avg(o, 0)), rm0, 12, 1e-6);
	CHECK_CLOSE(F(sd_optim_exp_avg_sq(o, 0)), rv0, 12, 1e-6);
	if (wd == 0) {
		double maxd = 0;
		for (int i = 0; i < 12; i++) maxd = fmax(maxd, fabs(F(p0)[i] - (before[i] - c.lr * (F(g0)[i] > 0 ? 1 : -1))));
		printf("  step 1 = p − lr·sign(g) within %.2g\n", maxd);
		CHECK(maxd < 1e-7);
	}
	/* step 2: a new gradient; parameter 1 without one (skipped: its state and step stay) */
	for (int i = 0; i < 12; i++) F(g0)[i] = urand();
	float keep1[5];
	memcpy(keep1, p1->data, sizeof keep1);
	const sd_tensor *grads2[2] = {g0, NULL};
	CHECK_OK(sd_optim_step(o, grads2));
	ref_adam(rp0, F(g0), rm0, rv0, 12, kind == SD_OPTIM_ADAMW, c.lr, c.beta1, c.beta2, c.eps, wd, 2);
	printf("  step 2 (bias correction t = 2):\n");
	CHECK_CLOSE(F(p0), rp0, 12, 1e-6);
	CHECK_CLOSE(F(sd_optim_exp_avg(o, 0)), rm0, 12, 1e-6);
	CHECK_CLOSE(F(sd_optim_exp_avg_sq(o, 0)), rv0, 12, 1e-6);
	CHECK(!memcmp(keep1, p1->data, sizeof keep1));
	CHECK(sd_optim_steps(o, 0) == 2 && sd_optim_steps(o, 1) == 1);
	sd_optim_free(o);
	FREE(p0, p1, g0, g1);
}

TEST(adam)
{
	check_adam(SD_OPTIM_ADAM, 0.0);   /* the study's optimizer */
	check_adam(SD_OPTIM_ADAM, 0.1);   /* L2 added to the gradient */
	check_adam(SD_OPTIM_ADAMW, 1e-2); /* decoupled decay */
	check_adam(SD_OPTIM_ADAMW, 0.0);
	enum sd_optim_kind k;
	CHECK(sd_optim_parse("AdamW", &k) == 0 && k == SD_OPTIM_ADAMW);
	CHECK(sd_optim_parse("sgd", &k) == -1 && strstr(sd_errmsg(), "sgd"));
}

static const char *fixture(const char *rel, char *buf, size_t n)
{
	const char *roots[2] = {getenv("SD_FIXTURES"), getenv("SHARED")};
	if (!roots[0] || !*roots[0]) roots[0] = "tests/fixtures";
	for (int i = 0; i < 2; i++) {
		if (!roots[i] || !*roots[i]) continue;
		snprintf(buf, n, "%s/%s", roots[i], rel);
		if (access(buf, R_OK) == 0) return buf;
	}
	snprintf(buf, n, "../shared/fixtures/%s", rel);
	return access(buf, R_OK) == 0 ? buf : NULL;
}

/* torch.optim.AdamW's own numbers: param0 + grad → param1, adam_exp_avg1, adam_exp_avg_sq1; then
 * grad_step2 → param2 (the LoRA parameters of the tiny model's training steps; in the VAE-LoRA file
 * the decoder-side adapters have no gradient and must stay untouched). */
static void check_adamw_golden(const char *path)
{
	sd_st *f = sd_st_open(path);
	CHECK(f != NULL);
	if (!f) return;
	int n = 0, nograd = 0;
	sd_tensor *params[512];
	char *names[512];
	const sd_tensor *g1[512], *g2[512];
	for (int i = 0; i < sd_st_count(f) && n < 512; i++) {
		const char *nm = sd_st_name(f, i);
		if (strncmp(nm, "param0.", 7)) continue;
		char key[600];
		snprintf(key, sizeof key, "grad.%s", nm + 7);
		int gi = sd_st_find(f, key);
		snprintf(key, sizeof key, "grad_step2.%s", nm + 7);
		int gi2 = sd_st_find(f, key);
		params[n] = sd_tensor_convert(sd_st_tensor(f, i), SD_DTYPE_F32);
		names[n] = strdup(nm + 7);
		g1[n] = gi >= 0 ? sd_st_tensor(f, gi) : NULL, g2[n] = gi2 >= 0 ? sd_st_tensor(f, gi2) : NULL;
		nograd += gi < 0;
		n++;
	}
	CHECK(n > 0);
	sd_optim_config c;
	sd_optim_defaults(&c, SD_OPTIM_ADAMW);
	c.lr = 1e-4;
	sd_optim *o = sd_optim_new(&c, n, params, (const char *const *)names);
	CHECK(o != NULL);
	if (!o) goto out;
	double worst[4] = {0};
	int missing = 0;
	CHECK_OK(sd_optim_step(o, g1));
	for (int step = 1; step <= 2; step++) {
		for (int i = 0; i < n; i++) {
			char key[600];
			const char *what[3] = {step == 1 ? "param1" : "param2", "adam_exp_avg1", "adam_exp_avg_sq1"};
			const sd_tensor *mine[3] = {params[i], sd_optim_exp_avg(o, i), sd_optim_exp_avg_sq(o, i)};
			for (int j = 0; j < (step == 1 ? 3 : 1); j++) {
				snprintf(key, sizeof key, "%s.%s", what[j], names[i]);
				int gi = sd_st_find(f, key);
				if (gi < 0) {
					missing += j == 0; /* no state is kept for a parameter without gradient */
					continue;
				}
				const sd_tensor *want = sd_st_tensor(f, gi);
				double md = 0, mr = 0;
				for (int64_t e = 0; e < N_(want); e++) {
					md = fmax(md, fabs((double)F(mine[j])[e] - F(want)[e]));
					mr = fmax(mr, fabs(F(want)[e]));
				}
				/* params: relative to the update's size (lr) rather than the value */
				double rel = j == 0 ? md / c.lr : md / (mr > 0 ? mr : 1);
				int w = step == 1 ? j : 3;
				worst[w] = fmax(worst[w], rel);
			}
		}
		if (step == 1) CHECK_OK(sd_optim_step(o, g2));
	}
	printf("  %s: %d parameters (%d without gradient): param1 max|diff|/lr %.3g, exp_avg1 rel %.3g, "
	       "exp_avg_sq1 rel %.3g, param2 max|diff|/lr %.3g\n",
	       strrchr(path, '/') + 1, n, nograd, worst[0], worst[1], worst[2], worst[3]);
	CHECK(missing == 0);
	CHECK(worst[0] == 0 && worst[1] == 0 && worst[2] == 0 && worst[3] == 0); /* bit for bit */
	sd_optim_free(o);
	/* clip_grad_norm_'s total norm over the step-1 gradients (grad_total_norm) */
	int gt = sd_st_find(f, "grad_total_norm");
	if (gt >= 0) {
		sd_tensor *gc[512];
		for (int i = 0; i < n; i++) gc[i] = g1[i] ? sd_tensor_convert(g1[i], SD_DTYPE_F32) : NULL;
		float tn = 0, want = F(sd_st_tensor(f, gt))[0];
		CHECK_OK(sd_clip_grad_norm(&tn, gc, n, 1e30f));
		printf("  grad_total_norm %.8g, want %.8g\n", tn, want);
		CHECK(fabs(tn - want) <= 1e-6 * want);
		for (int i = 0; i < n; i++) sd_tensor_free(gc[i]);
	}
out:
	for (int i = 0; i < n; i++) {
		sd_tensor_free(params[i]);
		free(names[i]);
	}
	sd_st_close(f);
}

TEST(adamw_golden)
{
	char path[1024];
	if (!fixture("golden/tiny/train_step.safetensors", path, sizeof path)) SKIP("train_step.safetensors not found");
	check_adamw_golden(path);
	if (fixture("golden/tiny/train_step_vae_lora.safetensors", path, sizeof path)) check_adamw_golden(path);
}

/* the training step's loss pieces against torch: noisy_latents = DDPMScheduler.add_noise(latents, noise,
 * timesteps) and loss = F.mse_loss(model_pred, noise) */
TEST(golden_noise_loss)
{
	char path[1024];
	if (!fixture("golden/tiny/train_step.safetensors", path, sizeof path)) SKIP("train_step.safetensors not found");
	sd_st *f = sd_st_open(path);
	sd_sched *sc = sd_sched_new(NULL, SD_SAMPLER_DDPM, 50, -1, 0.0);
	CHECK(f && sc);
	if (!f || !sc) {
		sd_st_close(f);
		sd_sched_free(sc);
		return;
	}
	int nt = 0;
	const float *ac = sd_sched_alphas_cumprod(sc, &nt);
	const sd_tensor *lat = sd_st_tensor(f, sd_st_find(f, "latents")), *noise = sd_st_tensor(f, sd_st_find(f, "noise"));
	const sd_tensor *want = sd_st_tensor(f, sd_st_find(f, "noisy_latents")), *ts = sd_st_tensor(f, sd_st_find(f, "timesteps"));
	const sd_tensor *pred = sd_st_tensor(f, sd_st_find(f, "model_pred")), *loss = sd_st_tensor(f, sd_st_find(f, "loss"));
	sd_tensor *noisy = nans(lat->ndim, lat->shape), *dp = nans(lat->ndim, lat->shape);
	CHECK_OK(sd_train_add_noise(noisy, lat, noise, ac, nt, ts->data));
	printf("  timesteps %lld %lld: noisy_latents\n", (long long)((int64_t *)ts->data)[0], (long long)((int64_t *)ts->data)[1]);
	CHECK_CLOSE(F(noisy), F(want), N_(noisy), 1e-7);
	double L = 0;
	CHECK_OK(sd_mse_loss(&L, dp, pred, noise, NULL, 1.0f));
	printf("  loss %.9g, torch %.9g (rel %.2g)\n", L, F(loss)[0], fabs(L - F(loss)[0]) / F(loss)[0]);
	CHECK(fabs(L - F(loss)[0]) <= 1e-6 * F(loss)[0]);
	FREE(noisy, dp);
	sd_sched_free(sc);
	sd_st_close(f);
}

TEST(clip_grad_norm)
{
	sd_tensor *a = rnd(DIMS(3, 4)), *b = rnd(DIMS(7));
	float a0[12], b0[7];
	memcpy(a0, a->data, sizeof a0), memcpy(b0, b->data, sizeof b0);
	double ss = 0;
	for (int i = 0; i < 12; i++) ss += (double)a0[i] * a0[i];
	for (int i = 0; i < 7; i++) ss += (double)b0[i] * b0[i];
	double total = sqrt(ss);
	sd_tensor *gs[3] = {a, NULL, b};
	float tn = 0;
	CHECK_OK(sd_clip_grad_norm(&tn, gs, 3, 0.5f));
	printf("  total norm %.7g (want %.7g)\n", tn, total);
	CHECK(fabs(tn - total) <= 1e-6 * total);
	float coef = 0.5f / ((float)total + 1e-6f), wa[12], wb[7];
	for (int i = 0; i < 12; i++) wa[i] = a0[i] * coef;
	for (int i = 0; i < 7; i++) wb[i] = b0[i] * coef;
	CHECK_CLOSE(F(a), wa, 12, 1e-6);
	CHECK_CLOSE(F(b), wb, 7, 1e-6);
	/* under the limit: unchanged */
	memcpy(a0, a->data, sizeof a0);
	CHECK_OK(sd_clip_grad_norm(&tn, gs, 3, 100.0f));
	CHECK(!memcmp(a0, a->data, sizeof a0));
	CHECK_OK(sd_grad_zero(gs, 3));
	CHECK(F(a)[5] == 0.0f && F(b)[6] == 0.0f);
	FREE(a, b);
}

TEST(optim_state)
{
	sd_optim_config c;
	sd_optim_defaults(&c, SD_OPTIM_ADAMW);
	sd_tensor *p = rnd(DIMS(2, 3)), *q = rnd(DIMS(4)), *g = rnd(DIMS(2, 3)), *h = rnd(DIMS(4));
	sd_tensor *params[2] = {p, q};
	const char *names[2] = {"unet.x.lora_A.weight", "unet.x.lora_B.weight"};
	sd_optim *o = sd_optim_new(&c, 2, params, names);
	const sd_tensor *grads[2] = {g, h}, *grads1[2] = {g, NULL};
	CHECK_OK(sd_optim_step(o, grads));
	CHECK_OK(sd_optim_step(o, grads1));
	const char *tmp = getenv("TMPDIR");
	char path[1024];
	snprintf(path, sizeof path, "%s/sd-optim-%d.safetensors", tmp && *tmp ? tmp : "/tmp", (int)getpid());
	CHECK_OK(sd_optim_save(o, path));
	sd_value *val = sd_optim_to_value(o);
	CHECK(val != NULL);
	/* restore into fresh optimizers over copies; one more step must give the same parameters */
	sd_tensor *p2 = sd_tensor_convert(p, SD_DTYPE_F32), *q2 = sd_tensor_convert(q, SD_DTYPE_F32);
	sd_tensor *p3 = sd_tensor_convert(p, SD_DTYPE_F32), *q3 = sd_tensor_convert(q, SD_DTYPE_F32);
	sd_tensor *pp2[2] = {p2, q2}, *pp3[2] = {p3, q3};
	sd_optim *o2 = sd_optim_new(&c, 2, pp2, names), *o3 = sd_optim_new(&c, 2, pp3, names);
	CHECK_OK(sd_optim_load(o2, path));
	CHECK_OK(sd_optim_from_value(o3, val));
	CHECK(sd_optim_steps(o2, 0) == 2 && sd_optim_steps(o2, 1) == 1 && sd_optim_steps(o3, 0) == 2 &&
	      sd_optim_steps(o3, 1) == 1);
	CHECK_OK(sd_optim_step(o, grads));
	CHECK_OK(sd_optim_step(o2, grads));
	CHECK_OK(sd_optim_step(o3, grads));
	CHECK(!memcmp(p->data, p2->data, 24) && !memcmp(q->data, q2->data, 16));
	CHECK(!memcmp(p->data, p3->data, 24) && !memcmp(q->data, q3->data, 16));
	CHECK(!memcmp(sd_optim_exp_avg_sq(o, 1)->data, sd_optim_exp_avg_sq(o2, 1)->data, 16));
	/* a mismatch: other names, or the other kind */
	const char *other[2] = {"unet.y.lora_A.weight", "unet.x.lora_B.weight"};
	sd_optim *o4 = sd_optim_new(&c, 2, pp3, other);
	CHECK(sd_optim_load(o4, path) == -1 && strstr(sd_errmsg(), "unet.x.lora_A.weight"));
	sd_optim_config ca;
	sd_optim_defaults(&ca, SD_OPTIM_ADAM);
	sd_optim *o5 = sd_optim_new(&ca, 2, pp3, names);
	CHECK(sd_optim_load(o5, path) == -1 && strstr(sd_errmsg(), "adamw"));
	CHECK(sd_optim_new(&c, 2, pp3, (const char *[]){"a", "a"}) == NULL && strstr(sd_errmsg(), "twice"));
	unlink(path);
	sd_value_free(val);
	sd_optim_free(o), sd_optim_free(o2), sd_optim_free(o3), sd_optim_free(o4), sd_optim_free(o5);
	sd_optim_free(NULL);
	FREE(p, q, g, h, p2, q2, p3, q3);
}

/* ==== errors ==== */

TEST(shape_errors)
{
	sd_tensor *x = rnd(DIMS(2, 3, 5)), *w = rnd(DIMS(4, 5)), *dy = rnd(DIMS(2, 3, 4)), *bad = zeros(DIMS(2, 3, 6));
	CHECK(sd_linear_backward(bad, NULL, NULL, dy, NULL, w, 0) == -1 && strstr(sd_errmsg(), "sd_linear_backward") &&
	      strstr(sd_errmsg(), "dx"));
	sd_tensor *img = zeros(DIMS(1, 2, 5, 5)), *cw = rnd(DIMS(3, 2, 3, 3)), *cdy = zeros(DIMS(1, 3, 4, 4));
	CHECK(sd_conv2d_backward(img, cdy, cw, 1, 1, 1, 1, 1, 0) == -1 && strstr(sd_errmsg(), "sd_conv2d_backward") &&
	      strstr(sd_errmsg(), "dy"));
	CHECK(sd_group_norm_backward(img, NULL, NULL, img, img, 3, NULL, NULL, 1e-5f, 0, 0) == -1 &&
	      strstr(sd_errmsg(), "groups"));
	sd_tensor *q = rnd(DIMS(1, 4, 6)), *dq = zeros(DIMS(1, 4, 6)), *dout = zeros(DIMS(1, 4, 5));
	CHECK(sd_attention_backward(dq, NULL, NULL, dout, q, q, q, NULL, 2, 1.0f, 0, 0) == -1 &&
	      strstr(sd_errmsg(), "dout"));
	sd_tensor *i32 = sd_tensor_new(SD_DTYPE_I32, 3, x->shape);
	CHECK(sd_act_backward(i32, x, x, SD_ACT_SILU, 0) == -1 && strstr(sd_errmsg(), "f32"));
	FREE(x, w, dy, bad, img, cw, cdy, q, dq, dout, i32);
}

int main(void)
{
	RUN(linear);
	RUN(lora);
	RUN(dropout_mask);
	RUN(conv2d);
	RUN(group_norm);
	RUN(layer_norm);
	RUN(act);
	RUN(geglu);
	RUN(softmax);
	RUN(add);
	RUN(mul);
	RUN(attention);
	RUN(attention_blocks);
	RUN(layout);
	RUN(upsample2x);
	RUN(concat1);
	RUN(gaussian_sample);
	RUN(mse_loss);
	RUN(noise_targets);
	RUN(adam);
	RUN(adamw_golden);
	RUN(golden_noise_loss);
	RUN(clip_grad_norm);
	RUN(optim_state);
	RUN(shape_errors);
	return test_summary();
}
