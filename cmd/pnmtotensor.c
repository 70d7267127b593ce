/*
 * pnmtotensor - PBM/PGM/PPM/PAM images to a tensor stream, one frame per image (see pnmtotensor(1)).
 *
 *   pngtopnm in.png | pnmtotensor | sd-info
 *
 * A source in sd-tensor(5) terms: each image of each input (several files, or several images one after
 * another in one file, as netpbm streams allow) becomes a frame {"image": f32 [1,C,H,W] in [0,1],
 * "maxval": the file's maxval, "source": the file name or "-"}.
 */
#include <stdlib.h>
#include <string.h>

#include "sd.h"
#include "sd_cli.h"

static void usage(void)
{
	printf("Usage: %s [OPTION]... [FILE]...\n"
	       "Convert PBM, PGM, PPM and PAM images to a tensor stream: one frame per image, with\n"
	       "\"image\" (f32 [1,C,H,W], values sample/maxval in [0,1]), \"maxval\" and \"source\".\n"
	       "With no FILE, or when FILE is -, read standard input.\n"
	       "\n"
	       "  -v, --verbose  report each image on standard error\n"
	       "  -h, --help     display this help and exit\n"
	       "      --version  output version information and exit\n"
	       "\n"
	       "Example: pngtopnm in.png | %s | sd-info\n", sd_prog, sd_prog);
	exit(0);
}

/* getopt_long's complaint as one usage error (opterr is off so that stderr gets exactly one line plus
 * the "Try" line). */

/* Convert every image of one input; returns the number of images (0 is an error for the caller). */
static long convert(const char *path)
{
	int is_stdin = !path || strcmp(path, "-") == 0;
	const char *name = is_stdin ? "stdin" : path;
	FILE *f = sd_open_in(path);
	sd_pnm_reader *r = sd_pnm_reader_new(f, name);
	if (!r) sd_die("%s: %s", name, sd_errmsg());

	long n = 0;
	for (;;) {
		sd_tensor *img;
		int maxval = 0;
		int rc = sd_pnm_read(r, &img, &maxval);
		if (rc < 0) sd_die("%s", sd_errmsg());
		if (rc == 0) break;
		if (sd_verbose) {
			char s[96];
			sd_info("%s: image %ld: %s, maxval %d", name, n + 1,
			        sd_shape_str(img->ndim, img->shape, s, sizeof s), maxval);
		}
		sd_value *frame = sd_value_map();
		if (!frame || sd_map_set_tensor(frame, "image", img) < 0 ||
		    sd_map_set_int(frame, "maxval", maxval) < 0 ||
		    sd_map_set_str(frame, "source", is_stdin ? "-" : path) < 0)
			sd_die("%s: %s", name, sd_errmsg());
		sd_write_frame_or_die(frame);
		sd_value_free(frame);
		n++;
	}
	sd_pnm_reader_free(r);
	if (n == 0) sd_die("%s: no image on input (empty input)", name);
	if (!is_stdin) fclose(f);
	return n;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0},
	};
	int c;

	sd_cli_init(argc, argv);
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case 'V': sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}

	long total = 0;
	if (optind == argc) total += convert(NULL);
	for (int i = optind; i < argc; i++) total += convert(argv[i]);
	sd_info("%ld image%s", total, total == 1 ? "" : "s");
	sd_close_stdout();
	return 0;
}
