/*
 * sd-info - a readable summary of a tensor stream, a .safetensors file, or a folder of them (see
 * sd-info(1)).  The `file`/`pamfile` of sdpipe:
 *
 *   pngtopnm in.png | pnmtotensor | sd-info
 *   sd-info unet/diffusion_pytorch_model.safetensors
 *
 * Streams: per frame, each key with its value; tensors as dtype, shape, and min/max/mean computed in
 * double over every element (f16/bf16 converted).  Safetensors: each tensor's name, dtype and shape, the
 * header's __metadata__, and the parameter count.  What an argument is follows its name: a folder, a
 * name ending in .safetensors, else a stream ("-" or no argument: standard input).  With -m MODEL: the
 * model's layout, its components with their parameter counts and configs (any layout sd_model_open
 * reads), and no stream unless FILEs are named too.  The summaries are lib/io/info.c's and
 * lib/models/info.c's; this file is the options and the loop over the arguments.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "sd.h"
#include "sd_cli.h"

static void usage(void)
{
	printf("Usage: %s [OPTION]... [FILE]...\n"
	       "Summarise tensor streams, .safetensors files and folders holding them.\n"
	       "For a stream (standard input when there is no FILE or FILE is -): every frame's keys,\n"
	       "with dtype, shape and min/max/mean for tensors and the value for metadata.\n"
	       "For a .safetensors file: every tensor's name, dtype and shape, the __metadata__ and the\n"
	       "parameter count.  For a folder: the same for every .safetensors file in it (recursively),\n"
	       "and the names of its config.json files.\n"
	       "\n"
	       "  -m, --model PATH  summarise a model (diffusers folder, single-file .safetensors or\n"
	       "                    .ckpt; default $SD_MODEL): layout, components, parameter counts, configs\n"
	       "      --config DIR  a diffusers folder whose config.json files describe a single file\n"
	       "  -v, --verbose  (accepted for symmetry with the other tools)\n"
	       "  -h, --help     display this help and exit\n"
	       "      --version  output version information and exit\n"
	       "\n"
	       "Example: pngtopnm in.png | pnmtotensor | %s\n", sd_prog, sd_prog);
	exit(0);
}


/* ==== main ==== */

static int has_suffix(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);
	return n >= m && !strcmp(s + n - m, suffix);
}

/* Every frame of one stream; frames are printed as they are read, so a bad frame stops after the good
 * ones before it. */
static void show_stream(const char *path)
{
	const char *name = !path || !strcmp(path, "-") ? "stdin" : path;
	FILE *f = sd_open_in(path);
	if (sd_stream_summarize(stdout, f, name)) sd_die("%s", sd_errmsg());
	if (f != stdin) fclose(f);
}

/* What an argument is follows its name: a folder, a name ending in .safetensors, else a stream. */
static void show(const char *path)
{
	struct stat st;
	if (!path || !strcmp(path, "-")) { show_stream(NULL); return; }
	if (stat(path, &st) < 0) sd_die("%s: %s", path, strerror(errno));
	if (S_ISDIR(st.st_mode)) {
		if (sd_folder_summarize(stdout, path)) sd_die("%s", sd_errmsg());
	} else if (has_suffix(path, ".safetensors")) {
		if (sd_st_summarize(stdout, path, NULL)) sd_die("%s", sd_errmsg());
	} else show_stream(path);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"model", required_argument, NULL, 'm'},
		{"config", required_argument, NULL, 'C'},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0},
	};
	int c;
	const char *model = NULL, *config = NULL;

	sd_cli_init(argc, argv);
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":m:vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'm': model = optarg; break;
		case 'C': config = optarg; break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case 'V': sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}

	if (model) {
		if (sd_model_summarize(stdout, model, config)) sd_die("%s", sd_errmsg());
		if (optind < argc) printf("\n");
	} else if (config) {
		sd_usage_error("--config needs -m MODEL");
	}
	if (optind == argc && !model) show(NULL);
	for (int i = optind; i < argc; i++) {
		if (argc - optind > 1) printf("%s==> %s <==\n", i > optind ? "\n" : "", argv[i]);
		show(argv[i]);
	}
	sd_close_stdout();
	return 0;
}
