/*
 * models/init.c - Stable Diffusion 1.x models with deterministic random weights in diffusers' folder
 * layout, for demos, tests and benchmarks (sd-init(1)).
 *
 * OUT/model_index.json, scheduler/scheduler_config.json (SD 1.5's), tokenizer/ (the shipped CLIP merges
 * and the vocab.json CLIP builds from them), text_encoder/, unet/ and vae/ with config.json and f32
 * safetensors named as transformers and diffusers name them (CLIPTextModel, UNet2DConditionModel with
 * CrossAttn/plain down and up blocks, AutoencoderKL).  Weights: U(−1/√fan_in, 1/√fan_in) (torch's default
 * scale) for matrices and kernels, N(0, 0.02)-sized uniform for embeddings, 1 for norm gains, 0 for
 * biases, drawn from torch's generator seeded with the seed (+ the component's index).  The folder is
 * built under a temporary name next to OUT and renamed into place.  Tensors are generated and written
 * one at a time, so memory stays small even for SD 1.5's 4 GB.
 */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "sd.h"

/* ==== configurations ==== */

/* The tiny fixture model's configs (tests/fixtures/tiny). */
static const char tiny_json[] =
	"{\"text_encoder\": {\"architectures\": [\"CLIPTextModel\"], \"bos_token_id\": 0, \"pad_token_id\": 1,"
	" \"eos_token_id\": 2, \"dropout\": 0.0, \"vocab_size\": 49408, \"hidden_size\": 32, \"intermediate_size\": 37,"
	" \"projection_dim\": 32, \"num_hidden_layers\": 5, \"num_attention_heads\": 4, \"max_position_embeddings\": 77,"
	" \"layer_norm_eps\": 1e-05, \"hidden_act\": \"quick_gelu\", \"initializer_range\": 0.02,"
	" \"initializer_factor\": 1.0, \"attention_dropout\": 0.0, \"model_type\": \"clip_text_model\"},"
	" \"unet\": {\"_class_name\": \"UNet2DConditionModel\", \"sample_size\": 32, \"in_channels\": 4, \"out_channels\": 4,"
	" \"center_input_sample\": false, \"flip_sin_to_cos\": true, \"freq_shift\": 0,"
	" \"down_block_types\": [\"DownBlock2D\", \"CrossAttnDownBlock2D\"], \"mid_block_type\": \"UNetMidBlock2DCrossAttn\","
	" \"up_block_types\": [\"CrossAttnUpBlock2D\", \"UpBlock2D\"], \"block_out_channels\": [32, 64],"
	" \"layers_per_block\": 2, \"downsample_padding\": 1, \"mid_block_scale_factor\": 1, \"act_fn\": \"silu\","
	" \"norm_num_groups\": 32, \"norm_eps\": 1e-05, \"cross_attention_dim\": 32, \"attention_head_dim\": 8,"
	" \"use_linear_projection\": false, \"upcast_attention\": false},"
	" \"vae\": {\"_class_name\": \"AutoencoderKL\", \"in_channels\": 3, \"out_channels\": 3,"
	" \"down_block_types\": [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\"],"
	" \"up_block_types\": [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\"], \"block_out_channels\": [32, 64],"
	" \"layers_per_block\": 1, \"act_fn\": \"silu\", \"latent_channels\": 4, \"norm_num_groups\": 32,"
	" \"sample_size\": 64, \"scaling_factor\": 0.18215}}";

/* runwayml/stable-diffusion-v1-5's configs. */
static const char sd15_json[] =
	"{\"text_encoder\": {\"architectures\": [\"CLIPTextModel\"], \"attention_dropout\": 0.0, \"bos_token_id\": 0,"
	" \"dropout\": 0.0, \"eos_token_id\": 2, \"hidden_act\": \"quick_gelu\", \"hidden_size\": 768,"
	" \"initializer_factor\": 1.0, \"initializer_range\": 0.02, \"intermediate_size\": 3072, \"layer_norm_eps\": 1e-05,"
	" \"max_position_embeddings\": 77, \"model_type\": \"clip_text_model\", \"num_attention_heads\": 12,"
	" \"num_hidden_layers\": 12, \"pad_token_id\": 1, \"projection_dim\": 768, \"torch_dtype\": \"float32\","
	" \"vocab_size\": 49408},"
	" \"unet\": {\"_class_name\": \"UNet2DConditionModel\", \"act_fn\": \"silu\", \"attention_head_dim\": 8,"
	" \"block_out_channels\": [320, 640, 1280, 1280], \"center_input_sample\": false, \"cross_attention_dim\": 768,"
	" \"down_block_types\": [\"CrossAttnDownBlock2D\", \"CrossAttnDownBlock2D\", \"CrossAttnDownBlock2D\", \"DownBlock2D\"],"
	" \"downsample_padding\": 1, \"flip_sin_to_cos\": true, \"freq_shift\": 0, \"in_channels\": 4, \"layers_per_block\": 2,"
	" \"mid_block_scale_factor\": 1, \"norm_eps\": 1e-05, \"norm_num_groups\": 32, \"out_channels\": 4,"
	" \"sample_size\": 64,"
	" \"up_block_types\": [\"UpBlock2D\", \"CrossAttnUpBlock2D\", \"CrossAttnUpBlock2D\", \"CrossAttnUpBlock2D\"]},"
	" \"vae\": {\"_class_name\": \"AutoencoderKL\", \"act_fn\": \"silu\", \"block_out_channels\": [128, 256, 512, 512],"
	" \"down_block_types\": [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\", \"DownEncoderBlock2D\", \"DownEncoderBlock2D\"],"
	" \"in_channels\": 3, \"latent_channels\": 4, \"layers_per_block\": 2, \"norm_num_groups\": 32, \"out_channels\": 3,"
	" \"sample_size\": 512, \"scaling_factor\": 0.18215,"
	" \"up_block_types\": [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\", \"UpDecoderBlock2D\", \"UpDecoderBlock2D\"]}}";

static const char model_index[] =
	"{\n  \"_class_name\": \"StableDiffusionPipeline\",\n  \"_diffusers_version\": \"0.25.1\",\n"
	"  \"feature_extractor\": [null, null],\n  \"requires_safety_checker\": false,\n"
	"  \"safety_checker\": [null, null],\n  \"scheduler\": [\"diffusers\", \"PNDMScheduler\"],\n"
	"  \"text_encoder\": [\"transformers\", \"CLIPTextModel\"],\n  \"tokenizer\": [\"transformers\", \"CLIPTokenizer\"],\n"
	"  \"unet\": [\"diffusers\", \"UNet2DConditionModel\"],\n  \"vae\": [\"diffusers\", \"AutoencoderKL\"]\n}\n";

static const char tokenizer_config[] =
	"{\n  \"add_prefix_space\": false,\n  \"bos_token\": \"<|startoftext|>\",\n  \"do_lower_case\": true,\n"
	"  \"eos_token\": \"<|endoftext|>\",\n  \"errors\": \"replace\",\n  \"model_max_length\": 77,\n"
	"  \"pad_token\": \"<|endoftext|>\",\n  \"tokenizer_class\": \"CLIPTokenizer\",\n  \"unk_token\": \"<|endoftext|>\"\n}\n";

static const char special_tokens[] =
	"{\n  \"bos_token\": \"<|startoftext|>\",\n  \"eos_token\": \"<|endoftext|>\",\n"
	"  \"pad_token\": \"<|endoftext|>\",\n  \"unk_token\": \"<|endoftext|>\"\n}\n";
/* ==== tensors by name ==== */

enum init { INIT_WEIGHT, INIT_EMBED, INIT_ONE, INIT_ZERO };

struct ent {
	char *name;
	int ndim;
	int64_t shape[4];
	enum init init;
};

struct list {
	struct ent *e;
	int n, cap;
	int64_t params;
	int bad;        /* a config error or no memory: the first message is kept, the rest is skipped */
};

/* The list's first error (the message of a failure that stops the model). */
static void fail(struct list *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct list *L, const char *fmt, ...)
{
	char m[1024];
	va_list ap;
	if (L->bad++) return;
	va_start(ap, fmt);
	vsnprintf(m, sizeof m, fmt, ap);
	va_end(ap);
	sd_seterr("%s", m);
}

static void add(struct list *L, enum init init, int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
                const char *fmt, ...) __attribute__((format(printf, 8, 9)));
static void add(struct list *L, enum init init, int ndim, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
                const char *fmt, ...)
{
	if (L->bad) return;
	if (L->n == L->cap) {
		struct ent *ne = realloc(L->e, (size_t)(L->cap ? 2 * L->cap : 256) * sizeof *L->e);
		if (!ne) {
			fail(L, "out of memory");
			return;
		}
		L->e = ne, L->cap = L->cap ? 2 * L->cap : 256;
	}
	struct ent *e = &L->e[L->n];
	va_list ap;
	va_start(ap, fmt);
	int bad = vasprintf(&e->name, fmt, ap) < 0;
	va_end(ap);
	if (bad) {
		fail(L, "out of memory");
		return;
	}
	L->n++;
	e->ndim = ndim;
	e->shape[0] = d0, e->shape[1] = d1, e->shape[2] = d2, e->shape[3] = d3;
	e->init = init;
	int64_t n = 1;
	for (int i = 0; i < ndim; i++) n *= e->shape[i];
	L->params += n;
}

/* A linear layer (weight (O, I), bias (O) when bias) and a conv (weight (O, I, k, k), bias (O)). */
static void linear(struct list *L, const char *p, int64_t o, int64_t i, int bias)
{
	add(L, INIT_WEIGHT, 2, o, i, 0, 0, "%s.weight", p);
	if (bias) add(L, INIT_ZERO, 1, o, 0, 0, 0, "%s.bias", p);
}
static void conv(struct list *L, const char *p, int64_t o, int64_t i, int k)
{
	add(L, INIT_WEIGHT, 4, o, i, k, k, "%s.weight", p);
	add(L, INIT_ZERO, 1, o, 0, 0, 0, "%s.bias", p);
}
static void norm(struct list *L, const char *p, int64_t c)
{
	add(L, INIT_ONE, 1, c, 0, 0, 0, "%s.weight", p);
	add(L, INIT_ZERO, 1, c, 0, 0, 0, "%s.bias", p);
}

/* A formatted name in one of 8 rotating buffers (copy it to keep it across more calls). */
static char *cat(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *cat(const char *fmt, ...)
{
	static char buf[8][512];
	static int k;
	char *b = buf[k++ & 7];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(b, sizeof buf[0], fmt, ap);
	va_end(ap);
	return b;
}

/* Config access: an integer (def when absent; an error when of another type). */
static int64_t cint(struct list *L, json_t *c, const char *comp, const char *key, int64_t def)
{
	json_t *v = json_object_get(c, key);
	if (!v || json_is_null(v)) return def;
	if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > (1 << 20))
		return fail(L, "%s: config: \"%s\" must be a positive integer (sd-init takes no per-block lists)", comp, key), def;
	return json_integer_value(v);
}

static int cbool(json_t *c, const char *key)
{
	return json_is_true(json_object_get(c, key));
}

/* block_out_channels (and the block types' count must agree); 0 after an error. */
static int cblocks(struct list *L, json_t *c, const char *comp, int64_t *boc)
{
	json_t *a = json_object_get(c, "block_out_channels");
	int n = json_is_array(a) ? (int)json_array_size(a) : 0;
	if (n < 1 || n > 8) return fail(L, "%s: config: \"block_out_channels\" must be a list of 1 to 8 sizes", comp), 0;
	for (int i = 0; i < n; i++) {
		json_t *v = json_array_get(a, i);
		if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > (1 << 16))
			return fail(L, "%s: config: \"block_out_channels\" must hold positive integers", comp), 0;
		boc[i] = json_integer_value(v);
	}
	return L->bad ? 0 : n;
}

/* ---- transformers' CLIPTextModel ---- */

static void clip_names(struct list *L, json_t *c)
{
	const char *k = "text_encoder";
	int64_t V = cint(L, c, k, "vocab_size", 49408), P = cint(L, c, k, "max_position_embeddings", 77);
	int64_t D = cint(L, c, k, "hidden_size", 512), F = cint(L, c, k, "intermediate_size", 2048);
	int64_t nl = cint(L, c, k, "num_hidden_layers", 12);
	add(L, INIT_EMBED, 2, V, D, 0, 0, "text_model.embeddings.token_embedding.weight");
	add(L, INIT_EMBED, 2, P, D, 0, 0, "text_model.embeddings.position_embedding.weight");
	for (int64_t i = 0; i < nl; i++) {
		char p[64];
		snprintf(p, sizeof p, "text_model.encoder.layers.%lld", (long long)i);
		norm(L, cat("%s.layer_norm1", p), D);
		linear(L, cat("%s.self_attn.q_proj", p), D, D, 1);
		linear(L, cat("%s.self_attn.k_proj", p), D, D, 1);
		linear(L, cat("%s.self_attn.v_proj", p), D, D, 1);
		linear(L, cat("%s.self_attn.out_proj", p), D, D, 1);
		norm(L, cat("%s.layer_norm2", p), D);
		linear(L, cat("%s.mlp.fc1", p), F, D, 1);
		linear(L, cat("%s.mlp.fc2", p), D, F, 1);
	}
	norm(L, "text_model.final_layer_norm", D);
}

/* ---- diffusers' AutoencoderKL ---- */

static void vae_resnet(struct list *L, const char *p0, int64_t cin, int64_t cout)
{
	char p[256];
	snprintf(p, sizeof p, "%s", p0); /* cat()'s buffers are reused */
	norm(L, cat("%s.norm1", p), cin);
	conv(L, cat("%s.conv1", p), cout, cin, 3);
	norm(L, cat("%s.norm2", p), cout);
	conv(L, cat("%s.conv2", p), cout, cout, 3);
	if (cin != cout) conv(L, cat("%s.conv_shortcut", p), cout, cin, 1);
}

static void vae_mid(struct list *L, const char *p, int64_t C)
{
	vae_resnet(L, cat("%s.mid_block.resnets.0", p), C, C);
	norm(L, cat("%s.mid_block.attentions.0.group_norm", p), C);
	linear(L, cat("%s.mid_block.attentions.0.to_q", p), C, C, 1);
	linear(L, cat("%s.mid_block.attentions.0.to_k", p), C, C, 1);
	linear(L, cat("%s.mid_block.attentions.0.to_v", p), C, C, 1);
	linear(L, cat("%s.mid_block.attentions.0.to_out.0", p), C, C, 1);
	vae_resnet(L, cat("%s.mid_block.resnets.1", p), C, C);
}

static void vae_names(struct list *L, json_t *c)
{
	const char *k = "vae";
	int64_t boc[8];
	int n = cblocks(L, c, k, boc);
	if (!n) return;
	int64_t lpb = cint(L, c, k, "layers_per_block", 1), lat = cint(L, c, k, "latent_channels", 4);
	int64_t in = cint(L, c, k, "in_channels", 3), out = cint(L, c, k, "out_channels", 3);
	conv(L, "encoder.conv_in", boc[0], in, 3);
	int64_t prev = boc[0];
	for (int i = 0; i < n; i++) {
		for (int64_t j = 0; j < lpb; j++)
			vae_resnet(L, cat("encoder.down_blocks.%d.resnets.%lld", i, (long long)j), j ? boc[i] : prev, boc[i]);
		if (i < n - 1) conv(L, cat("encoder.down_blocks.%d.downsamplers.0.conv", i), boc[i], boc[i], 3);
		prev = boc[i];
	}
	vae_mid(L, "encoder", boc[n - 1]);
	norm(L, "encoder.conv_norm_out", boc[n - 1]);
	conv(L, "encoder.conv_out", 2 * lat, boc[n - 1], 3);
	conv(L, "quant_conv", 2 * lat, 2 * lat, 1);
	conv(L, "post_quant_conv", lat, lat, 1);
	conv(L, "decoder.conv_in", boc[n - 1], lat, 3);
	vae_mid(L, "decoder", boc[n - 1]);
	prev = boc[n - 1];
	for (int i = 0; i < n; i++) {
		int64_t o = boc[n - 1 - i];
		for (int64_t j = 0; j <= lpb; j++)
			vae_resnet(L, cat("decoder.up_blocks.%d.resnets.%lld", i, (long long)j), j ? o : prev, o);
		if (i < n - 1) conv(L, cat("decoder.up_blocks.%d.upsamplers.0.conv", i), o, o, 3);
		prev = o;
	}
	norm(L, "decoder.conv_norm_out", boc[0]);
	conv(L, "decoder.conv_out", out, boc[0], 3);
}

/* ---- diffusers' UNet2DConditionModel (SD 1.x block types) ---- */

struct ucfg {
	int64_t T, X, tl;
	int linear;
};

static void unet_resnet(struct list *L, const char *p0, int64_t cin, int64_t cout, const struct ucfg *u)
{
	char p[256];
	snprintf(p, sizeof p, "%s", p0); /* cat()'s buffers are reused */
	norm(L, cat("%s.norm1", p), cin);
	conv(L, cat("%s.conv1", p), cout, cin, 3);
	linear(L, cat("%s.time_emb_proj", p), cout, u->T, 1);
	norm(L, cat("%s.norm2", p), cout);
	conv(L, cat("%s.conv2", p), cout, cout, 3);
	if (cin != cout) conv(L, cat("%s.conv_shortcut", p), cout, cin, 1);
}

static void unet_transformer(struct list *L, const char *p0, int64_t C, const struct ucfg *u)
{
	char p[256];
	snprintf(p, sizeof p, "%s", p0);
	norm(L, cat("%s.norm", p), C);
	if (u->linear) linear(L, cat("%s.proj_in", p), C, C, 1);
	else conv(L, cat("%s.proj_in", p), C, C, 1);
	for (int64_t b = 0; b < u->tl; b++) {
		char q[300];
		snprintf(q, sizeof q, "%s.transformer_blocks.%lld", p, (long long)b);
		norm(L, cat("%s.norm1", q), C);
		linear(L, cat("%s.attn1.to_q", q), C, C, 0);
		linear(L, cat("%s.attn1.to_k", q), C, C, 0);
		linear(L, cat("%s.attn1.to_v", q), C, C, 0);
		linear(L, cat("%s.attn1.to_out.0", q), C, C, 1);
		norm(L, cat("%s.norm2", q), C);
		linear(L, cat("%s.attn2.to_q", q), C, C, 0);
		linear(L, cat("%s.attn2.to_k", q), C, u->X, 0);
		linear(L, cat("%s.attn2.to_v", q), C, u->X, 0);
		linear(L, cat("%s.attn2.to_out.0", q), C, C, 1);
		norm(L, cat("%s.norm3", q), C);
		linear(L, cat("%s.ff.net.0.proj", q), 8 * C, C, 1);
		linear(L, cat("%s.ff.net.2", q), C, 4 * C, 1);
	}
	if (u->linear) linear(L, cat("%s.proj_out", p), C, C, 1);
	else conv(L, cat("%s.proj_out", p), C, C, 1);
}

/* 1 for the cross-attention type of a block list entry, 0 for the plain one, else an error. */
static int block_type(struct list *L, json_t *c, const char *key, int i, int n, const char *cross, const char *plain)
{
	json_t *a = json_object_get(c, key);
	if (!json_is_array(a) || (int)json_array_size(a) != n)
		return fail(L, "unet: config: \"%s\" must list one type per entry of block_out_channels", key), 0;
	const char *s = json_string_value(json_array_get(a, i));
	if (s && !strcmp(s, cross)) return 1;
	if (s && !strcmp(s, plain)) return 0;
	fail(L, "unet: config: %s[%d] '%s' is not supported by sd-init (%s or %s)", key, i, s ? s : "?", cross, plain);
	return 0;
}

static void unet_names(struct list *L, json_t *c)
{
	const char *k = "unet";
	int64_t boc[8];
	int n = cblocks(L, c, k, boc);
	if (!n) return;
	int64_t lpb = cint(L, c, k, "layers_per_block", 2), in = cint(L, c, k, "in_channels", 4);
	int64_t out = cint(L, c, k, "out_channels", 4);
	struct ucfg u = {cint(L, c, k, "time_embedding_dim", 4 * boc[0]), cint(L, c, k, "cross_attention_dim", 1280),
	                 cint(L, c, k, "transformer_layers_per_block", 1), cbool(c, "use_linear_projection")};
	json_t *mid = json_object_get(c, "mid_block_type");
	if (mid && !json_is_null(mid) && strcmp(json_string_value(mid) ? json_string_value(mid) : "", "UNetMidBlock2DCrossAttn"))
		fail(L, "unet: config: mid_block_type '%s' is not supported by sd-init",
		     json_string_value(mid) ? json_string_value(mid) : "?");
	linear(L, "time_embedding.linear_1", u.T, boc[0], 1);
	linear(L, "time_embedding.linear_2", u.T, u.T, 1);
	conv(L, "conv_in", boc[0], in, 3);
	for (int i = 0; i < n; i++) {
		int attn = block_type(L, c, "down_block_types", i, n, "CrossAttnDownBlock2D", "DownBlock2D");
		int64_t cin = i ? boc[i - 1] : boc[0];
		for (int64_t j = 0; j < lpb; j++) {
			unet_resnet(L, cat("down_blocks.%d.resnets.%lld", i, (long long)j), j ? boc[i] : cin, boc[i], &u);
			if (attn) unet_transformer(L, cat("down_blocks.%d.attentions.%lld", i, (long long)j), boc[i], &u);
		}
		if (i < n - 1) conv(L, cat("down_blocks.%d.downsamplers.0.conv", i), boc[i], boc[i], 3);
	}
	int64_t C = boc[n - 1];
	unet_resnet(L, "mid_block.resnets.0", C, C, &u);
	unet_transformer(L, "mid_block.attentions.0", C, &u);
	unet_resnet(L, "mid_block.resnets.1", C, C, &u);
	int64_t prev = C;
	for (int i = 0; i < n; i++) {
		int attn = block_type(L, c, "up_block_types", i, n, "CrossAttnUpBlock2D", "UpBlock2D");
		int64_t o = boc[n - 1 - i], skip_in = boc[n - 1 - (i + 1 < n ? i + 1 : n - 1)];
		for (int64_t j = 0; j <= lpb; j++) {
			int64_t skip = j == lpb ? skip_in : o, rin = j ? o : prev;
			unet_resnet(L, cat("up_blocks.%d.resnets.%lld", i, (long long)j), rin + skip, o, &u);
			if (attn) unet_transformer(L, cat("up_blocks.%d.attentions.%lld", i, (long long)j), o, &u);
		}
		if (i < n - 1) conv(L, cat("up_blocks.%d.upsamplers.0.conv", i), o, o, 3);
		prev = o;
	}
	norm(L, "conv_norm_out", boc[0]);
	conv(L, "conv_out", out, boc[0], 3);
}

/* ==== writing ==== */

/* Write the list as a safetensors file (f32), generating each tensor as it goes: the tensors of one
 * component come from one generator, in the list's order.  -1 with a message on a write error. */
static int write_st(const char *path, const struct list *L, uint64_t seed)
{
	json_t *h = json_object();
	int64_t off = 0;
	for (int i = 0; i < L->n; i++) {
		const struct ent *e = &L->e[i];
		json_t *shape = json_array();
		int64_t n = 1;
		for (int d = 0; d < e->ndim; d++) {
			json_array_append_new(shape, json_integer(e->shape[d]));
			n *= e->shape[d];
		}
		json_object_set_new(h, e->name, json_pack("{s:s, s:o, s:[I,I]}", "dtype", "F32", "shape", shape,
		                                          "data_offsets", (json_int_t)off, (json_int_t)(off + 4 * n)));
		off += 4 * n;
	}
	json_object_set_new(h, "__metadata__", json_pack("{s:s}", "format", "pt"));
	char *hdr = json_dumps(h, JSON_COMPACT | JSON_PRESERVE_ORDER);
	json_decref(h);
	if (!hdr) return sd_seterr("out of memory");
	size_t hl = strlen(hdr), pad = (8 - hl % 8) % 8;
	FILE *f = fopen(path, "wb");
	if (!f) { free(hdr); return sd_seterr("%s: %s", path, strerror(errno)); }
	uint64_t len = hl + pad;
	unsigned char le[8];
	for (int b = 0; b < 8; b++) le[b] = (unsigned char)(len >> (8 * b));
	int bad = fwrite(le, 1, 8, f) != 8 || fwrite(hdr, 1, hl, f) != hl || fwrite("        ", 1, pad, f) != pad;
	free(hdr);
	sd_rng rng;
	sd_rng_seed(&rng, seed);
	float *buf = NULL;
	size_t cap = 0;
	for (int i = 0; i < L->n && !bad; i++) {
		const struct ent *e = &L->e[i];
		int64_t n = 1, fan_in = 1;
		for (int d = 0; d < e->ndim; d++) n *= e->shape[d];
		for (int d = 1; d < e->ndim; d++) fan_in *= e->shape[d];
		if ((size_t)n > cap) {
			free(buf);
			cap = (size_t)n;
			if (!(buf = malloc(cap * sizeof *buf))) { fclose(f); return sd_seterr("out of memory"); }
		}
		if (e->init == INIT_ONE || e->init == INIT_ZERO) {
			for (int64_t k = 0; k < n; k++) buf[k] = e->init == INIT_ONE ? 1.0f : 0.0f;
		} else {
			/* uniform with the bound of torch's default init (kaiming_uniform a=√5: 1/√fan_in), or with
			 * the standard deviation 0.02 of CLIP's embeddings */
			float bound = e->init == INIT_EMBED ? 0.02f * sqrtf(3.0f) : 1.0f / sqrtf((float)fan_in);
			sd_rng_rand(&rng, buf, n);
			for (int64_t k = 0; k < n; k++) buf[k] = (2 * buf[k] - 1) * bound;
		}
		bad = fwrite(buf, sizeof *buf, (size_t)n, f) != (size_t)n;
	}
	free(buf);
	if (fflush(f) || fsync(fileno(f))) bad = 1;
	if (fclose(f)) bad = 1;
	return bad ? sd_seterr("%s: write error: %s", path, strerror(errno)) : 0;
}

static int write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	if (!f) return sd_seterr("%s: %s", path, strerror(errno));
	int bad = fputs(text, f) == EOF;
	if (fclose(f) || bad) return sd_seterr("%s: %s", path, strerror(errno));
	return 0;
}

static int write_json(const char *path, json_t *j)
{
	if (json_dump_file(j, path, JSON_INDENT(2) | JSON_PRESERVE_ORDER)) return sd_seterr("%s: cannot write", path);
	return 0;
}

static int make_dir(const char *path)
{
	if (mkdir(path, 0777) && errno != EEXIST) return sd_seterr("%s: %s", path, strerror(errno));
	return 0;
}

/* The shipped CLIP merges (as the tokenizer finds them): $SD_DATADIR, the install's share/sdpipe,
 * next to the executable; NULL when nowhere. */
static char *find_merges(void)
{
	static char path[PATH_MAX];
	char exe[PATH_MAX];
	const char *dirs[6];
	int nd = 0;
	const char *env = getenv("SD_DATADIR");
	if (env && *env) dirs[nd++] = env;
#ifdef SD_DATADIR
	dirs[nd++] = SD_DATADIR;
#endif
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	char *slash = n > 0 ? (exe[n] = 0, strrchr(exe, '/')) : NULL;
	static char rel[3][PATH_MAX + 64];
	if (slash) {
		*slash = 0;
		snprintf(rel[0], sizeof rel[0], "%s/../lib/models/data", exe);
		snprintf(rel[1], sizeof rel[1], "%s/../share/sdpipe", exe);
		snprintf(rel[2], sizeof rel[2], "%s/../../lib/models/data", exe);
		for (int i = 0; i < 3; i++) dirs[nd++] = rel[i];
	}
	for (int i = 0; i < nd; i++) {
		snprintf(path, sizeof path, "%s/clip-merges.txt", dirs[i]);
		if (access(path, R_OK) == 0) return path;
	}
	return NULL;
}

/* UTF-8 of code point c into s (NUL-terminated); returns the length. */
static int utf8(char *s, unsigned c)
{
	int n = c < 0x80 ? 1 : c < 0x800 ? 2 : 3;
	if (n == 1) s[0] = (char)c;
	else if (n == 2) s[0] = (char)(0xc0 | c >> 6), s[1] = (char)(0x80 | (c & 0x3f));
	else s[0] = (char)(0xe0 | c >> 12), s[1] = (char)(0x80 | ((c >> 6) & 0x3f)), s[2] = (char)(0x80 | (c & 0x3f));
	s[n] = 0;
	return n;
}

/*
 * tokenizer/: merges.txt (the shipped file) and vocab.json as CLIP's SimpleTokenizer builds it from
 * them: the 256 byte characters of bytes_to_unicode (printable bytes first), the same with "</w>", one
 * entry per merge (the pair joined), then <|startoftext|> and <|endoftext|>: 49408 entries.
 */
static int write_tokenizer(const char *dir, const sd_model_random_report *rep)
{
	const char *merges = find_merges();
	if (!merges) {
		if (rep && rep->warn)
			rep->warn(rep->ctx, "clip-merges.txt not found (set SD_DATADIR): no tokenizer/ folder, the tools use their own");
		return 0;
	}
	size_t n;
	char *text = sd_read_file(merges, 64u << 20, &n);
	if (!text) return sd_preerr("%s", merges);
	char path[PATH_MAX + 64];
	snprintf(path, sizeof path, "%s/tokenizer", dir);
	int rc = make_dir(path);
	snprintf(path, sizeof path, "%s/tokenizer/merges.txt", dir);
	if (rc || write_text(path, text)) {
		free(text);
		return -1;
	}
	unsigned bs[256];
	int nb = 0, taken[256] = {0};
	for (unsigned b = '!'; b <= '~'; b++) bs[nb++] = b, taken[b] = 1;
	for (unsigned b = 0xa1; b <= 0xac; b++) bs[nb++] = b, taken[b] = 1;
	for (unsigned b = 0xae; b <= 0xff; b++) bs[nb++] = b, taken[b] = 1;
	unsigned cs[256];
	for (int i = 0; i < nb; i++) cs[i] = bs[i];
	for (unsigned b = 0, extra = 0; b < 256; b++)
		if (!taken[b]) bs[nb] = b, cs[nb++] = 256 + extra++;
	json_t *v = json_object();
	int id = 0;
	char tok[64];
	for (int i = 0; i < 256; i++) utf8(tok, cs[i]), json_object_set_new(v, tok, json_integer(id++));
	for (int i = 0; i < 256; i++) strcat(tok + utf8(tok, cs[i]), "</w>"), json_object_set_new(v, tok, json_integer(id++));
	/* merges: skip the "#version" line; CLIP keeps 49152 - 256 - 2 of them */
	char *line = strchr(text, '\n');
	for (int k = 0; line && k < 49152 - 256 - 2; k++) {
		char *s = line + 1, *e = strchr(s, '\n');
		if (!e || e == s) break;
		*e = 0;
		char *sp = strchr(s, ' ');
		if (!sp) {
			json_decref(v);
			free(text);
			return sd_seterr("%s: line %d is not a merge", merges, k + 2);
		}
		memmove(sp, sp + 1, strlen(sp + 1) + 1);
		json_object_set_new(v, s, json_integer(id++));
		line = e;
	}
	json_object_set_new(v, "<|startoftext|>", json_integer(id++));
	json_object_set_new(v, "<|endoftext|>", json_integer(id++));
	snprintf(path, sizeof path, "%s/tokenizer/vocab.json", dir);
	rc = json_dump_file(v, path, JSON_COMPACT | JSON_PRESERVE_ORDER) ? sd_seterr("%s: cannot write", path) : 0;
	json_decref(v);
	free(text);
	if (rc) return -1;
	snprintf(path, sizeof path, "%s/tokenizer/tokenizer_config.json", dir);
	if (write_text(path, tokenizer_config)) return -1;
	snprintf(path, sizeof path, "%s/tokenizer/special_tokens_map.json", dir);
	return write_text(path, special_tokens);
}

static void remove_tree(const char *dir)
{
	DIR *d = opendir(dir);
	if (d) {
		struct dirent *e;
		while ((e = readdir(d))) {
			if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
			char p[PATH_MAX];
			snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
			if (e->d_type == DT_DIR) remove_tree(p);
			else unlink(p);
		}
		closedir(d);
	}
	rmdir(dir);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void free_lists(struct list *L)
{
	for (int i = 0; i < 3; i++) {
		for (int k = 0; k < L[i].n; k++) free(L[i].e[k].name);
		free(L[i].e);
	}
}

/* The folder under its temporary name tmpdir (removed by the caller on failure). */
static int write_model(const char *tmpdir, json_t *const *cfg, const struct list *L, uint64_t seed,
                       const sd_model_random_report *rep)
{
	static const char *const comps[3] = {"text_encoder", "unet", "vae"};
	static const char *const files[3] = {"model.safetensors", "diffusion_pytorch_model.safetensors",
	                                     "diffusion_pytorch_model.safetensors"};
	char path[PATH_MAX + 64];
	json_error_t e;
	chmod(tmpdir, 0755);
	snprintf(path, sizeof path, "%s/model_index.json", tmpdir);
	if (write_text(path, model_index)) return -1;
	snprintf(path, sizeof path, "%s/scheduler", tmpdir);
	if (make_dir(path)) return -1;
	json_t *sch = json_loads(sd_sched_sd15_config(), 0, &e);
	json_object_set_new(sch, "_diffusers_version", json_string("0.25.1"));
	snprintf(path, sizeof path, "%s/scheduler/scheduler_config.json", tmpdir);
	int rc = write_json(path, sch);
	json_decref(sch);
	if (rc || write_tokenizer(tmpdir, rep)) return -1;
	for (int i = 0; i < 3; i++) {
		double t0 = now();
		snprintf(path, sizeof path, "%s/%s", tmpdir, comps[i]);
		if (make_dir(path)) return -1;
		snprintf(path, sizeof path, "%s/%s/config.json", tmpdir, comps[i]);
		if (write_json(path, cfg[i])) return -1;
		snprintf(path, sizeof path, "%s/%s/%s", tmpdir, comps[i], files[i]);
		if (write_st(path, &L[i], seed + (uint64_t)i)) return -1;
		if (rep && rep->component) rep->component(rep->ctx, comps[i], L[i].n, (long long)L[i].params, now() - t0);
	}
	return 0;
}

int sd_model_write_random(const char *config, const char *out, uint64_t seed, const sd_model_random_report *rep)
{
	static const char *const comps[3] = {"text_encoder", "unet", "vae"};
	json_error_t e;
	json_t *root;
	if (!strcmp(config, "tiny")) root = json_loads(tiny_json, 0, &e);
	else if (!strcmp(config, "sd15")) root = json_loads(sd15_json, 0, &e);
	else if (!(root = json_load_file(config, 0, &e))) return sd_seterr("%s: line %d: %s", config, e.line, e.text);
	int rc = -1;
	struct list L[3] = {{0}};
	json_t *cfg[3];
	char tmpdir[PATH_MAX];
	if (!json_is_object(root)) {
		sd_seterr("%s: not a JSON object", config);
		goto done;
	}
	for (int i = 0; i < 3; i++)
		if (!json_is_object(cfg[i] = json_object_get(root, comps[i]))) {
			sd_seterr("%s: no \"%s\" config (an object)", config, comps[i]);
			goto done;
		}
	clip_names(&L[0], cfg[0]);
	if (!L[0].bad) unet_names(&L[1], cfg[1]);
	if (!L[0].bad && !L[1].bad) vae_names(&L[2], cfg[2]);
	if (L[0].bad || L[1].bad || L[2].bad) goto done;

	struct stat st;
	if (lstat(out, &st) == 0) {
		sd_seterr("%s: already exists", out);
		goto done;
	}
	if (snprintf(tmpdir, sizeof tmpdir, "%s.tmp-XXXXXX", out) >= (int)sizeof tmpdir) {
		sd_seterr("%s: path too long", out);
		goto done;
	}
	if (!mkdtemp(tmpdir)) {
		sd_seterr("%s: %s", out, strerror(errno));
		goto done;
	}
	if (write_model(tmpdir, cfg, L, seed, rep) || (rename(tmpdir, out) && sd_seterr("%s: %s", out, strerror(errno))))
		remove_tree(tmpdir);
	else
		rc = 0;
done:
	free_lists(L);
	json_decref(root);
	return rc;
}
