/*
 * plan.c - small pieces of the generation plan that sd-noise and sd-unet-step share (the plan itself
 * travels in a frame's "sampler" map, see sd-unet-step(1)): a scheduler configuration with its
 * timestep_spacing overridden, as a user of diffusers gets it with
 * Scheduler.from_config(config, timestep_spacing=…).
 */
#include <stdlib.h>
#include <string.h>

#include "sd.h"

/* diffusers' SD 1.x scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5, no spacing key):
 * the text sd_sched_new uses for NULL. */
static const char sd15_config[] =
	"{\"_class_name\": \"PNDMScheduler\", \"beta_start\": 0.00085, \"beta_end\": 0.012, "
	"\"beta_schedule\": \"scaled_linear\", \"num_train_timesteps\": 1000, \"set_alpha_to_one\": false, "
	"\"skip_prk_steps\": true, \"steps_offset\": 1, \"trained_betas\": null, \"clip_sample\": false}";

const char *sd_sched_sd15_config(void)
{
	return sd15_config;
}

int sd_spacing_check(const char *spacing)
{
	if (spacing && (!strcmp(spacing, "leading") || !strcmp(spacing, "trailing") || !strcmp(spacing, "linspace")))
		return 0;
	return sd_seterr("unknown timestep spacing '%s' (known: leading, trailing, linspace)", spacing ? spacing : "");
}

char *sd_sched_config_spacing(const char *json, const char *spacing)
{
	if (!json) json = sd15_config;
	if (!spacing) {
		char *s = strdup(json);
		if (!s) sd_seterr("out of memory");
		return s;
	}
	if (sd_spacing_check(spacing)) return NULL;
	/* append the key before the closing brace: jansson keeps the last of duplicate keys, as Python's
	 * json does, so this overrides a timestep_spacing the text already has */
	const char *open = strchr(json, '{'), *close = strrchr(json, '}');
	if (!open || !close || close < open) {
		sd_seterr("scheduler config: not a JSON object");
		return NULL;
	}
	int empty = 1;
	for (const char *p = open + 1; p < close; p++)
		if (!strchr(" \t\r\n", *p)) empty = 0;
	size_t head = (size_t)(close - json), n = strlen(json) + strlen(spacing) + 64;
	char *s = malloc(n);
	if (!s) {
		sd_seterr("out of memory");
		return NULL;
	}
	memcpy(s, json, head);
	snprintf(s + head, n - head, "%s\"timestep_spacing\": \"%s\"%s", empty ? "" : ", ", spacing, close);
	return s;
}
