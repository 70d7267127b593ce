/*
 * tensortopnm - a tensor stream to PGM/PPM images (see tensortopnm(1)).  A sink in sd-tensor(5) terms:
 *
 *   ... | sd-vae-decode | tensortopnm | pnmtopng > out.png
 *
 * Every frame's "image" (f32, or f16/bf16/f64 converted; [N,C,H,W] or [C,H,W], C = 1 → PGM, C = 3 →
 * PPM) becomes N raw images on standard output, one after another as netpbm streams allow, or one file
 * per image with -o PATTERN.  Each image is encoded in memory and written with one write, and a frame
 * is checked whole before any of its images is written.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "sd.h"
#include "sd_cli.h"

struct opts {
	int maxval;          /* --maxval, 255 by default */
	const char *key;     /* --key, "image" by default */
	const char *pattern; /* -o, NULL for stdout */
	int force;           /* -f: replace existing files */
};

static void usage(void)
{
	printf("Usage: %s [OPTION]... [FILE]\n"
	       "Write the \"image\" tensor of every frame of a tensor stream as raw PGM (1 channel) or PPM\n"
	       "(3 channels) images, values in [0,1] clamped and scaled to maxval.  A batch [N,C,H,W] gives\n"
	       "N images.  With no FILE, or when FILE is -, read standard input.\n"
	       "\n"
	       "      --maxval N     maxval of the images written, 1..65535 (default 255; 65535 for 16 bits)\n"
	       "  -k, --key KEY      write the tensor KEY instead of \"image\"\n"
	       "  -o, --output PATTERN\n"
	       "                     write image number i (from 0) to the file PATTERN with %%d replaced\n"
	       "                     by i (printf style, e.g. out%%03d.ppm) instead of standard output;\n"
	       "                     an existing file is not replaced\n"
	       "  -f, --force        replace existing files\n"
	       "  -v, --verbose      report each image on standard error\n"
	       "  -h, --help         display this help and exit\n"
	       "      --version      output version information and exit\n"
	       "\n"
	       "Example: pngtopnm in.png | pnmtotensor | %s | pnmtopng > out.png\n", sd_prog, sd_prog);
	exit(0);
}


int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"maxval", required_argument, NULL, 'M'},
		{"key", required_argument, NULL, 'k'},
		{"output", required_argument, NULL, 'o'},
		{"force", no_argument, NULL, 'f'},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0},
	};
	struct opts o = {.maxval = 255, .key = "image", .pattern = NULL};
	int c;

	sd_cli_init(argc, argv);
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":k:o:fvh", longopts, NULL)) != -1) {
		switch (c) {
		case 'M': o.maxval = (int)sd_parse_int("--maxval", optarg, 1, 65535); break;
		case 'k': o.key = optarg; break;
		case 'o':
			if (sd_count_pattern(optarg) != 1) sd_usage_error("-o: '%s' must contain exactly one %%d", optarg);
			o.pattern = optarg;
			break;
		case 'f': o.force = 1; break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case 'V': sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}
	if (argc - optind > 1) sd_usage_error("too many files (one stream at a time)");
	if (!*o.key) sd_usage_error("--key: the key is empty");

	const char *path = optind < argc ? argv[optind] : NULL;
	const char *name = !path || !strcmp(path, "-") ? "stdin" : path;
	FILE *in = sd_open_in(path);
	sd_reader *r = sd_reader_new(in, name);
	if (!r) sd_die_lib("%s", name);

	long nimages = 0, nframes = 0;
	sd_value *frame;
	int rc;
	while ((rc = sd_reader_next(r, &frame)) == 1) {
		long idx = sd_reader_index(r);
		sd_tensor *conv;
		const sd_tensor *t = sd_frame_image(frame, o.key, name, idx, "1 (PGM) or 3 (PPM)", &conv);
		const int o3 = t->ndim - 3;
		const int64_t N = t->ndim == 4 ? t->shape[0] : 1;
		const int64_t chw[3] = {t->shape[o3], t->shape[o3 + 1], t->shape[o3 + 2]};
		const size_t stride = (size_t)(chw[0] * chw[1] * chw[2]);

		for (int64_t n = 0; n < N; n++) {
			sd_warn_nonfinite((const float *)t->data + n * stride, stride, name, idx, n + 1);
			sd_tensor *one = sd_tensor_wrap(SD_DTYPE_F32, 3, chw, (float *)t->data + n * stride);
			char *buf;
			size_t len;
			if (!one || sd_pnm_pack(one, o.maxval, &buf, &len) < 0)
				sd_die("%s: frame %ld: \"%s\": %s", name, idx, o.key, sd_errmsg());
			sd_tensor_free(one);
			if (o.pattern) {
				char file[4096];
				int k = snprintf(file, sizeof file, o.pattern, (int)nimages);
				if (k < 0 || (size_t)k >= sizeof file) sd_die("-o: file name too long");
				struct stat st;
				if (!o.force && lstat(file, &st) == 0)
					sd_die("%s: exists; refusing to replace it (use --force)", file);
				if (sd_write_file_atomic(file, buf, len) < 0) sd_die_lib("%s", file);
				sd_info("frame %ld: wrote %s", idx, file);
			} else {
				if (fwrite(buf, 1, len, stdout) != len) sd_die("write error: stdout");
				sd_info("frame %ld: image %lld of %lld: %lldx%lld, %lld channel%s", idx,
				        (long long)n + 1, (long long)N, (long long)chw[2], (long long)chw[1],
				        (long long)chw[0], chw[0] == 1 ? "" : "s");
			}
			free(buf);
			nimages++;
		}
		sd_tensor_free(conv);
		sd_value_free(frame);
		nframes++;
	}
	if (rc < 0) sd_die("%s", sd_errmsg());
	if (nframes == 0) sd_die("%s: no frames on input", name);
	sd_reader_free(r);
	sd_info("%ld frame%s, %ld image%s", nframes, nframes == 1 ? "" : "s", nimages, nimages == 1 ? "" : "s");
	sd_close_stdout();
	return 0;
}
