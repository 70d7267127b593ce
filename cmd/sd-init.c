/*
 * sd-init - write a Stable Diffusion 1.x model with deterministic random weights in diffusers' folder
 * layout (see sd-init(1)), for demos, tests and benchmarks:
 *
 *   sd-init --config sd15 -o sd15-random && make bench SD_MODEL=sd15-random
 *
 * The model descriptions, the names and shapes of every tensor and the random weights are
 * lib/models/init.c's (sd_model_write_random); this file parses the options and reports.
 */
#include <stdlib.h>
#include <string.h>

#include "sd.h"
#include "sd_cli.h"

static void usage(void)
{
	printf("Usage: %s --config tiny|sd15|FILE.json -o OUT [--seed S]\n"
	       "Write a Stable Diffusion 1.x model with deterministic random weights as a diffusers folder\n"
	       "OUT (model_index.json, scheduler/, tokenizer/, text_encoder/, unet/, vae/), for demos,\n"
	       "tests and benchmarks.  OUT must not exist; it appears whole or not at all.\n"
	       "\n"
	       "  -c, --config CFG     tiny (the test fixture's sizes, 3.7 M parameters), sd15 (SD 1.5's,\n"
	       "                       1.07 G parameters, 4.3 GB), or a JSON file {\"text_encoder\": {...},\n"
	       "                       \"unet\": {...}, \"vae\": {...}} of diffusers/transformers configs\n"
	       "  -o, --output OUT     the folder to write\n"
	       "      --seed S         seed of the weights (default 0)\n"
	       "  -v, --verbose        report each component on standard error\n"
	       "  -h, --help           display this help and exit\n"
	       "      --version        output version information and exit\n"
	       "\n"
	       "Example: %s --config tiny -o tiny-random && sd-info -m tiny-random\n",
	       sd_prog, sd_prog);
	exit(0);
}

static void on_warn(void *ctx, const char *msg)
{
	sd_warn("%s", msg);
}

static void on_component(void *ctx, const char *name, int tensors, long long params, double seconds)
{
	sd_info("%s: %d tensors, %lld parameters, %.1f s", name, tensors, params, seconds);
}

int main(int argc, char **argv)
{
	enum { OPT_SEED = 256, OPT_VERSION };
	static const struct option longopts[] = {
		{"config", required_argument, NULL, 'c'},
		{"output", required_argument, NULL, 'o'},
		{"seed", required_argument, NULL, OPT_SEED},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, OPT_VERSION},
		{NULL, 0, NULL, 0},
	};
	const char *config = NULL, *out = NULL;
	uint64_t seed = 0;
	int c;

	sd_cli_init(argc, argv);
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":c:o:vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'c': config = optarg; break;
		case 'o': out = optarg; break;
		case OPT_SEED: seed = (uint64_t)sd_parse_int("--seed", optarg, 0, INT64_MAX); break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case OPT_VERSION: sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}
	if (optind < argc) sd_usage_error("unexpected argument '%s'", argv[optind]);
	if (!config) sd_usage_error("no configuration: give --config tiny, sd15 or FILE.json");
	if (!out || !*out) sd_usage_error("no output folder: give -o OUT");

	sd_model_random_report rep = {on_warn, on_component, NULL};
	if (sd_model_write_random(config, out, seed, &rep)) sd_die("%s", sd_errmsg());
	sd_info("%s: %s model, seed %llu", out, config, (unsigned long long)seed);
	return 0;
}
