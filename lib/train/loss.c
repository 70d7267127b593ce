/*
 * train/loss.c - the training objective as diffusers' examples/text_to_image/train_text_to_image_lora.py
 * computes it: F.mse_loss(model_pred.float(), target.float(), reduction="mean"), or with --snr_gamma the
 * per-sample min-SNR-γ weights of compute_snr (training_utils.py); the target is the noise (epsilon) or
 * DDPMScheduler.get_velocity (v-prediction); noisy latents from DDPMScheduler.add_noise with integer
 * timesteps per sample.  Scalars follow torch's float32 arithmetic (alphas_cumprod is float32 there).
 */
#include <math.h>
#include <string.h>
#include "../backend.h"

int sd_mse_loss(double *loss, sd_tensor *dpred, const sd_tensor *pred, const sd_tensor *target, const float *weights,
                float gscale)
{
	static const char op[] = "sd_mse_loss";
	char s1[96], s2[96];
	if (pred->dtype != SD_DTYPE_F32 || target->dtype != SD_DTYPE_F32 || (dpred && dpred->dtype != SD_DTYPE_F32))
		return sd_seterr("%s: tensors must be f32", op);
	if (!sd_tensor_same_shape(pred, target) || (dpred && !sd_tensor_same_shape(pred, dpred)))
		return sd_seterr("%s: pred %s and target %s (and dpred) must have one shape", op,
		                 sd_shape_str(pred->ndim, pred->shape, s1, sizeof s1),
		                 sd_shape_str(target->ndim, target->shape, s2, sizeof s2));
	if (target->device != pred->device || (dpred && dpred->device != pred->device))
		return sd_seterr("%s: tensors on different devices", op);
	if (weights && pred->ndim < 1) return sd_seterr("%s: per-sample weights need a batch dimension", op);
	const struct sd_backend *be = sd_backend_get(pred->device);
	if (!be) return -1;
	if (be->device == SD_DEVICE_CPU) sd_threads_apply();
	if (!be->mse_loss) return sd_seterr("%s: not implemented on %s", op, be->name);
	int64_t numel = sd_tensor_numel(pred), N = weights ? pred->shape[0] : 1, per = N ? numel / N : 0;
	if (numel == 0) {
		if (loss) *loss = NAN; /* torch: the mean of nothing */
		return 0;
	}
	return be->mse_loss(loss, dpred ? dpred->data : NULL, pred->data, target->data, weights, N, per, gscale);
}

/* out_n = a·x_n + b·y_n per sample n, with (a, b) from f(ᾱ_t[n]) */
static int per_sample(const char *op, sd_tensor *out, const sd_tensor *x0, const sd_tensor *noise, const float *ac,
                      int nt, const int64_t *t, int velocity)
{
	const sd_tensor *ts[3] = {out, x0, noise};
	for (int i = 0; i < 3; i++)
		if (ts[i]->dtype != SD_DTYPE_F32 || ts[i]->device != x0->device || !sd_tensor_same_shape(ts[i], x0))
			return sd_seterr("%s: out, x0 and noise must be f32 of one shape on one device", op);
	if (x0->ndim < 1) return sd_seterr("%s: x0 needs a batch dimension", op);
	const struct sd_backend *be = sd_backend_get(x0->device);
	if (!be) return -1;
	if (be->device == SD_DEVICE_CPU) sd_threads_apply();
	if (!be->add) return sd_seterr("%s: not implemented on %s", op, be->name);
	int64_t N = x0->shape[0], per = N ? sd_tensor_numel(x0) / N : 0;
	for (int64_t n = 0; n < N; n++)
		if (t[n] < 0 || t[n] >= nt)
			return sd_seterr("%s: timestep %lld of sample %lld is outside [0, %d)", op, (long long)t[n], (long long)n, nt);
	for (int64_t n = 0; n < N; n++) {
		float a = sqrtf(ac[t[n]]), s = sqrtf(1.0f - ac[t[n]]);
		float *o = (float *)out->data + n * per;
		const float *x = (const float *)x0->data + n * per, *e = (const float *)noise->data + n * per;
		/* add_noise: a·x0 + s·noise;  get_velocity: a·noise − s·x0 */
		if (per && (velocity ? be->add(o, e, x, a, -s, per, per, 1) : be->add(o, x, e, a, s, per, per, 1))) return -1;
	}
	return 0;
}

int sd_train_add_noise(sd_tensor *noisy, const sd_tensor *x0, const sd_tensor *noise, const float *alphas_cumprod,
                       int nt, const int64_t *t)
{
	return per_sample("sd_train_add_noise", noisy, x0, noise, alphas_cumprod, nt, t, 0);
}

int sd_v_target(sd_tensor *v, const sd_tensor *x0, const sd_tensor *noise, const float *alphas_cumprod, int nt,
                const int64_t *t)
{
	return per_sample("sd_v_target", v, x0, noise, alphas_cumprod, nt, t, 1);
}

int sd_min_snr_weights(float *w, const float *ac, int nt, const int64_t *t, int n, float gamma, int v_prediction)
{
	for (int i = 0; i < n; i++)
		if (t[i] < 0 || t[i] >= nt)
			return sd_seterr("sd_min_snr_weights: timestep %lld is outside [0, %d)", (long long)t[i], nt);
	for (int i = 0; i < n; i++) {
		/* compute_snr: alpha = √ᾱ, sigma = √(1 − ᾱ), snr = (alpha / sigma)²; all float32 */
		float alpha = sqrtf(ac[t[i]]), sigma = sqrtf(1.0f - ac[t[i]]), q = alpha / sigma, snr = q * q;
		float m = snr < gamma ? snr : gamma;
		w[i] = v_prediction ? m / (snr + 1.0f) : m / snr;
	}
	return 0;
}
