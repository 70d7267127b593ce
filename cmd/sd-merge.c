/*
 * sd-merge - bake LoRA adapters into a checkpoint, merge checkpoints, convert layouts and dtypes (see
 * sd-merge(1)).  Not a filter: it reads models and writes one.
 *
 *   sd-merge -m sd15 --lora style.safetensors:0.8 -o sd15-style.safetensors
 *   sd-merge --weighted a.safetensors:0.7 b.safetensors:0.3 -o ab
 *   sd-merge --add-difference a b c --multiplier 1 -o a-plus-b-minus-c
 *
 * Per component (text encoder, VAE, UNet, whichever the models hold): load the weights (f32, CPU), merge
 * the checkpoints (weighted sum, or A + (B − C)·k), merge the adapters (W + scale·B·A, lib/models/lora.c),
 * then write every component as a diffusers folder or a single-file LDM .safetensors (lib/models/merge.c),
 * atomically.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <strings.h>

#include "sd.h"
#include "sd_cli.h"

enum mode { BASE, WEIGHTED, ADD_DIFFERENCE };
enum layout { LAYOUT_AUTO, LAYOUT_DIFFUSERS, LAYOUT_SINGLE };

struct opts {
	const char *model, *config, *output;
	const char **lora;
	int nlora;
	enum mode mode;
	const char **models; /* --weighted / --add-difference: the first from the option, then the operands */
	int nmodels;
	double multiplier;
	int has_multiplier;
	enum layout layout;
	enum sd_dtype dtype;
};

static void usage(void)
{
	printf("Usage: %s -m MODEL [--lora PATH[:SCALE]]... -o OUT [OPTION]...\n"
	       "  or:  %s --weighted MODEL:W MODEL:W... -o OUT [OPTION]...\n"
	       "  or:  %s --add-difference A B C [--multiplier K] -o OUT [OPTION]...\n"
	       "Write a new Stable Diffusion checkpoint: a model with LoRA adapters baked into its weights\n"
	       "(W + scale*B*A), a weighted sum of checkpoints, or A + (B - C)*K; in the layout and dtype asked.\n"
	       "\n"
	       "  -m, --model PATH         the base model: diffusers folder, .safetensors or .ckpt\n"
	       "                           (default: $SD_MODEL)\n"
	       "      --config DIR         diffusers folder whose configs describe single-file inputs\n"
	       "      --lora PATH[:SCALE]  merge a LoRA adapter (PEFT folder, kohya or diffusers file) with\n"
	       "                           weight SCALE (default 1), into every component it holds; repeatable\n"
	       "      --weighted M:W       the weighted sum of the models given (this one and the operands, each\n"
	       "                           MODEL:WEIGHT; the weights are used as given, not normalised)\n"
	       "      --add-difference A   A + (B - C)*K, with B and C the two operands\n"
	       "      --multiplier K       K for --add-difference (default 1)\n"
	       "      --to LIST            output layout and dtype, comma-separated: diffusers (a folder) or\n"
	       "                           single (one LDM .safetensors); f32, f16 or bf16 (default: single\n"
	       "                           when OUT ends in .safetensors, else diffusers; f32)\n"
	       "  -o, --output OUT         the file or folder to write (a folder must not exist yet)\n"
	       "  -v, --verbose            report each step on standard error\n"
	       "  -h, --help               display this help and exit\n"
	       "      --version            output version information and exit\n"
	       "\n"
	       "Example: %s -m sd15 --lora style/:0.8 -o sd15-style.safetensors\n",
	       sd_prog, sd_prog, sd_prog, sd_prog);
	exit(0);
}

static void parse_to(struct opts *o, const char *arg)
{
	char *s = strdup(arg), *save = NULL;
	if (!s) sd_die("out of memory");
	for (char *t = strtok_r(s, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		if (!strcasecmp(t, "diffusers")) o->layout = LAYOUT_DIFFUSERS;
		else if (!strcasecmp(t, "single")) o->layout = LAYOUT_SINGLE;
		else if (!strcasecmp(t, "f32") || !strcasecmp(t, "fp32")) o->dtype = SD_DTYPE_F32;
		else if (!strcasecmp(t, "f16") || !strcasecmp(t, "fp16")) o->dtype = SD_DTYPE_F16;
		else if (!strcasecmp(t, "bf16")) o->dtype = SD_DTYPE_BF16;
		else sd_usage_error("--to: unknown '%s' (expected diffusers, single, f32, f16 or bf16)", t);
	}
	free(s);
}

static int ends_with(const char *s, const char *suf)
{
	size_t a = strlen(s), b = strlen(suf);
	return a >= b && !strcasecmp(s + a - b, suf);
}

int main(int argc, char **argv)
{
	enum { OPT_CONFIG = 256, OPT_LORA, OPT_WEIGHTED, OPT_ADD_DIFF, OPT_MULT, OPT_TO, OPT_VERSION };
	static const struct option longopts[] = {
		{"model", required_argument, NULL, 'm'},
		{"config", required_argument, NULL, OPT_CONFIG},
		{"lora", required_argument, NULL, OPT_LORA},
		{"weighted", required_argument, NULL, OPT_WEIGHTED},
		{"add-difference", required_argument, NULL, OPT_ADD_DIFF},
		{"multiplier", required_argument, NULL, OPT_MULT},
		{"to", required_argument, NULL, OPT_TO},
		{"output", required_argument, NULL, 'o'},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, OPT_VERSION},
		{NULL, 0, NULL, 0},
	};
	static struct opts o = {.multiplier = 1.0, .dtype = SD_DTYPE_F32}; /* static: reachable until exit */
	int c;

	sd_cli_init_compute(argc, argv);
	o.lora = calloc(argc, sizeof *o.lora);
	o.models = calloc(argc, sizeof *o.models);
	if (!o.lora || !o.models) sd_die("out of memory");
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":m:o:vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'm': o.model = optarg; break;
		case OPT_CONFIG: o.config = optarg; break;
		case OPT_LORA: o.lora[o.nlora++] = optarg; break;
		case OPT_WEIGHTED:
		case OPT_ADD_DIFF: {
			enum mode m = c == OPT_WEIGHTED ? WEIGHTED : ADD_DIFFERENCE;
			if (o.mode != BASE && o.mode != m) sd_usage_error("--weighted and --add-difference exclude each other");
			if (o.mode == m) sd_usage_error("--%s given twice (the other models follow as operands)", m == WEIGHTED ? "weighted" : "add-difference");
			o.mode = m;
			o.models[o.nmodels++] = optarg;
			break;
		}
		case OPT_MULT:
			o.multiplier = sd_parse_float("--multiplier", optarg, -1e6, 1e6);
			o.has_multiplier = 1;
			break;
		case OPT_TO: parse_to(&o, optarg); break;
		case 'o': o.output = optarg; break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case OPT_VERSION: sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}
	/* operands: the other models of --weighted / --add-difference */
	if (optind < argc && o.mode == BASE)
		sd_usage_error("unexpected argument '%s' (models to merge follow --weighted or --add-difference)", argv[optind]);
	while (optind < argc) o.models[o.nmodels++] = argv[optind++];
	if (!o.output || !*o.output) sd_usage_error("no output: give -o OUT");
	if (o.mode != BASE && o.model) sd_usage_error("-m and --%s exclude each other",
	                                              o.mode == WEIGHTED ? "weighted" : "add-difference");
	if (o.mode == ADD_DIFFERENCE && o.nmodels != 3)
		sd_usage_error("--add-difference takes three models A B C (got %d)", o.nmodels);
	if (o.mode == WEIGHTED && o.nmodels < 2) sd_usage_error("--weighted takes two or more MODEL:WEIGHT");
	if (o.has_multiplier && o.mode != ADD_DIFFERENCE) sd_usage_error("--multiplier goes with --add-difference");
	if (o.mode == BASE) {
		const char *env = getenv("SD_MODEL");
		if (!o.model && !(env && *env)) sd_usage_error("no model: give -m MODEL or set SD_MODEL");
		o.models[o.nmodels++] = o.model ? o.model : env;
	}
	struct stat st;
	if (lstat(o.output, &st) == 0) sd_die("%s: already exists (remove it first)", o.output); /* before any work */
	enum layout layout = o.layout != LAYOUT_AUTO ? o.layout
	                     : ends_with(o.output, ".safetensors") ? LAYOUT_SINGLE : LAYOUT_DIFFUSERS;

	/* the models and their factors */
	int n = o.nmodels;
	sd_model **m = calloc(n, sizeof *m);
	float *f = calloc(n, sizeof *f);
	if (!m || !f) sd_die("out of memory");
	for (int i = 0; i < n; i++) {
		char *path = NULL;
		float wt = 1.0f;
		if (o.mode == WEIGHTED) {
			const char *colon = strrchr(o.models[i], ':');
			if (!colon) sd_usage_error("--weighted: '%s' has no :WEIGHT", o.models[i]);
			wt = (float)sd_parse_float("--weighted", colon + 1, -1e6, 1e6);
			if (!(path = strndup(o.models[i], colon - o.models[i]))) sd_die("out of memory");
		} else if (!(path = strdup(o.models[i])))
			sd_die("out of memory");
		f[i] = o.mode == WEIGHTED ? wt : o.mode == ADD_DIFFERENCE ? (i == 0 ? 1.0f : i == 1 ? (float)o.multiplier
		                                                                                  : (float)-o.multiplier)
		                                                          : 1.0f;
		if (!(m[i] = sd_model_open(path, o.config))) sd_die("%s", sd_errmsg());
		free(path);
	}
	sd_lora *lora = sd_lora_load(o.lora, o.nlora);
	if (!lora) sd_die("--lora: %s", sd_errmsg());

	double t0 = sd_now();
	sd_weights *ws[SD_COMPONENT_COUNT] = {0};
	int ncomp = 0;
	for (int k = 0; k < SD_COMPONENT_COUNT; k++) {
		int have = 0;
		for (int i = 0; i < n; i++) have += sd_model_has(m[i], k);
		if (have == 0) {
			if (sd_lora_count(lora, k))
				sd_die("--lora: the adapters hold a %s part, but the model has no %s", sd_component_name(k),
				       sd_component_name(k));
			continue;
		}
		if (have != n)
			sd_die("the models do not all hold a %s (%d of %d do)", sd_component_name(k), have, n);
		/* first model scaled by its factor, then the others added, each loaded in turn */
		if (!(ws[k] = sd_weights_load(m[0], k, SD_DEVICE_CPU))) sd_die("%s", sd_errmsg());
		for (int i = 1; i < n; i++) {
			sd_weights *x = sd_weights_load(m[i], k, SD_DEVICE_CPU);
			if (!x) sd_die("%s", sd_errmsg());
			if (sd_weights_axpby(ws[k], i == 1 ? f[0] : 1.0f, x, f[i]) < 0)
				sd_die("%s and %s: %s", sd_model_path(m[0]), sd_model_path(m[i]), sd_errmsg());
			sd_weights_free(x);
		}
		if (n == 1 && f[0] != 1.0f && sd_weights_axpby(ws[k], 0.0f, ws[k], f[0]) < 0) sd_die("%s", sd_errmsg());
		if (sd_lora_merge(lora, ws[k]) < 0) sd_die("--lora: %s", sd_errmsg());
		sd_info("%s: %lld parameters, %d LoRA layers merged (%.2f s)", sd_component_name(k),
		        (long long)sd_weights_params(ws[k]), sd_lora_count(lora, k), sd_now() - t0);
		ncomp++;
	}
	if (!ncomp) sd_die("the model%s hold%s no component", n > 1 ? "s" : "", n > 1 ? "" : "s");

	int rc = layout == LAYOUT_SINGLE
	             ? sd_model_write_single(o.output, ws, o.dtype)
	             : sd_model_write_diffusers(o.output, ws, o.dtype, sd_model_tokenizer_dir(m[0]),
	                                        sd_model_scheduler_json(m[0]));
	if (rc < 0) sd_die("%s", sd_errmsg());
	sd_info("wrote %s (%s, %s, %.2f s)", o.output, layout == LAYOUT_SINGLE ? "single file" : "diffusers folder",
	        sd_dtype_name(o.dtype), sd_now() - t0);
	for (int k = 0; k < SD_COMPONENT_COUNT; k++) sd_weights_free(ws[k]);
	for (int i = 0; i < n; i++) sd_model_close(m[i]);
	sd_lora_free(lora);
	free(m);
	free(f);
	free(o.lora);
	free(o.models);
	sd_close_stdout();
	return 0;
}
