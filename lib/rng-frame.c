/*
 * rng-frame.c - the generator state as frames carry it (key "generator"): {"seed", "draws", "cached"}.
 * sd-vae-encode --sample starts it, sd-noise and the ancestral samplers in sd-unet-step continue it, so a
 * pipeline draws exactly what one torch.Generator does across a diffusers pipeline call.
 */
#include "sd.h"

sd_value *sd_rng_to_value(const sd_rng *r)
{
	sd_value *m = sd_value_map();
	if (!m) return NULL;
	if (sd_map_set(m, "seed", r->seed > INT64_MAX ? sd_value_float((double)r->seed) : sd_value_int((int64_t)r->seed)) ||
	    sd_map_set_int(m, "draws", (int64_t)r->draws) ||
	    sd_map_set(m, "cached", r->has_cached ? sd_value_float(r->cached) : sd_value_nil())) {
		sd_value_free(m);
		return NULL;
	}
	return m;
}

int sd_rng_from_value(sd_rng *r, const sd_value *v)
{
	int64_t seed, draws;
	if (!v || v->type != SD_V_MAP) return sd_seterr("generator: not a map");
	const sd_value *s = sd_map_get(v, "seed");
	if (s && s->type == SD_V_UINT) {
		seed = (int64_t)s->u.u; /* reinterpreted: only the low 32 bits matter */
	} else if (sd_map_get_int(v, "seed", &seed) != 0) {
		return sd_seterr("generator: missing or bad 'seed'");
	}
	if (sd_map_get_int(v, "draws", &draws) != 0 || draws < 0)
		return sd_seterr("generator: missing or bad 'draws'");
	if (draws > ((int64_t)1 << 40))
		return sd_seterr("generator: 'draws' %lld is implausibly large", (long long)draws);
	const sd_value *c = sd_map_get(v, "cached");
	int has = c && c->type == SD_V_FLOAT;
	if (c && !has && c->type != SD_V_NIL) return sd_seterr("generator: 'cached' must be a float or nil");
	sd_rng_restore(r, (uint64_t)seed, (uint64_t)draws, has, has ? c->u.f : 0.0);
	return 0;
}
