/*
 * image.c - PNG and JPEG images in and out of f32 tensors (libpng 1.6, libjpeg-turbo), with PNM handed
 * to pnm.c; and the AUTOMATIC1111 "parameters" text that Stable Diffusion front ends (A1111's PNG Info,
 * ComfyUI's loaders, civitai) read from a PNG's text chunks.
 *
 * Reading gives what PIL's Image.open(f).convert("RGB") gives (or the "L" image for gray ones): palette
 * expanded, alpha and tRNS ignored (not composited), gray kept as one channel, 1/2/4-bit gray scaled to
 * 8 bits, 16-bit samples kept; values sample / maxval as f32 (the same arithmetic as pnm.c, so a PNG and
 * a PPM of the same pixels give the same floats).  Gamma, sBIT and colour profiles are ignored, as PIL
 * ignores them.  JPEG: gray → 1 channel, YCbCr/RGB → RGB with libjpeg's default (islow DCT, fancy
 * upsampling, as PIL decodes); CMYK is refused.
 *
 * Errors: libpng and libjpeg report errors through callbacks that must not return; ours copy the text
 * and longjmp back, so a corrupt or truncated file is a -1 / NULL with a message, never an exit (libjpeg's
 * default error_exit calls exit) and never a partial image.  Every allocation of the decode state lives
 * in one heap struct (not in locals that a longjmp could leave indeterminate) and is freed on the error
 * path.  Size: a header is checked against sd_image_max_pixels() (SD_MAX_PIXELS) before anything is
 * allocated for its raster, and a PNG must also carry enough compressed bytes for it (deflate expands at
 * most 1032 times), so 60 bytes cannot make us allocate gigabytes.
 */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h> /* the JWRN_ message codes */
#include <png.h>

#include "sd.h"
#include "io.h"

/* ==== limits and helpers ==== */

/* The cap of every image reader (pnm.c uses it too): 2^28 pixels (16384x16384), SD_MAX_PIXELS overrides. */
#define MAX_PIXELS ((int64_t)1 << 28)
/* The most bytes sd_image_read takes from a stream (a 16384x16384 16-bit RGBA PNG stored raw is 2 GiB,
 * but no real one is that large compressed). */
#define MAX_BYTES ((size_t)1 << 30)

int64_t sd_image_max_pixels(void)
{
	const char *e = getenv("SD_MAX_PIXELS");
	if (!e || !*e) return MAX_PIXELS;
	char *end;
	errno = 0;
	long long v = strtoll(e, &end, 10);
	if (errno || *end || v < 1) return MAX_PIXELS; /* a bad value keeps the default */
	return v < ((int64_t)1 << 40) ? (int64_t)v : (int64_t)1 << 40; /* so that 4·cap·depth cannot overflow */
}

/* Is a W x H image acceptable?  0, or -1 with a message in why (the wording of pnm.c's check_size). */
static int check_pixels(int64_t W, int64_t H, int64_t C, char *why, size_t n)
{
	const int64_t cap = sd_image_max_pixels();
	if (W < 1 || H < 1) {
		snprintf(why, n, "image of %lldx%lld pixels has no pixels", (long long)W, (long long)H);
		return -1;
	}
	if (W > cap || H > cap || W * H > cap) { /* W, H < 2^32: no overflow */
		snprintf(why, n, "image of %lldx%lld pixels and depth %lld is larger than the limit of %lld "
		         "pixels (SD_MAX_PIXELS)", (long long)W, (long long)H, (long long)C, (long long)cap);
		return -1;
	}
	return 0;
}

/* A new CPU f32 [1,C,H,W] tensor that is not zero-filled (every sample is written by the decoder; see
 * pnm.c for why not sd_tensor_new).  NULL when out of memory (no message). */
static sd_tensor *alloc_image(int64_t C, int64_t H, int64_t W)
{
	const int64_t shape[4] = {1, C, H, W};
	void *mem = NULL;
	if (posix_memalign(&mem, 64, (size_t)(C * H * W) * sizeof(float)) != 0) return NULL;
	sd_tensor *t = sd_tensor_wrap(SD_DTYPE_F32, 4, shape, mem);
	if (!t) { free(mem); return NULL; }
	t->owns = 1;
	return t;
}

/* s (n bytes of Latin-1, as tEXt and zTXt hold) as a new NUL-terminated UTF-8 string, or NULL. */
static char *latin1_to_utf8(const char *s, size_t n)
{
	char *out = malloc(2 * n + 1), *o = out;
	if (!out) return NULL;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c < 0x80) *o++ = (char)c;
		else { *o++ = (char)(0xc0 | c >> 6); *o++ = (char)(0x80 | (c & 0x3f)); }
	}
	*o = 0;
	return out;
}

/* 1 when s is well-formed UTF-8 (no overlongs, surrogates or code points above U+10FFFF). */
static int valid_utf8(const char *str)
{
	const unsigned char *s = (const unsigned char *)str;
	while (*s) {
		unsigned c = *s++;
		if (c < 0x80) continue;
		int extra = c >= 0xf0 ? 3 : c >= 0xe0 ? 2 : c >= 0xc2 ? 1 : -1;
		if (extra < 0 || c > 0xf4) return 0;
		unsigned cp = c & (0x3f >> extra);
		for (int k = 0; k < extra; k++, s++) {
			if ((*s & 0xc0) != 0x80) return 0;
			cp = cp << 6 | (*s & 0x3f);
		}
		if ((extra == 2 && cp < 0x800) || (extra == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
		    (cp >= 0xd800 && cp <= 0xdfff))
			return 0;
	}
	return 1;
}

int sd_image_sniff(const void *buf, size_t n)
{
	const unsigned char *p = buf;
	static const unsigned char png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
	if (n >= 8 && memcmp(p, png_sig, 8) == 0) return SD_IMAGE_PNG;
	if (n >= 3 && p[0] == 0xff && p[1] == 0xd8 && p[2] == 0xff) return SD_IMAGE_JPEG;
	if (n >= 2 && p[0] == 'P' && p[1] >= '1' && p[1] <= '7') return SD_IMAGE_PNM;
	return 0;
}

/* ==== PNG reading ==== */

/* libpng's error text, and the decode state freed on every path. */
struct png_rd {
	char msg[256];
	const unsigned char *p;
	size_t len, at;
	unsigned char *raw;  /* the decoded rows, H x rowbytes */
	png_bytep *rows;
	sd_tensor *img;
	sd_value *text;
};

/* Shared by reading and writing: the first member of the state is the message buffer. */
static void on_png_error(png_structp png, png_const_charp msg)
{
	char *buf = png_get_error_ptr(png);
	snprintf(buf, 256, "%s", msg);
	png_longjmp(png, 1);
}

/* libpng's warnings (a bad ancillary chunk's CRC, say) are dropped: the library never prints. */
static void on_png_warning(png_structp png, png_const_charp msg) { (void)png; (void)msg; }

static void png_read_mem(png_structp png, png_bytep out, size_t n)
{
	struct png_rd *r = png_get_io_ptr(png);
	if (n > r->len - r->at) png_error(png, "truncated (the data ends before the image does)");
	memcpy(out, r->p + r->at, n);
	r->at += n;
}

/* The text chunks of info as a new MAP of strings (tEXt and zTXt converted from Latin-1), NULL when
 * there are none.  Out of memory: png_error. */
static sd_value *png_texts(png_structp png, png_infop info)
{
	png_textp txt = NULL;
	int n = png_get_text(png, info, &txt, NULL);
	if (n <= 0) return NULL;
	sd_value *map = sd_value_map();
	if (!map) png_error(png, "out of memory");
	for (int i = 0; i < n; i++) {
		const char *t = txt[i].text ? txt[i].text : "";
		int latin1 = txt[i].compression <= PNG_TEXT_COMPRESSION_zTXt; /* tEXt (-1) or zTXt (0) */
		char *key = latin1_to_utf8(txt[i].key, strlen(txt[i].key));
		char *val = latin1 ? latin1_to_utf8(t, strlen(t)) : strdup(t);
		if (!key || !val || sd_map_set_str(map, key, val) < 0) {
			free(key);
			free(val);
			sd_value_free(map);
			png_error(png, "out of memory");
		}
		free(key);
		free(val);
	}
	return map;
}

static sd_tensor *decode_png(const void *buf, size_t len, const char *name, int *maxval, sd_value **text)
{
	struct png_rd *st = calloc(1, sizeof *st);
	if (!st) { sd_seterr("%s: out of memory", name); return NULL; }
	st->p = buf;
	st->len = len;
	png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, st->msg, on_png_error, on_png_warning);
	png_infop info = png ? png_create_info_struct(png) : NULL;
	if (!png || !info) {
		png_destroy_read_struct(png ? &png : NULL, NULL, NULL);
		free(st);
		sd_seterr("%s: out of memory", name);
		return NULL;
	}
	if (setjmp(png_jmpbuf(png))) {
		png_destroy_read_struct(&png, &info, NULL);
		sd_seterr("%s: PNG image: %s", name, st->msg);
		free(st->raw);
		free(st->rows);
		sd_tensor_free(st->img);
		sd_value_free(st->text);
		free(st);
		return NULL;
	}
	png_set_read_fn(png, st, png_read_mem);
	png_read_info(png, info);

	png_uint_32 W, H;
	int depth, ctype, interlace;
	png_get_IHDR(png, info, &W, &H, &depth, &ctype, &interlace, NULL, NULL);
	const int C = (ctype & PNG_COLOR_MASK_COLOR) ? 3 : 1;
	char why[256];
	if (check_pixels(W, H, C, why, sizeof why) < 0) png_error(png, why);
	/* The filtered rows inflate from the IDAT data; deflate's best ratio is 1032:1, so a header that
	 * needs more than that from what is left of the file is a truncated or hostile one. */
	const double need = (double)H * ((double)png_get_rowbytes(png, info) + 1);
	if (need > 1032.0 * (double)(len - st->at) + 4096) {
		snprintf(why, sizeof why, "the header declares %lux%lu pixels, more than the %zu bytes left "
		         "can hold (truncated?)", (unsigned long)W, (unsigned long)H, len - st->at);
		png_error(png, why);
	}

	if (ctype == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png); /* tRNS gives a 4th channel: dropped */
	if (ctype == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
	png_set_interlace_handling(png);
	png_read_update_info(png, info);
	const int ch = png_get_channels(png, info), bits = png_get_bit_depth(png, info);
	const size_t rowbytes = png_get_rowbytes(png, info);
	if (ch < C || ch > 4 || (bits != 8 && bits != 16) || rowbytes < (size_t)W * ch * (bits / 8))
		png_error(png, "unexpected pixel layout after expansion");

	st->raw = malloc(rowbytes * H);
	st->rows = malloc(sizeof *st->rows * H);
	st->img = alloc_image(C, H, W);
	if (!st->raw || !st->rows || !st->img) {
		snprintf(why, sizeof why, "%lux%lu image: out of memory", (unsigned long)W, (unsigned long)H);
		png_error(png, why);
	}
	for (png_uint_32 y = 0; y < H; y++) st->rows[y] = st->raw + y * rowbytes;
	png_read_image(png, st->rows);
	png_read_end(png, info); /* to IEND: text after the image, and a truncated tail is an error */
	if (text) st->text = png_texts(png, info);

	const int mv = bits == 16 ? 65535 : 255;
	const float scale = 1.0f / (float)mv; /* exactly pnm.c's arithmetic */
	float *px = st->img->data;
	for (png_uint_32 y = 0; y < H; y++) {
		const unsigned char *row = st->rows[y];
		for (int c = 0; c < C; c++) {
			float *dst = px + ((size_t)c * H + y) * W;
			if (bits == 16)
				for (png_uint_32 x = 0; x < W; x++) {
					const unsigned char *s = row + ((size_t)x * ch + c) * 2;
					dst[x] = (float)(s[0] << 8 | s[1]) * scale;
				}
			else
				for (png_uint_32 x = 0; x < W; x++) dst[x] = (float)row[(size_t)x * ch + c] * scale;
		}
	}

	png_destroy_read_struct(&png, &info, NULL);
	sd_tensor *img = st->img;
	if (maxval) *maxval = mv;
	if (text) *text = st->text;
	free(st->raw);
	free(st->rows);
	free(st);
	return img;
}

/* ==== JPEG reading ==== */

struct jpeg_rd {
	struct jpeg_error_mgr pub; /* first: libjpeg hands us a pointer to it */
	jmp_buf jb;
	char msg[JMSG_LENGTH_MAX];
	struct jpeg_decompress_struct ci;
	unsigned char *row;
	sd_tensor *img;
};

/* libjpeg's fatal errors: keep the text, jump back (its default calls exit). */
static void on_jpeg_error(j_common_ptr ci)
{
	struct jpeg_rd *st = (struct jpeg_rd *)ci->err;
	st->pub.format_message(ci, st->msg);
	longjmp(st->jb, 1);
}

/* libjpeg's warnings: those that mean the data is cut short or damaged inside a scan (the image would
 * come out partly grey or garbled) are errors here; the rest (extraneous bytes between markers, trace
 * messages) are dropped. */
static void on_jpeg_message(j_common_ptr ci, int level)
{
	if (level >= 0) return;
	struct jpeg_rd *st = (struct jpeg_rd *)ci->err;
	int code = st->pub.msg_code;
	if (code == JWRN_JPEG_EOF) {
		snprintf(st->msg, sizeof st->msg, "truncated (the data ends before the image does)");
		longjmp(st->jb, 1);
	}
	if (code == JWRN_HIT_MARKER || code == JWRN_HUFF_BAD_CODE || code == JWRN_MUST_RESYNC ||
	    code == JWRN_NOT_SEQUENTIAL || code == JWRN_BOGUS_PROGRESSION) {
		st->pub.format_message(ci, st->msg);
		longjmp(st->jb, 1);
	}
	st->pub.num_warnings++;
}

static sd_tensor *decode_jpeg(const void *buf, size_t len, const char *name, int *maxval)
{
	struct jpeg_rd *st = calloc(1, sizeof *st);
	if (!st) { sd_seterr("%s: out of memory", name); return NULL; }
	st->ci.err = jpeg_std_error(&st->pub);
	st->pub.error_exit = on_jpeg_error;
	st->pub.emit_message = on_jpeg_message;
	if (setjmp(st->jb)) {
		jpeg_destroy_decompress(&st->ci);
		sd_seterr("%s: JPEG image: %s", name, st->msg);
		free(st->row);
		sd_tensor_free(st->img);
		free(st);
		return NULL;
	}
	jpeg_create_decompress(&st->ci);
	jpeg_mem_src(&st->ci, buf, (unsigned long)len);
	jpeg_read_header(&st->ci, TRUE);
	int C;
	switch (st->ci.jpeg_color_space) {
	case JCS_GRAYSCALE: C = 1; st->ci.out_color_space = JCS_GRAYSCALE; break;
	case JCS_YCbCr:
	case JCS_RGB: C = 3; st->ci.out_color_space = JCS_RGB; break;
	case JCS_CMYK:
	case JCS_YCCK:
		snprintf(st->msg, sizeof st->msg, "CMYK images are not supported (convert it to RGB first)");
		longjmp(st->jb, 1);
	default:
		snprintf(st->msg, sizeof st->msg, "unsupported colour space %d", (int)st->ci.jpeg_color_space);
		longjmp(st->jb, 1);
	}
	const int64_t W = st->ci.image_width, H = st->ci.image_height;
	if (check_pixels(W, H, C, st->msg, sizeof st->msg) < 0) longjmp(st->jb, 1);

	jpeg_start_decompress(&st->ci);
	if (st->ci.output_components != C || st->ci.output_width != W || st->ci.output_height != H) {
		snprintf(st->msg, sizeof st->msg, "unexpected output layout");
		longjmp(st->jb, 1);
	}
	st->row = malloc((size_t)W * C);
	st->img = alloc_image(C, H, W);
	if (!st->row || !st->img) {
		snprintf(st->msg, sizeof st->msg, "%lldx%lld image: out of memory", (long long)W, (long long)H);
		longjmp(st->jb, 1);
	}
	const float scale = 1.0f / 255.0f;
	float *px = st->img->data;
	while (st->ci.output_scanline < st->ci.output_height) {
		const size_t y = st->ci.output_scanline;
		JSAMPROW r = st->row;
		if (jpeg_read_scanlines(&st->ci, &r, 1) != 1) {
			snprintf(st->msg, sizeof st->msg, "truncated (no more scan lines)");
			longjmp(st->jb, 1);
		}
		for (int c = 0; c < C; c++) {
			float *dst = px + ((size_t)c * H + y) * W;
			for (int64_t x = 0; x < W; x++) dst[x] = (float)st->row[x * C + c] * scale;
		}
	}
	jpeg_finish_decompress(&st->ci); /* reads to EOI: a file cut after the last scan line fails here */
	jpeg_destroy_decompress(&st->ci);
	sd_tensor *img = st->img;
	if (maxval) *maxval = 255;
	free(st->row);
	free(st);
	return img;
}

/* ==== reading: dispatch ==== */

/* The first PNM image of a buffer, through pnm.c over an in-memory FILE. */
static sd_tensor *decode_pnm(const void *buf, size_t len, const char *name, int *maxval)
{
	FILE *m = fmemopen((void *)buf, len, "r");
	if (!m) { sd_seterr("%s: fmemopen: %s", name, strerror(errno)); return NULL; }
	sd_pnm_reader *r = sd_pnm_reader_new(m, name);
	sd_tensor *img = NULL;
	int rc = r ? sd_pnm_read(r, &img, maxval) : -1;
	if (!r) sd_preerr("%s", name);
	else if (rc == 0) sd_seterr("%s: no image in the data", name);
	sd_pnm_reader_free(r);
	fclose(m);
	return rc == 1 ? img : NULL;
}

sd_tensor *sd_image_decode(const void *buf, size_t len, const char *name, int *maxval, sd_value **text)
{
	if (!name) name = "image";
	if (text) *text = NULL;
	if (len == 0) { sd_seterr("%s: empty input", name); return NULL; }
	switch (sd_image_sniff(buf, len)) {
	case SD_IMAGE_PNG: return decode_png(buf, len, name, maxval, text);
	case SD_IMAGE_JPEG: return decode_jpeg(buf, len, name, maxval);
	case SD_IMAGE_PNM: return decode_pnm(buf, len, name, maxval);
	default: sd_seterr("%s: not a PNM, PNG or JPEG image", name); return NULL;
	}
}

sd_tensor *sd_image_read(FILE *f, const char *name, int *maxval, sd_value **text)
{
	if (!name) name = "input";
	if (text) *text = NULL;
	size_t cap = 1 << 16, used = 0;
	char *buf = malloc(cap);
	if (!buf) { sd_seterr("%s: out of memory", name); return NULL; }
	for (;;) {
		if (used == cap) {
			if (cap >= MAX_BYTES) {
				sd_seterr("%s: image data too large (more than %zu bytes)", name, MAX_BYTES);
				free(buf);
				return NULL;
			}
			char *nb = realloc(buf, cap * 2);
			if (!nb) { sd_seterr("%s: out of memory", name); free(buf); return NULL; }
			buf = nb;
			cap *= 2;
		}
		size_t got = fread(buf + used, 1, cap - used, f);
		used += got;
		if (got == 0) break;
	}
	if (ferror(f)) {
		sd_seterr("%s: read failed: %s", name, strerror(errno));
		free(buf);
		return NULL;
	}
	sd_tensor *img = sd_image_decode(buf, used, name, maxval, text);
	free(buf);
	return img;
}

sd_tensor *sd_image_read_file(const char *path, int *maxval, sd_value **text)
{
	size_t len = 0;
	if (text) *text = NULL;
	char *buf = sd_read_file(path, MAX_BYTES, &len);
	if (!buf) return NULL;
	sd_tensor *img = sd_image_decode(buf, len, path, maxval, text);
	free(buf);
	return img;
}

/* ==== PNG writing ==== */

struct png_wr {
	char msg[256]; /* first, as on_png_error expects */
	char *buf;
	size_t len, cap;
	unsigned char *row;
	png_text *txt;
};

static void png_write_mem(png_structp png, png_bytep data, size_t n)
{
	struct png_wr *w = png_get_io_ptr(png);
	if (n > w->cap - w->len) {
		size_t nc = w->cap ? w->cap : 1 << 16;
		while (nc - w->len < n) nc *= 2;
		char *nb = realloc(w->buf, nc);
		if (!nb) png_error(png, "out of memory");
		w->buf = nb;
		w->cap = nc;
	}
	memcpy(w->buf + w->len, data, n);
	w->len += n;
}

static void png_flush_mem(png_structp png) { (void)png; }

/* A PNG keyword: 1-79 printable Latin-1 characters without leading, trailing or double spaces; we take
 * ASCII only (what every reader handles). */
static int valid_keyword(const char *k)
{
	size_t n = strlen(k);
	if (n < 1 || n > 79 || k[0] == ' ' || k[n - 1] == ' ') return 0;
	for (size_t i = 0; i < n; i++)
		if (k[i] < 32 || k[i] > 126 || (k[i] == ' ' && k[i + 1] == ' ')) return 0;
	return 1;
}

/* Write the PNG into st->buf: libpng's part of sd_png_pack, alone in its function so that no local of
 * the caller is live across the setjmp.  0, or -1 with a message (st->buf is the caller's to free). */
static int png_encode(struct png_wr *st, int nt, const float *px, int64_t C, int64_t H, int64_t W, int bits)
{
	png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, st->msg, on_png_error, on_png_warning);
	png_infop info = png ? png_create_info_struct(png) : NULL;
	if (!png || !info) {
		png_destroy_write_struct(png ? &png : NULL, NULL);
		return sd_seterr("writing PNG: out of memory");
	}
	if (setjmp(png_jmpbuf(png))) {
		png_destroy_write_struct(&png, &info);
		return sd_seterr("writing PNG: %s", st->msg);
	}
	png_set_write_fn(png, st, png_write_mem, png_flush_mem);
	png_set_IHDR(png, info, (png_uint_32)W, (png_uint_32)H, bits, C == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB,
	             PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
	png_set_text(png, info, st->txt, nt);
	png_write_info(png, info);

	const size_t bps = (size_t)bits / 8;
	st->row = malloc((size_t)W * C * bps);
	if (!st->row) png_error(png, "out of memory");
	const double mv = bits == 16 ? 65535.0 : 255.0;
	for (int64_t y = 0; y < H; y++) {
		for (int64_t c = 0; c < C; c++) {
			const float *src = px + (c * H + y) * W;
			for (int64_t x = 0; x < W; x++) {
				/* the rounding of pnm.c's encode, so a PNG and a PPM of one tensor hold the same samples */
				long q = sd_io_quantize(src[x], mv);
				unsigned char *d = st->row + (x * C + c) * bps;
				if (bps == 2) { d[0] = (unsigned char)(q >> 8); d[1] = (unsigned char)q; }
				else d[0] = (unsigned char)q;
			}
		}
		png_write_row(png, st->row);
	}
	png_write_end(png, NULL);
	png_destroy_write_struct(&png, &info);
	return 0;
}

int sd_png_pack(const sd_tensor *image, int bits, const char *const *text, char **buf, size_t *len)
{
	char s[96];
	*buf = NULL;
	*len = 0;
	if (bits != 8 && bits != 16) return sd_seterr("PNG bit depth %d is not 8 or 16", bits);
	if (!image) return sd_seterr("no image");
	if (image->dtype != SD_DTYPE_F32)
		return sd_seterr("image dtype is %s, want f32", sd_dtype_name(image->dtype));
	if (image->device != SD_DEVICE_CPU) return sd_seterr("image is not in CPU memory");
	if (!(image->ndim == 3 || (image->ndim == 4 && image->shape[0] == 1)))
		return sd_seterr("image shape %s is not [C,H,W] or [1,C,H,W]",
		                 sd_shape_str(image->ndim, image->shape, s, sizeof s));
	const int o = image->ndim - 3;
	const int64_t C = image->shape[o], H = image->shape[o + 1], W = image->shape[o + 2];
	if (C != 1 && C != 3)
		return sd_seterr("image has %lld channels; only 1 (gray) or 3 (RGB) can be written", (long long)C);
	if (H < 1 || W < 1 || H > 0x7fffffff || W > 0x7fffffff)
		return sd_seterr("image size %lldx%lld cannot be written", (long long)W, (long long)H);

	/* the text chunks: the caller's, then Software unless the caller gave one */
	int ntext = 0, has_software = 0;
	for (; text && text[2 * ntext]; ntext++) {
		const char *k = text[2 * ntext], *v = text[2 * ntext + 1];
		if (!valid_keyword(k))
			return sd_seterr("'%s' is not a PNG text keyword (1-79 printable ASCII characters)", k);
		if (!v) return sd_seterr("text '%s' has no value", k);
		if (!valid_utf8(v)) return sd_seterr("text '%s' is not valid UTF-8", k);
		if (!strcmp(k, "Software")) has_software = 1;
	}
	struct png_wr *st = calloc(1, sizeof *st);
	if (st) st->txt = calloc((size_t)ntext + 1, sizeof *st->txt);
	if (!st || !st->txt) { free(st); return sd_seterr("writing PNG: out of memory"); }
	int nt = 0;
	for (int i = 0; i < ntext; i++, nt++) {
		const char *v = text[2 * i + 1];
		int ascii = 1;
		for (const char *p = v; *p; p++) if ((unsigned char)*p >= 0x80) { ascii = 0; break; }
		/* tEXt is Latin-1, so anything beyond ASCII goes as iTXt (UTF-8); PIL reads both into .text */
		st->txt[nt].compression = ascii ? PNG_TEXT_COMPRESSION_NONE : PNG_ITXT_COMPRESSION_NONE;
		st->txt[nt].key = (char *)text[2 * i];
		st->txt[nt].text = (char *)v;
		if (ascii) st->txt[nt].text_length = strlen(v);
		else st->txt[nt].itxt_length = strlen(v);
	}
	if (!has_software) {
		st->txt[nt].compression = PNG_TEXT_COMPRESSION_NONE;
		st->txt[nt].key = (char *)"Software";
		st->txt[nt].text = (char *)"sdpipe " SD_VERSION;
		st->txt[nt].text_length = strlen(st->txt[nt].text);
		nt++;
	}

	int rc = png_encode(st, nt, image->data, C, H, W, bits);
	if (rc == 0) {
		*buf = st->buf;
		*len = st->len;
	} else {
		free(st->buf);
	}
	free(st->row);
	free(st->txt);
	free(st);
	return rc;
}

/* ==== who wrote this PNG? ==== */

static uint32_t be32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/*
 * Walk the chunks before the first IDAT (where our writer puts its text) looking for the first
 * "Software" tEXt or uncompressed iTXt.  Reads only chunk headers and small text chunks, never the
 * image, so it is cheap on a large file.
 */
int sd_png_made_by_sdpipe(const char *path)
{
	static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
	FILE *f = fopen(path, "rb");
	if (!f) return errno == ENOENT ? 0 : sd_seterr("%s: cannot open: %s", path, strerror(errno));
	unsigned char hdr[8];
	int result = 0;
	size_t n = fread(hdr, 1, 8, f);
	if (n < 8 || memcmp(hdr, sig, 8) != 0) goto done;
	for (int chunks = 0; chunks < 10000; chunks++) {
		if (fread(hdr, 1, 8, f) != 8) goto done;
		uint32_t clen = be32(hdr);
		if (clen > 0x7fffffff || !memcmp(hdr + 4, "IDAT", 4) || !memcmp(hdr + 4, "IEND", 4)) goto done;
		int is_text = !memcmp(hdr + 4, "tEXt", 4), is_itxt = !memcmp(hdr + 4, "iTXt", 4);
		if ((is_text || is_itxt) && clen >= 9 && clen <= 65536) {
			char data[65537];
			if (fread(data, 1, clen, f) != clen) goto done;
			data[clen] = 0;
			if (memcmp(data, "Software", 9) == 0) { /* the keyword and its NUL */
				const char *v = data + 9, *end = data + clen;
				if (is_itxt) { /* compression flag, method, language\0, translated keyword\0 */
					if (end - v < 2 || v[0] != 0) goto done;
					v += 2;
					for (int k = 0; k < 2; k++) {
						const char *z = memchr(v, 0, (size_t)(end - v));
						if (!z) goto done;
						v = z + 1;
					}
				}
				result = (size_t)(end - v) >= 6 && memcmp(v, "sdpipe", 6) == 0;
				goto done;
			}
			if (fseek(f, 4, SEEK_CUR) != 0) goto done;
		} else if (fseek(f, (long)clen + 4, SEEK_CUR) != 0) {
			goto done;
		}
	}
done:
	if (ferror(f)) result = sd_seterr("%s: read failed: %s", path, strerror(errno));
	fclose(f);
	return result;
}

/* ==== A1111 "parameters" text ==== */

/* v as the shortest decimal that reads back to the same number (as a float when v is one: a value that
 * came through f32 prints as 0.7, not 0.699999988). */
static void fmt_num(char *out, size_t n, double v)
{
	if (!isfinite(v)) { snprintf(out, n, "%g", v); return; }
	float f = (float)v;
	if ((double)f == v)
		for (int p = 1; p <= 9; p++) {
			snprintf(out, n, "%.*g", p, v);
			if (strtof(out, NULL) == f) return;
		}
	for (int p = 1; p <= 17; p++) {
		snprintf(out, n, "%.*g", p, v);
		if (strtod(out, NULL) == v) return;
	}
}

/* A1111's quote(): a value holding ',', ':' or a newline is written as a JSON string (ensure_ascii off),
 * which its parser and civitai's unquote; others as they are. */
static void put_quoted(FILE *m, const char *s)
{
	if (!strpbrk(s, ",:\n")) { fputs(s, m); return; }
	fputc('"', m);
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		switch (*p) {
		case '"': fputs("\\\"", m); break;
		case '\\': fputs("\\\\", m); break;
		case '\n': fputs("\\n", m); break;
		case '\r': fputs("\\r", m); break;
		case '\t': fputs("\\t", m); break;
		default:
			if (*p < 0x20) fprintf(m, "\\u%04x", *p);
			else fputc(*p, m);
		}
	}
	fputc('"', m);
}

/* Our sampler names to A1111's (k-diffusion's labels). */
static const char *a1111_sampler(const char *name)
{
	static const char *const map[][2] = {
		{"pndm", "PLMS"}, {"plms", "PLMS"}, {"ddim", "DDIM"}, {"ddpm", "DDPM"}, {"euler", "Euler"},
		{"euler_a", "Euler a"}, {"euler_ancestral", "Euler a"}, {"dpmpp_2m", "DPM++ 2M"},
		{"dpm++2m", "DPM++ 2M"}, {"dpm++_2m", "DPM++ 2M"}, {"dpmpp2m", "DPM++ 2M"}, {"lms", "LMS"},
	};
	for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
		if (!strcmp(name, map[i][0])) return map[i][1];
	return name;
}

/* One ", Key: value" field (the first without the comma). */
static void field(FILE *m, int *nf, const char *key, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void field(FILE *m, int *nf, const char *key, const char *fmt, ...)
{
	va_list ap;
	fprintf(m, "%s%s: ", (*nf)++ ? ", " : "", key);
	va_start(ap, fmt);
	vfprintf(m, fmt, ap);
	va_end(ap);
}

char *sd_a1111_parameters(const sd_value *frame, int64_t index, int64_t count, int64_t width, int64_t height)
{
	char *out = NULL;
	size_t outlen = 0;
	FILE *m = open_memstream(&out, &outlen);
	if (!m) return NULL;
	char num[40];
	const sd_value *sampler = sd_map_get(frame, "sampler");
	if (sampler && sampler->type != SD_V_MAP) sampler = NULL;
	const sd_value *gen = sd_map_get(frame, "generator");
	if (gen && gen->type != SD_V_MAP) gen = NULL;

	/* line 1: the prompt, with the LoRA tags A1111 keeps in it */
	const char *prompt = sd_map_str(frame, "prompt");
	if (prompt) fputs(prompt, m);
	const sd_value *loras = sd_map_get(frame, "lora");
	if (loras && loras->type == SD_V_ARRAY)
		for (size_t i = 0; i < loras->u.a.n; i++) {
			const sd_value *l = loras->u.a.v[i];
			const char *name = l->type == SD_V_MAP ? sd_map_str(l, "name") : NULL;
			double scale = 1.0;
			if (!name || !*name) continue;
			if (sd_map_get_float(l, "scale", &scale) != 0) scale = 1.0;
			fmt_num(num, sizeof num, scale);
			fprintf(m, " <lora:%s:%s>", name, num);
		}
	const char *neg = sd_map_str(frame, "negative_prompt");
	if (neg && *neg) fprintf(m, "\nNegative prompt: %s", neg);
	fputc('\n', m);

	/* the last line, in A1111's order */
	int nf = 0;
	int64_t steps, seed;
	double g;
	const char *sname = sampler ? sd_map_str(sampler, "name") : NULL;
	if (sampler && sd_map_get_int(sampler, "steps", &steps) == 0) field(m, &nf, "Steps", "%lld", (long long)steps);
	if (sname) {
		const sd_value *k = sd_map_get(sampler, "karras");
		int karras = k && ((k->type == SD_V_BOOL && k->u.b) || (k->type == SD_V_INT && k->u.i));
		field(m, &nf, "Sampler", "%s%s", a1111_sampler(sname), karras ? " Karras" : "");
	}
	if (sampler && sd_map_get_float(sampler, "guidance", &g) == 0) {
		fmt_num(num, sizeof num, g);
		field(m, &nf, "CFG scale", "%s", num);
	}
	if ((sampler && sd_map_get_int(sampler, "seed", &seed) == 0) || (gen && sd_map_get_int(gen, "seed", &seed) == 0))
		field(m, &nf, "Seed", "%lld", (long long)seed);
	if (width > 0 && height > 0) field(m, &nf, "Size", "%lldx%lld", (long long)width, (long long)height);
	const char *model = sd_map_str(frame, "model");
	if (model && *model) {
		field(m, &nf, "Model", "%s", "");
		put_quoted(m, model);
	}
	if (count > 1) {
		field(m, &nf, "Batch size", "%lld", (long long)count);
		field(m, &nf, "Batch pos", "%lld", (long long)index);
	}
	if (sampler && sd_map_get_float(sampler, "strength", &g) == 0) {
		fmt_num(num, sizeof num, g);
		field(m, &nf, "Denoising strength", "%s", num);
	}
	/* η is DDIM's only (the others must have 0); A1111 writes it when it is not the default 0 */
	if (sname && !strcmp(sname, "ddim") && sd_map_get_float(sampler, "eta", &g) == 0 && g != 0) {
		fmt_num(num, sizeof num, g);
		field(m, &nf, "Eta", "%s", num);
	}
	field(m, &nf, "Version", "sdpipe %s", SD_VERSION);

	if (fclose(m) != 0 || !out) {
		free(out);
		return NULL;
	}
	/* A1111 strips the whole text (so no empty first line when there is no prompt) */
	size_t a = 0, b = outlen;
	while (a < b && out[a] && strchr(" \t\n\r\v\f", out[a])) a++;
	while (b > a && out[b - 1] && strchr(" \t\n\r\v\f", out[b - 1])) b--;
	memmove(out, out + a, b - a);
	out[b - a] = 0;
	return out;
}
