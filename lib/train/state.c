/*
 * train/state.c - the training state file of a run (sd-lora-train --save-every, --resume, a signal, a
 * NaN): one msgpack frame (sd-tensor(5)) {"format": "sdpipe-lora-train-state", "version": 1, "step",
 * "micro" (the dropout masks' step), "dataset_hash", "seed", "rng" (the run's generator), "params"
 * {name: tensor} (every trainer parameter, f32 on the CPU), "optim" (the optimizer's moments and step)}.
 * Loading it restores every number the next step reads, so a resumed run is bit-identical to one that
 * never stopped.
 */
#include <stdlib.h>
#include <string.h>
#include "sd.h"

int sd_train_run_save(const sd_train_run *r, const char *path)
{
	sd_value *f = sd_value_map(), *params = sd_value_map();
	if (!f || !params) return sd_seterr("out of memory");
	sd_map_set_str(f, "format", "sdpipe-lora-train-state");
	sd_map_set_int(f, "version", 1);
	sd_map_set_int(f, "step", r->step);
	sd_map_set_int(f, "micro", (int64_t)sd_trainer_micro(r->tr));
	sd_map_set_str(f, "dataset_hash", r->hash);
	sd_map_set_int(f, "seed", (int64_t)r->rc->cfg.seed);
	sd_map_set(f, "rng", sd_rng_to_value(&r->rng));
	for (int i = 0; i < sd_trainer_param_count(r->tr); i++) {
		sd_tensor *h = sd_tensor_to_device(sd_trainer_param(r->tr, i), SD_DEVICE_CPU);
		if (!h || sd_map_set_tensor(params, sd_trainer_param_name(r->tr, i), h)) {
			sd_value_free(params);
			sd_value_free(f);
			return -1;
		}
	}
	sd_map_set(f, "params", params);
	sd_value *ov = sd_optim_to_value(sd_trainer_optim(r->tr));
	if (!ov || sd_map_set(f, "optim", ov)) {
		sd_value_free(f);
		return -1;
	}
	char *buf;
	size_t len;
	int rc = sd_frame_pack(f, &buf, &len);
	sd_value_free(f);
	if (rc) return -1;
	rc = sd_write_file_atomic(path, buf, len);
	free(buf);
	return rc;
}

/* The body of sd_train_run_load: f is the unpacked frame (freed by the caller). */
static int load(sd_train_run *r, const char *path, const sd_value *f)
{
	const char *fmt = sd_map_str(f, "format"), *h = sd_map_str(f, "dataset_hash");
	uint64_t seed0 = r->rc->cfg.seed;
	int64_t step, mi, seed;
	if (!fmt || strcmp(fmt, "sdpipe-lora-train-state") || sd_map_get_int(f, "step", &step) ||
	    sd_map_get_int(f, "micro", &mi) || sd_map_get_int(f, "seed", &seed))
		return sd_seterr("%s: not an sd-lora-train state file", path);
	if (!h || strcmp(h, r->hash))
		return sd_seterr("%s: saved for another data set (hash %s, now %s)", path, h ? h : "?", r->hash);
	if ((uint64_t)seed != seed0)
		return sd_seterr("%s: saved with --seed %lld, not %llu", path, (long long)seed, (unsigned long long)seed0);
	const sd_value *params = sd_map_get(f, "params");
	for (int i = 0; i < sd_trainer_param_count(r->tr); i++) {
		const char *n = sd_trainer_param_name(r->tr, i);
		const sd_tensor *t = params ? sd_map_tensor(params, n) : NULL;
		if (!t || !sd_tensor_same_shape(t, sd_trainer_param(r->tr, i)))
			return sd_seterr("%s: %s is missing or of another shape (other --train/--targets/--rank?)", path, n);
		if (sd_tensor_copy(sd_trainer_param(r->tr, i), t)) return sd_preerr("%s", path);
	}
	if (params && (int)params->u.m.n != sd_trainer_param_count(r->tr))
		return sd_seterr("%s: holds %d parameters, this run has %d", path, (int)params->u.m.n,
		                 sd_trainer_param_count(r->tr));
	if (sd_optim_from_value(sd_trainer_optim(r->tr), sd_map_get(f, "optim"))) return sd_preerr("%s", path);
	if (sd_rng_from_value(&r->rng, sd_map_get(f, "rng"))) return sd_preerr("%s", path);
	r->step = step;
	sd_trainer_set_micro(r->tr, (uint64_t)mi);
	return 0;
}

int sd_train_run_load(sd_train_run *r, const char *path)
{
	size_t len;
	char *buf = sd_read_file(path, (size_t)4 << 30, &len);
	sd_value *f;
	if (!buf) return -1;
	int rc = sd_frame_unpack(buf, len, &f);
	free(buf);
	if (rc) return sd_preerr("%s", path);
	rc = load(r, path, f);
	sd_value_free(f);
	return rc;
}
