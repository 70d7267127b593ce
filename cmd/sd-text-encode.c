/*
 * sd-text-encode - CLIP token ids to text-encoder hidden states (see sd-text-encode(1)).
 *
 *   sd-tokenize "a photo in the style of **" | sd-text-encode -m model | sd-info
 *
 * A filter in sd-tensor(5) terms: "tokens" (i32 [N,L]) → "context" (f32 [N,L,D]) and, when the frame
 * has them, "uncond_tokens" → "uncond_context", the last_hidden_state of transformers' CLIPTextModel
 * (lib/models/clip.c); every other key passes through.  Only the model's text encoder is loaded.
 * An SDXL model (text_encoder_2) takes "tokens" and "tokens_2" as StableDiffusionXLPipeline.encode_prompt
 * does: "context" = both penultimate states concatenated, "pooled" = text_encoder_2's text_embeds, and
 * the same for the unconditional keys (zeros for an empty negative prompt with force_zeros_for_empty_prompt).
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "sd.h"
#include "sd_cli.h"

struct opts {
	const char *model, *config, *device;
	int clip_skip; /* 0 = not given (the last layer) */
	int encode_empty; /* --encode-empty-negative: SDXL's empty negative prompt encoded, not zeros */
	const char **lora; /* --lora PATH[:SCALE], repeatable: adapters applied unmerged (lib/models/lora.c) */
	int nlora;
};

static void usage(void)
{
	printf("Usage: %s -m MODEL [OPTION]...\n"
	       "Encode CLIP token ids with a model's text encoder: reads a tensor stream, replaces\n"
	       "\"tokens\" (i32 [N,L]) with \"context\" (f32 [N,L,D]) and \"uncond_tokens\" with\n"
	       "\"uncond_context\", and passes every other key through.  L may be 77k: each chunk of 77\n"
	       "is encoded on its own; \"weights\" (f32 [N,L]) scale the states (A1111's emphasis).\n"
	       "An SDXL model also reads \"tokens_2\" (\"uncond_tokens_2\") and writes \"pooled\".\n"
	       "\n"
	       "  -m, --model PATH     diffusers folder, .safetensors or .ckpt (default: $SD_MODEL)\n"
	       "      --config DIR     diffusers folder whose text_encoder/config.json describes a\n"
	       "                       single-file model (default: $SD_MODEL_CONFIG)\n"
	       "      --clip-skip N    use the output of the layer N-1 before the last, then the final\n"
	       "                       layer norm (A1111's CLIP skip; 1 = the last layer, the default)\n"
	       "      --lora PATH[:SCALE]  apply a LoRA adapter's text-encoder part (PEFT folder, kohya or\n"
	       "                       diffusers file) with weight SCALE (default 1); repeatable\n"
	       "      --device DEV     cpu, cuda or auto (default: $SD_DEVICE, else auto)\n"
	       "      --encode-empty-negative  SDXL: encode an empty negative prompt instead of the zero\n"
	       "                       embeddings force_zeros_for_empty_prompt asks for\n"
	       "  -v, --verbose        report model loading and each frame on standard error\n"
	       "  -h, --help           display this help and exit\n"
	       "      --version        output version information and exit\n"
	       "\n"
	       "Example: sd-tokenize \"a photo in the style of **\" | %s -m model | sd-info\n",
	       sd_prog, sd_prog);
	exit(0);
}



/* Encode frame[in] into frame[out]; 0 when the frame has no `in` key. */
static int encode_key(sd_clip *clip, sd_value *frame, const char *in, const char *win, const char *out,
                      int clip_skip, long idx)
{
	sd_value *v = sd_map_get(frame, in);
	if (!v) return 0;
	if (v->type != SD_V_TENSOR) sd_die("stdin: frame %ld: \"%s\" is not a tensor", idx, in);
	const sd_tensor *t = v->u.t;
	char s[96];
	if (t->ndim != 2 || (t->dtype != SD_DTYPE_I32 && t->dtype != SD_DTYPE_I64))
		sd_die("stdin: frame %ld: \"%s\" is %s %s, expected i32 [N,77]", idx, in, sd_dtype_name(t->dtype),
		       sd_shape_str(t->ndim, t->shape, s, sizeof s));
	const int64_t N = t->shape[0], L = t->shape[1], D = sd_clip_get_config(clip)->hidden;
	sd_tensor *ctx = N > 0 && L > 0 ? sd_tensor_newv(SD_DTYPE_F32, 3, N, L, D) : NULL;
	sd_value *wv = sd_map_get(frame, win);
	if (wv && wv->type != SD_V_TENSOR) sd_die("stdin: frame %ld: \"%s\" is not a tensor", idx, win);
	if (!ctx || sd_prompt_encode(clip, ctx, t, wv ? wv->u.t : NULL, clip_skip) < 0)
		sd_die("stdin: frame %ld: \"%s\": %s", idx, in,
		       N > 0 && L > 0 ? sd_errmsg() : "an empty tensor holds no tokens");
	if (sd_map_set_tensor(frame, out, ctx) < 0) sd_die("stdin: frame %ld: %s", idx, sd_errmsg());
	return 1;
}

/* SDXL: frame[in, in2] → frame[out] (concatenated penultimate states) and frame[pooled]; zeros of the
 * same shapes when `zeros` (diffusers' force_zeros_for_empty_prompt).  0 when the frame lacks `in`. */
static int encode_sdxl(sd_clip *te1, sd_clip *te2, sd_value *frame, const char *in, const char *in2,
                       const char *out, const char *pooled, int zeros, long idx)
{
	const sd_value *v = sd_map_get(frame, in), *v2 = sd_map_get(frame, in2);
	if (!v) return 0;
	if (!v2)
		sd_die("stdin: frame %ld: no \"%s\" key: the model is SDXL (two text encoders, two tokenizers); "
		       "tokenize with sd-tokenize -m MODEL", idx, in2);
	if (v->type != SD_V_TENSOR || v2->type != SD_V_TENSOR)
		sd_die("stdin: frame %ld: \"%s\" or \"%s\" is not a tensor", idx, in, in2);
	if (v->u.t->ndim == 2 && v->u.t->shape[1] != SD_CLIP_MAX_LEN)
		sd_die("stdin: frame %ld: \"%s\" holds %lld tokens: prompts longer than 77 tokens are not built for SDXL yet",
		       idx, in, (long long)v->u.t->shape[1]);
	if (sd_map_get(frame, "weights") || sd_map_get(frame, "uncond_weights"))
		sd_die("stdin: frame %ld: prompt weights are not built for SDXL yet (tokenize with --no-weighting)", idx);
	sd_tensor *ctx, *pl;
	if (sd_clip_encode_sdxl_pair(te1, te2, v->u.t, v2->u.t, &ctx, &pl) < 0)
		sd_die("stdin: frame %ld: \"%s\": %s", idx, in, sd_errmsg());
	if (zeros) {
		memset(ctx->data, 0, sd_tensor_nbytes(ctx));
		memset(pl->data, 0, sd_tensor_nbytes(pl));
	}
	if (sd_map_set_tensor(frame, out, ctx) < 0 || sd_map_set_tensor(frame, pooled, pl) < 0)
		sd_die("stdin: frame %ld: %s", idx, sd_errmsg());
	return 1;
}

int main(int argc, char **argv)
{
	enum { OPT_CONFIG = 256, OPT_CLIP_SKIP, OPT_DEVICE, OPT_VERSION, OPT_LORA, OPT_EMPTY };
	static const struct option longopts[] = {
		{"model", required_argument, NULL, 'm'},
		{"config", required_argument, NULL, OPT_CONFIG},
		{"clip-skip", required_argument, NULL, OPT_CLIP_SKIP},
		{"device", required_argument, NULL, OPT_DEVICE},
		{"lora", required_argument, NULL, OPT_LORA},
		{"encode-empty-negative", no_argument, NULL, OPT_EMPTY},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, OPT_VERSION},
		{NULL, 0, NULL, 0},
	};
	static struct opts o; /* static: what it points to stays reachable until exit */
	int c;

	sd_cli_init_compute(argc, argv);
	if (!(o.lora = calloc(argc, sizeof *o.lora))) sd_die("out of memory");
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":m:vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'm': o.model = optarg; break;
		case OPT_CONFIG: o.config = optarg; break;
		case OPT_CLIP_SKIP: o.clip_skip = (int)sd_parse_int("--clip-skip", optarg, 1, 1000); break;
		case OPT_DEVICE: o.device = optarg; break;
		case OPT_LORA: o.lora[o.nlora++] = optarg; break;
		case OPT_EMPTY: o.encode_empty = 1; break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case OPT_VERSION: sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}
	if (optind < argc) sd_usage_error("unexpected argument '%s' (the stream comes on standard input)", argv[optind]);
	const char *env = getenv("SD_MODEL");
	if (!o.model && !(env && *env)) sd_usage_error("no model: give -m MODEL or set SD_MODEL");
	if (o.model && !*o.model) sd_usage_error("--model: the path is empty");
	if (o.device && strcasecmp(o.device, "cpu") && strcasecmp(o.device, "cuda") && strcasecmp(o.device, "auto"))
		sd_usage_error("--device: unknown device '%s' (expected cpu, cuda or auto)", o.device);
	enum sd_device dev;
	if (sd_device_parse(o.device, &dev) < 0) sd_die("--device: %s", sd_errmsg());

	double t0 = sd_now();
	sd_model *m = sd_model_open(o.model, o.config);
	if (!m) sd_die("%s", sd_errmsg());
	if (!sd_model_has(m, SD_TEXT_ENCODER))
		sd_die("%s: the model has no text encoder", sd_model_path(m));
	sd_weights *w = sd_weights_load_stored(m, SD_TEXT_ENCODER, dev);
	if (!w) sd_die("%s", sd_errmsg());
	sd_clip *clip = sd_clip_new(w);
	if (!clip) sd_die("%s: %s", sd_model_path(m), sd_errmsg());
	/* SDXL: never one encoder of two */
	sd_weights *w2 = NULL;
	sd_clip *clip2 = NULL;
	if (sd_model_has(m, SD_TEXT_ENCODER_2)) {
		if (o.clip_skip)
			sd_usage_error("--clip-skip: not supported with an SDXL model (it uses the penultimate layers)");
		if (!(w2 = sd_weights_load_stored(m, SD_TEXT_ENCODER_2, dev))) sd_die("%s", sd_errmsg());
		if (!(clip2 = sd_clip_new(w2))) sd_die("%s: text_encoder_2: %s", sd_model_path(m), sd_errmsg());
	}
	sd_lora *lora = sd_lora_load(o.lora, o.nlora);
	if (!lora || sd_lora_attach_clip(lora, clip, w) < 0 || (clip2 && sd_lora_attach_clip(lora, clip2, w2) < 0))
		sd_die("--lora: %s", sd_errmsg());
	if (o.nlora && !sd_lora_count(lora, SD_TEXT_ENCODER)) sd_info("--lora: no text-encoder adapter in the files given");
	const sd_clip_config *cfg = sd_clip_get_config(clip);
	if (o.clip_skip > cfg->layers)
		sd_usage_error("--clip-skip: %d is more than the text encoder's %d layers", o.clip_skip, cfg->layers);
	sd_info("%s (%s): text encoder, %d layers, width %d, %d heads, %lld parameters, %d LoRA layers, on %s, "
	        "%.2f s", sd_model_path(m), sd_model_format(m), cfg->layers, cfg->hidden, cfg->heads,
	        (long long)sd_weights_params(w), sd_lora_count(lora, SD_TEXT_ENCODER), sd_device_name(dev),
	        sd_now() - t0);

	sd_reader *r = sd_reader_new(stdin, "stdin");
	if (!r) sd_die_lib("stdin");
	long nframes = 0;
	sd_value *frame;
	int rc;
	while ((rc = sd_reader_next(r, &frame)) == 1) {
		long idx = sd_reader_index(r);
		double t1 = sd_now();
		if (!sd_map_get(frame, "tokens"))
			sd_die("stdin: frame %ld: no \"tokens\" key (sd-tokenize makes it)", idx);
		int un;
		if (clip2) {
			const char *neg = sd_map_str(frame, "negative_prompt");
			int zeros = sd_model_force_zeros(m) && !o.encode_empty && (!neg || !*neg);
			encode_sdxl(clip, clip2, frame, "tokens", "tokens_2", "context", "pooled", 0, idx);
			un = encode_sdxl(clip, clip2, frame, "uncond_tokens", "uncond_tokens_2", "uncond_context",
			                 "uncond_pooled", zeros, idx);
		} else {
			encode_key(clip, frame, "tokens", "weights", "context", o.clip_skip, idx);
			un = encode_key(clip, frame, "uncond_tokens", "uncond_weights", "uncond_context", o.clip_skip, idx);
		}
		sd_write_frame_or_die(frame);
		sd_info("frame %ld: context%s, %.3f s", idx, un ? " and uncond_context" : "", sd_now() - t1);
		sd_value_free(frame);
		nframes++;
	}
	if (rc < 0) sd_die("%s", sd_errmsg());
	if (nframes == 0) sd_die("stdin: no frames on input");
	sd_reader_free(r);
	sd_clip_free(clip);
	sd_clip_free(clip2);
	sd_lora_free(lora);
	sd_weights_free(w);
	sd_weights_free(w2);
	sd_model_close(m);
	sd_close_stdout();
	return 0;
}
