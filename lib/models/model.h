/*
 * model.h - internal to lib/models/model.c and lib/models/ldm-names.c: mapping the tensor names of an
 * original (CompVis/LDM) Stable Diffusion checkpoint to the names diffusers gives the same weights.
 */
#ifndef SD_MODEL_H
#define SD_MODEL_H

#include <stddef.h>
#include "sd.h"

/* The prefix of a component's tensors in a single-file checkpoint ("model.diffusion_model.", …). */
const char *ldm_prefix(enum sd_component c);

/* What the positional LDM names need to be mapped, counted off a component's key list. */
struct ldm_geom {
	int unet_lpb;      /* res blocks per UNet level (diffusers' layers_per_block) */
	int vae_up_blocks; /* number of decoder.up.N levels (the decoder's blocks are numbered backwards) */
};

/*
 * Count the geometry from the names (full LDM names; others are skipped): names(ctx, i) for i < n.
 * 0 on success, -1 with a message when the UNet's layout cannot be worked out.
 */
int ldm_geom_scan(struct ldm_geom *g, enum sd_component c, int n,
                  const char *(*names)(const void *ctx, int i), const void *ctx);

/* The mapped tensor must lose its trailing 1-sized dimensions (a 1×1 conv stored for a linear layer). */
#define LDM_SQUEEZE 1

/*
 * Map one full LDM name of component c to its diffusers name, written to out (n bytes).  Returns 1
 * when mapped (*flags gets LDM_SQUEEZE or 0), 0 when the tensor is not part of c or is deliberately
 * dropped (position_ids, schedule buffers, unknown parts), -1 when out is too small.
 */
int ldm_map_name(enum sd_component c, const struct ldm_geom *g, const char *name, char *out, size_t n,
                 int *flags);

#endif
