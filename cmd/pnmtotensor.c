/*
 * pnmtotensor - PBM/PGM/PPM/PAM, PNG and JPEG images to a tensor stream, one frame per image (see
 * pnmtotensor(1)).
 *
 *   pnmtotensor in.png | sd-info
 *
 * A source in sd-tensor(5) terms: each image of each input becomes a frame {"image": f32 [1,C,H,W] in
 * [0,1], "maxval": the file's maxval, "source": the file name or "-"}, plus "parameters" (the A1111
 * generation text) when a PNG carries one.  The format is chosen by the input's first byte (one byte
 * of look-ahead, so a pipe works too): PNM inputs may hold several images one after another, as netpbm
 * streams allow; a PNG or JPEG input is one image, read whole into memory (lib/io/image.c).
 */
#include <stdlib.h>
#include <string.h>

#include "sd.h"
#include "sd_cli.h"

static void usage(void)
{
	printf("Usage: %s [OPTION]... [FILE]...\n"
	       "Convert PBM, PGM, PPM, PAM, PNG and JPEG images to a tensor stream: one frame per image,\n"
	       "with \"image\" (f32 [1,C,H,W], values sample/maxval in [0,1]), \"maxval\" and \"source\",\n"
	       "and \"parameters\" when a PNG holds that text.  The format is found from the data; a PNM\n"
	       "input may hold several images.  With no FILE, or when FILE is -, read standard input.\n"
	       "\n"
	       "  -v, --verbose  report each image on standard error\n"
	       "  -h, --help     display this help and exit\n"
	       "      --version  output version information and exit\n"
	       "\n"
	       "Example: %s in.png | sd-info\n", sd_prog, sd_prog);
	exit(0);
}

/* Write one frame for an image (img is taken); params, when not NULL, is a PNG's "parameters" text. */
static void put_frame(const char *name, const char *source, sd_tensor *img, int maxval, const char *params)
{
	sd_value *frame = sd_value_map();
	if (!frame || sd_map_set_tensor(frame, "image", img) < 0 || sd_map_set_int(frame, "maxval", maxval) < 0 ||
	    sd_map_set_str(frame, "source", source) < 0 || (params && sd_map_set_str(frame, "parameters", params) < 0))
		sd_die("%s: %s", name, sd_errmsg());
	sd_write_frame_or_die(frame);
	sd_value_free(frame);
}

/* Convert every image of one input; returns the number of images (0 is an error for the caller). */
static long convert(const char *path)
{
	int is_stdin = !path || strcmp(path, "-") == 0;
	const char *name = is_stdin ? "stdin" : path, *source = is_stdin ? "-" : path;
	FILE *f = sd_open_in(path);
	char s[96];

	/* One byte of look-ahead (all that ungetc promises) tells PNG (0x89) and JPEG (0xFF) from PNM ('P');
	 * the decoder checks the rest of the signature. */
	int c0 = getc(f);
	if (c0 != EOF) ungetc(c0, f);
	if (c0 == 0x89 || c0 == 0xff) {
		int maxval = 0;
		sd_value *text = NULL;
		sd_tensor *img = sd_image_read(f, name, &maxval, &text);
		if (!img) sd_die("%s", sd_errmsg());
		sd_info("%s: %s, maxval %d", name, sd_shape_str(img->ndim, img->shape, s, sizeof s), maxval);
		put_frame(name, source, img, maxval, text ? sd_map_str(text, "parameters") : NULL);
		sd_value_free(text);
		if (!is_stdin) fclose(f);
		return 1;
	}
	if (c0 != EOF && c0 != 'P') sd_die("%s: not a PNM, PNG or JPEG image", name);

	sd_pnm_reader *r = sd_pnm_reader_new(f, name);
	if (!r) sd_die("%s: %s", name, sd_errmsg());
	long n = 0;
	for (;;) {
		sd_tensor *img;
		int maxval = 0;
		int rc = sd_pnm_read(r, &img, &maxval);
		if (rc < 0) sd_die("%s", sd_errmsg());
		if (rc == 0) break;
		sd_info("%s: image %ld: %s, maxval %d", name, n + 1, sd_shape_str(img->ndim, img->shape, s, sizeof s),
		        maxval);
		put_frame(name, source, img, maxval, NULL);
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
