/*
 * ldm-names.c - original (CompVis/LDM) Stable Diffusion tensor names → diffusers names, the renaming
 * that diffusers' single-file loading does (src/diffusers/pipelines/stable_diffusion/convert_from_ckpt.py:
 * convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_unet_checkpoint), written as a
 * name-by-name rewrite so that no state dict has to be built first:
 *
 *   cond_stage_model.transformer.[text_model.]X   → text_model.X        (position_ids dropped)
 *   first_stage_model.{encoder,decoder}.…         → {encoder,decoder}.… (down/up/mid renamed, the
 *                                                   decoder's up.N numbered backwards, mid.attn_1's
 *                                                   1×1 convs squeezed to linear weights)
 *   model.diffusion_model.…                       → the UNet2DConditionModel's names
 *
 * Anything else (DDPM schedule buffers, model_ema.*, an SD 2.x OpenCLIP encoder) belongs to no component.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "model.h"

static const char *const prefixes[SD_COMPONENT_COUNT] = {
	[SD_TEXT_ENCODER] = "cond_stage_model.transformer.",
	[SD_VAE] = "first_stage_model.",
	[SD_UNET] = "model.diffusion_model.",
};

const char *ldm_prefix(enum sd_component c)
{
	return (unsigned)c < SD_COMPONENT_COUNT ? prefixes[c] : NULL;
}

/* When *s starts with lit, step past it and return 1. */
static int eat(const char **s, const char *lit)
{
	size_t n = strlen(lit);
	if (strncmp(*s, lit, n) != 0) return 0;
	*s += n;
	return 1;
}

/* A decimal index followed by '.', stepped past; -1 (and *s untouched) when there is none. */
static int index_dot(const char **s)
{
	const char *p = *s;
	long v = 0;
	if (*p < '0' || *p > '9') return -1;
	while (*p >= '0' && *p <= '9') {
		v = v * 10 + (*p++ - '0');
		if (v > 100000) return -1;
	}
	if (*p != '.') return -1;
	*s = p + 1;
	return (int)v;
}

/* printf into out; 1 when it fits, -1 when not. */
static int put(char *out, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int put(char *out, size_t n, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int k = vsnprintf(out, n, fmt, ap);
	va_end(ap);
	return k >= 0 && (size_t)k < n ? 1 : -1;
}

/* Inside a UNet ResBlock (renew_resnet_paths): the Sequential indices become named layers. */
static const char *unet_resnet_part(const char **rest)
{
	static const struct { const char *ldm, *hf; } map[] = {
		{ "in_layers.0.", "norm1." },   { "in_layers.2.", "conv1." },
		{ "out_layers.0.", "norm2." },  { "out_layers.3.", "conv2." },
		{ "emb_layers.1.", "time_emb_proj." }, { "skip_connection.", "conv_shortcut." },
	};
	for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
		if (eat(rest, map[i].ldm)) return map[i].hf;
	return "";
}

/*
 * model.diffusion_model.<s>.  Input block i >= 1 is layer (i-1) % (lpb+1) of level (i-1) / (lpb+1),
 * where layer lpb is the level's downsampler; output block i is layer i % (lpb+1) of up level
 * i / (lpb+1), holding a ResBlock (.0), a SpatialTransformer (.1) and/or an upsampler (.1 or .2 .conv).
 */
static int map_unet(const struct ldm_geom *g, const char *s, char *out, size_t n)
{
	int per = g->unet_lpb + 1, i, j;
	if (eat(&s, "time_embed.0.")) return put(out, n, "time_embedding.linear_1.%s", s);
	if (eat(&s, "time_embed.2.")) return put(out, n, "time_embedding.linear_2.%s", s);
	if (eat(&s, "out.0.")) return put(out, n, "conv_norm_out.%s", s);
	if (eat(&s, "out.2.")) return put(out, n, "conv_out.%s", s);
	if (eat(&s, "input_blocks.")) {
		if ((i = index_dot(&s)) < 0 || (j = index_dot(&s)) < 0) return 0;
		if (i == 0) return j == 0 ? put(out, n, "conv_in.%s", s) : 0;
		int b = (i - 1) / per, l = (i - 1) % per;
		if (j == 0 && eat(&s, "op.")) return put(out, n, "down_blocks.%d.downsamplers.0.conv.%s", b, s);
		if (j == 0) {
			const char *part = unet_resnet_part(&s);
			return put(out, n, "down_blocks.%d.resnets.%d.%s%s", b, l, part, s);
		}
		if (j == 1) return put(out, n, "down_blocks.%d.attentions.%d.%s", b, l, s);
		return 0;
	}
	if (eat(&s, "middle_block.")) {
		if ((j = index_dot(&s)) < 0) return 0;
		if (j == 1) return put(out, n, "mid_block.attentions.0.%s", s);
		if (j != 0 && j != 2) return 0;
		const char *part = unet_resnet_part(&s);
		return put(out, n, "mid_block.resnets.%d.%s%s", j / 2, part, s);
	}
	if (eat(&s, "output_blocks.")) {
		if ((i = index_dot(&s)) < 0 || (j = index_dot(&s)) < 0) return 0;
		int b = i / per, l = i % per;
		if (j == 0) {
			const char *part = unet_resnet_part(&s);
			return put(out, n, "up_blocks.%d.resnets.%d.%s%s", b, l, part, s);
		}
		if (eat(&s, "conv.")) return put(out, n, "up_blocks.%d.upsamplers.0.conv.%s", b, s);
		if (j == 1) return put(out, n, "up_blocks.%d.attentions.%d.%s", b, l, s);
		return 0;
	}
	return 0; /* label_emb and other parts SD 1.x does not have */
}

/* first_stage_model.<s> (convert_ldm_vae_checkpoint with renew_vae_resnet_paths / _attention_paths). */
static int map_vae(const struct ldm_geom *g, const char *s, char *out, size_t n, int *flags)
{
	if (eat(&s, "quant_conv.")) return put(out, n, "quant_conv.%s", s);
	if (eat(&s, "post_quant_conv.")) return put(out, n, "post_quant_conv.%s", s);
	const char *half = eat(&s, "encoder.") ? "encoder" : eat(&s, "decoder.") ? "decoder" : NULL;
	if (!half) return 0;
	int dec = half[0] == 'd', i, j;
	if (eat(&s, "conv_in.")) return put(out, n, "%s.conv_in.%s", half, s);
	if (eat(&s, "conv_out.")) return put(out, n, "%s.conv_out.%s", half, s);
	if (eat(&s, "norm_out.")) return put(out, n, "%s.conv_norm_out.%s", half, s);
	if (eat(&s, dec ? "up." : "down.")) {
		if ((i = index_dot(&s)) < 0) return 0;
		const char *blocks = dec ? "up_blocks" : "down_blocks";
		int b = dec ? g->vae_up_blocks - 1 - i : i;
		if (b < 0) return 0;
		if (eat(&s, "block.")) {
			if ((j = index_dot(&s)) < 0) return 0;
			const char *part = eat(&s, "nin_shortcut.") ? "conv_shortcut." : "";
			return put(out, n, "%s.%s.%d.resnets.%d.%s%s", half, blocks, b, j, part, s);
		}
		if (!dec && eat(&s, "downsample.conv."))
			return put(out, n, "%s.down_blocks.%d.downsamplers.0.conv.%s", half, b, s);
		if (dec && eat(&s, "upsample.conv."))
			return put(out, n, "%s.up_blocks.%d.upsamplers.0.conv.%s", half, b, s);
		return 0;
	}
	if (eat(&s, "mid.block_")) { /* block_1, block_2 */
		if ((i = index_dot(&s)) < 1 || i > 2) return 0;
		const char *part = eat(&s, "nin_shortcut.") ? "conv_shortcut." : "";
		return put(out, n, "%s.mid_block.resnets.%d.%s%s", half, i - 1, part, s);
	}
	if (eat(&s, "mid.attn_1.")) {
		static const struct { const char *ldm, *hf; int squeeze; } map[] = {
			{ "norm.", "group_norm.", 0 }, { "q.", "to_q.", 1 }, { "k.", "to_k.", 1 },
			{ "v.", "to_v.", 1 }, { "proj_out.", "to_out.0.", 1 },
		};
		for (size_t k = 0; k < sizeof map / sizeof map[0]; k++)
			if (eat(&s, map[k].ldm)) {
				*flags = map[k].squeeze ? LDM_SQUEEZE : 0;
				return put(out, n, "%s.mid_block.attentions.0.%s%s", half, map[k].hf, s);
			}
		return 0;
	}
	return 0;
}

int ldm_map_name(enum sd_component c, const struct ldm_geom *g, const char *name, char *out, size_t n,
                 int *flags)
{
	const char *s = name;
	*flags = 0;
	if ((unsigned)c >= SD_COMPONENT_COUNT || !prefixes[c] || !eat(&s, prefixes[c])) return 0;
	switch (c) {
	case SD_TEXT_ENCODER:
		/* transformers >= 4.x nests CLIPTextModel's weights under text_model.; older files do not */
		eat(&s, "text_model.");
		if (strcmp(s, "embeddings.position_ids") == 0) return 0; /* a buffer: arange(77) */
		return put(out, n, "text_model.%s", s);
	case SD_VAE:
		return map_vae(g, s, out, n, flags);
	case SD_UNET:
		return map_unet(g, s, out, n);
	default:
		return 0;
	}
}

/* Largest index + 1 seen right after lit in s (e.g. lit "decoder.up." and s "decoder.up.3.…" → 4). */
static int count_after(const char *s, const char *lit, int have)
{
	if (!eat(&s, lit)) return have;
	int i = index_dot(&s);
	return i + 1 > have ? i + 1 : have;
}

int ldm_geom_scan(struct ldm_geom *g, enum sd_component c, int n,
                  const char *(*names)(const void *ctx, int i), const void *ctx)
{
	int out_blocks = 0, downsamplers = 0;
	memset(g, 0, sizeof *g);
	for (int k = 0; k < n; k++) {
		const char *s = names(ctx, k);
		if (!s || (unsigned)c >= SD_COMPONENT_COUNT || !prefixes[c] || !eat(&s, prefixes[c])) continue;
		if (c == SD_VAE) {
			g->vae_up_blocks = count_after(s, "decoder.up.", g->vae_up_blocks);
		} else if (c == SD_UNET) {
			out_blocks = count_after(s, "output_blocks.", out_blocks);
			/* one ".0.op.weight" per level but the last */
			const char *p = s;
			if (eat(&p, "input_blocks.") && index_dot(&p) > 0 && eat(&p, "0.op.weight") && !*p)
				downsamplers++;
		}
	}
	if (c == SD_UNET && out_blocks > 0) {
		int levels = downsamplers + 1;
		if (out_blocks % levels != 0 || out_blocks / levels < 2)
			return sd_seterr("unet: cannot work out the layout: %d output blocks for %d levels",
			                 out_blocks, levels);
		g->unet_lpb = out_blocks / levels - 1;
	}
	return 0;
}
