/*
 * tensortopng - a tensor stream to PNG files that carry their generation parameters (see
 * tensortopng(1)).  A sink in sd-tensor(5) terms, like tensortopnm:
 *
 *   ... | sd-vae-decode -m tiny | tensortopng -o out.png
 *
 * Every image of every frame's "image" (f32, or f16/bf16/f64 converted; [N,C,H,W] or [C,H,W], C = 1
 * gray or 3 RGB) becomes a PNG of 8 or 16 bits with a "parameters" text chunk in AUTOMATIC1111's format
 * (sd_a1111_parameters: what A1111's PNG Info, ComfyUI and civitai read back; a frame without a
 * "sampler" keeps the "parameters" string it carries, as pnmtotensor reads it) and a Software chunk.
 * Names: -o out.png is out.png for a stream of one image and out-1.png, out-2.png, … for more (the first
 * image is held in memory until a second one arrives or the input ends, so the choice needs no count);
 * -o PATTERN with a %d numbers from 1; no -o is standard output, for exactly one image.  Files are
 * written atomically, and an existing file is replaced only when sdpipe wrote it (or with --force).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sd.h"
#include "sd_cli.h"

struct opts {
	int bits;            /* --bits, 8 by default */
	const char *key;     /* --key, "image" by default */
	const char *out;     /* -o, NULL for stdout */
	int pattern;         /* -o holds a %d */
	int force;           /* -f: replace files sdpipe did not write */
};

static void usage(void)
{
	printf("Usage: %s [OPTION]... [FILE]\n"
	       "Write the \"image\" tensor of every frame of a tensor stream as PNG images (gray for 1\n"
	       "channel, RGB for 3), values in [0,1] clamped and scaled, each with the frame's prompt and\n"
	       "sampler settings as an AUTOMATIC1111 \"parameters\" text.  A batch [N,C,H,W] gives N images.\n"
	       "With no FILE, or when FILE is -, read standard input.\n"
	       "\n"
	       "  -o, --output FILE  write to FILE when the stream holds one image, else to FILE-1.png,\n"
	       "                     FILE-2.png, ... (the number goes before the extension); a FILE with\n"
	       "                     a %%d (printf style, e.g. out%%03d.png) numbers every image from 1.\n"
	       "                     Without -o (or with -o -), write the one image to standard output\n"
	       "      --bits N       8 or 16 bits per sample (default 8)\n"
	       "  -k, --key KEY      write the tensor KEY instead of \"image\"\n"
	       "  -f, --force        replace existing files that sdpipe did not write\n"
	       "  -v, --verbose      report each image on standard error\n"
	       "  -h, --help         display this help and exit\n"
	       "      --version      output version information and exit\n"
	       "\n"
	       "Example: pnmtotensor in.ppm | %s -o out.png\n", sd_prog, sd_prog);
	exit(0);
}

/* The number of %d conversions in an -o name: 0 (a plain name) or 1; anything else is a usage error. */
static int check_pattern(const char *p)
{
	int n = sd_count_pattern(p);
	if (n > 1) sd_usage_error("-o: '%s' must contain at most one %%d", p);
	return n;
}

/* The file name of image number i (from 1): the pattern's, or out.png → out-i.png (the number before
 * the extension of the last path component; appended when there is none). */
static void image_name(const struct opts *o, long i, char *file, size_t n)
{
	int k;
	if (o->pattern) {
		k = snprintf(file, n, o->out, (int)i);
	} else {
		const char *base = strrchr(o->out, '/');
		base = base ? base + 1 : o->out;
		const char *dot = strrchr(base, '.');
		if (!dot || dot == base) dot = base + strlen(base);
		k = snprintf(file, n, "%.*s-%ld%s", (int)(dot - o->out), o->out, i, dot);
	}
	if (k < 0 || (size_t)k >= n) sd_die("-o: file name too long");
}

/* May file be written?  Yes when it does not exist, when sdpipe wrote it, or with --force; otherwise
 * exit 1 before anything of it is touched. */
static void check_target(const char *file, int force)
{
	struct stat st;
	if (lstat(file, &st) != 0) {
		if (errno == ENOENT || errno == ENOTDIR) return; /* the write will say what is wrong */
		sd_die("%s: %s", file, strerror(errno));
	}
	if (force) return;
	if (!S_ISREG(st.st_mode))
		sd_die("%s: exists and is not a regular file; refusing to replace it (use --force)", file);
	int r = sd_png_made_by_sdpipe(file);
	if (r < 0) sd_die("%s", sd_errmsg());
	if (r == 0) sd_die("%s: exists and was not written by sdpipe; refusing to replace it (use --force)", file);
}

static void write_png(const char *file, const char *buf, size_t len, long idx)
{
	if (sd_write_file_atomic(file, buf, len) < 0) sd_die("%s", sd_errmsg());
	sd_info("frame %ld: wrote %s", idx, file);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"output", required_argument, NULL, 'o'},
		{"bits", required_argument, NULL, 'B'},
		{"key", required_argument, NULL, 'k'},
		{"force", no_argument, NULL, 'f'},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, 'V'},
		{NULL, 0, NULL, 0},
	};
	struct opts o = {.bits = 8, .key = "image"};
	int c;

	sd_cli_init(argc, argv);
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":o:k:fvh", longopts, NULL)) != -1) {
		switch (c) {
		case 'o':
			o.out = strcmp(optarg, "-") ? optarg : NULL;
			o.pattern = o.out ? check_pattern(optarg) : 0;
			if (o.out && !*o.out) sd_usage_error("-o: the file name is empty");
			break;
		case 'B':
			o.bits = (int)sd_parse_int("--bits", optarg, 8, 16);
			if (o.bits != 8 && o.bits != 16) sd_usage_error("--bits: '%s' is not 8 or 16", optarg);
			break;
		case 'k': o.key = optarg; break;
		case 'f': o.force = 1; break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case 'V': sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}
	if (argc - optind > 1) sd_usage_error("too many files (one stream at a time)");
	if (!*o.key) sd_usage_error("--key: the key is empty");
	if (!o.out && isatty(STDOUT_FILENO)) sd_usage_error("standard output is a terminal; give -o FILE.png");

	const char *path = optind < argc ? argv[optind] : NULL;
	const char *name = !path || !strcmp(path, "-") ? "stdin" : path;
	FILE *in = sd_open_in(path);
	sd_reader *r = sd_reader_new(in, name);
	if (!r) sd_die_lib("%s", name);

	/* The first image, held until a second one arrives (then it is FILE-1.png) or the input ends (then
	 * it is FILE, or standard output). */
	char *held = NULL;
	size_t held_len = 0;
	long held_frame = 0, nimages = 0, nframes = 0;
	char file[4096];
	sd_value *frame;
	int rc;
	while ((rc = sd_reader_next(r, &frame)) == 1) {
		long idx = sd_reader_index(r);
		sd_tensor *conv;
		const sd_tensor *t = sd_frame_image(frame, o.key, name, idx, "1 (gray) or 3 (RGB)", &conv);
		const int o3 = t->ndim - 3;
		const int64_t N = t->ndim == 4 ? t->shape[0] : 1;
		const int64_t chw[3] = {t->shape[o3], t->shape[o3 + 1], t->shape[o3 + 2]};
		const size_t stride = (size_t)(chw[0] * chw[1] * chw[2]);

		/* Before anything of this frame is written: standard output takes one image, and every name
		 * this frame writes (and the held image's, when it now becomes FILE-1.png) must be free or ours. */
		if (!o.out && nimages + N > 1)
			sd_die("%s: %lld images: standard output holds one PNG; give -o FILE.png", name,
			       (long long)(nimages + N));
		int numbered = o.pattern || (o.out && nimages + N > 1);
		if (numbered && held) {
			image_name(&o, 1, file, sizeof file);
			check_target(file, o.force);
		}
		for (int64_t i = 1; numbered && i <= N; i++) {
			image_name(&o, nimages + i, file, sizeof file);
			check_target(file, o.force);
		}
		if (numbered && held) {
			image_name(&o, 1, file, sizeof file);
			write_png(file, held, held_len, held_frame);
			free(held);
			held = NULL;
		}

		for (int64_t n = 0; n < N; n++) {
			const float *px = (const float *)t->data + n * stride;
			sd_warn_nonfinite(px, stride, name, idx, n + 1);
			sd_tensor *one = sd_tensor_wrap(SD_DTYPE_F32, 3, chw, (void *)px);
			/* a frame that no sampler made (read from a PNG, say) keeps the text it came with */
			const char *kept = sd_map_get(frame, "sampler") ? NULL : sd_map_str(frame, "parameters");
			char *params = kept ? strdup(kept) : sd_a1111_parameters(frame, n, N, chw[2], chw[1]);
			const char *text[] = {"parameters", params, NULL};
			char *buf;
			size_t len;
			if (!one || !params) sd_die("%s: frame %ld: out of memory", name, idx);
			if (sd_png_pack(one, o.bits, text, &buf, &len) < 0)
				sd_die("%s: frame %ld: \"%s\": %s", name, idx, o.key, sd_errmsg());
			sd_tensor_free(one);
			free(params);
			nimages++;
			if (numbered) {
				image_name(&o, nimages, file, sizeof file);
				write_png(file, buf, len, idx);
				free(buf);
			} else {
				held = buf;
				held_len = len;
				held_frame = idx;
			}
		}
		sd_tensor_free(conv);
		sd_value_free(frame);
		nframes++;
	}
	if (rc < 0) sd_die("%s", sd_errmsg());
	if (nframes == 0) sd_die("%s: no frames on input", name);
	if (nimages == 0) sd_die("%s: no images on input (every batch is empty)", name);
	sd_reader_free(r);
	if (held && o.out) {
		check_target(o.out, o.force);
		write_png(o.out, held, held_len, held_frame);
	} else if (held) {
		if (fwrite(held, 1, held_len, stdout) != held_len) sd_die("write error: stdout");
		sd_info("frame %ld: wrote the image to standard output", held_frame);
	}
	free(held);
	sd_info("%ld frame%s, %ld image%s", nframes, nframes == 1 ? "" : "s", nimages, nimages == 1 ? "" : "s");
	sd_close_stdout();
	return 0;
}
