/*
 * test_image.c - PNG and JPEG in and out (lib/io/image.c): sniffing, bit-exact PNG round trips at 8 and
 * 16 bits that agree with the PNM path, text chunks (tEXt / iTXt), every truncation and a byte flip at
 * every offset of a PNG and a JPEG failing cleanly, hostile headers refused before allocation, the
 * who-wrote-this check, and the A1111 "parameters" text for hand-built frames.  JPEG files are made
 * here with libjpeg itself.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jpeglib.h>

#include "sd.h"
#include "test.h"

/* ==== helpers ==== */

/* A [C,H,W] test picture: a gradient with values outside [0,1] at the edges. */
static sd_tensor *picture(int64_t C, int64_t H, int64_t W)
{
	sd_tensor *t = sd_tensor_newv(SD_DTYPE_F32, 3, C, H, W);
	float *p = t->data;
	for (int64_t i = 0; i < C * H * W; i++) p[i] = (float)((i * 37 % 1001) / 900.0 - 0.05);
	return t;
}

/* The samples sd_png_pack / sd_pnm_pack must write for t at maxval mv, as f32 sample / mv. */
static float *quantized(const sd_tensor *t, int mv)
{
	int64_t n = sd_tensor_numel(t);
	float *q = malloc(n * sizeof *q);
	const float *p = t->data;
	for (int64_t i = 0; i < n; i++) {
		double v = p[i];
		if (!(v > 0)) v = 0;
		if (v > 1) v = 1;
		q[i] = (float)lround(v * mv) * (1.0f / (float)mv);
	}
	return q;
}

static uint32_t crc32_(const unsigned char *p, size_t n)
{
	uint32_t c = 0xffffffffu;
	for (size_t i = 0; i < n; i++) {
		c ^= p[i];
		for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
	}
	return ~c;
}

static void put32(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16); p[2] = (unsigned char)(v >> 8); p[3] = (unsigned char)v;
}

/* A JPEG of a W x H picture with C = 1, 3 or 4 (CMYK) components, made by libjpeg into memory. */
static unsigned char *make_jpeg(int C, int W, int H, int quality, unsigned long *len)
{
	struct jpeg_compress_struct ci;
	struct jpeg_error_mgr jerr;
	unsigned char *out = NULL;
	ci.err = jpeg_std_error(&jerr);
	jpeg_create_compress(&ci);
	jpeg_mem_dest(&ci, &out, len);
	ci.image_width = W;
	ci.image_height = H;
	ci.input_components = C;
	ci.in_color_space = C == 1 ? JCS_GRAYSCALE : C == 3 ? JCS_RGB : JCS_CMYK;
	jpeg_set_defaults(&ci);
	jpeg_set_quality(&ci, quality, TRUE);
	jpeg_start_compress(&ci, TRUE);
	unsigned char *row = malloc((size_t)W * C);
	while (ci.next_scanline < ci.image_height) {
		for (int x = 0; x < W * C; x++) row[x] = (unsigned char)((x * 7 + ci.next_scanline * 5) & 0xff);
		jpeg_write_scanlines(&ci, &row, 1);
	}
	jpeg_finish_compress(&ci);
	jpeg_destroy_compress(&ci);
	free(row);
	return out;
}

/* Decoding must fail with a message that names the input. */
static int fails_cleanly(const void *p, size_t n)
{
	sd_tensor *t = sd_image_decode(p, n, "x.img", NULL, NULL);
	if (t) { sd_tensor_free(t); return 0; }
	return strncmp(sd_errmsg(), "x.img: ", 7) == 0;
}

/* ==== sniffing ==== */

TEST(sniff)
{
	CHECK(sd_image_sniff("\x89PNG\r\n\x1a\n", 8) == SD_IMAGE_PNG);
	CHECK(sd_image_sniff("\x89PNG\r\n\x1a", 7) == 0);
	CHECK(sd_image_sniff("\xff\xd8\xff\xe0", 4) == SD_IMAGE_JPEG);
	CHECK(sd_image_sniff("\xff\xd8", 2) == 0);
	CHECK(sd_image_sniff("P6\n", 3) == SD_IMAGE_PNM);
	CHECK(sd_image_sniff("P7\n", 3) == SD_IMAGE_PNM);
	CHECK(sd_image_sniff("P8\n", 3) == 0);
	CHECK(sd_image_sniff("GIF89a", 6) == 0);
	CHECK(sd_image_sniff("", 0) == 0);
}

/* ==== PNG round trips ==== */

/* Pack at `bits`, decode, and compare with the quantized values and with the PNM path's floats. */
static void roundtrip(int64_t C, int bits)
{
	sd_tensor *t = picture(C, 13, 17);
	const int mv = bits == 16 ? 65535 : 255;
	char *buf, *pbuf;
	size_t len, plen;
	CHECK_OK(sd_png_pack(t, bits, NULL, &buf, &len));
	CHECK_OK(sd_pnm_pack(t, mv, &pbuf, &plen));
	int got_mv = 0, pnm_mv = 0;
	sd_tensor *png = sd_image_decode(buf, len, "t.png", &got_mv, NULL);
	sd_tensor *pnm = sd_image_decode(pbuf, plen, "t.pnm", &pnm_mv, NULL);
	CHECK(png && pnm);
	if (png && pnm) {
		float *q = quantized(t, mv);
		CHECK(png->ndim == 4 && png->shape[0] == 1 && png->shape[1] == C && png->shape[2] == 13 && png->shape[3] == 17);
		CHECK(got_mv == mv && pnm_mv == mv);
		CHECK_CLOSE((const float *)png->data, q, (long)sd_tensor_numel(t), 0);
		CHECK(memcmp(png->data, pnm->data, sd_tensor_nbytes(png)) == 0);
		free(q);
	}
	sd_tensor_free(png);
	sd_tensor_free(pnm);
	free(buf);
	free(pbuf);
	sd_tensor_free(t);
}

TEST(png_rgb8) { roundtrip(3, 8); }
TEST(png_rgb16) { roundtrip(3, 16); }
TEST(png_gray8) { roundtrip(1, 8); }
TEST(png_gray16) { roundtrip(1, 16); }

TEST(png_bad_tensors)
{
	char *buf;
	size_t len;
	sd_tensor *t4 = sd_tensor_newv(SD_DTYPE_F32, 3, 4, 2, 2);
	sd_tensor *i32 = sd_tensor_newv(SD_DTYPE_I32, 3, 3, 2, 2);
	sd_tensor *b2 = sd_tensor_newv(SD_DTYPE_F32, 4, 2, 3, 2, 2);
	CHECK(sd_png_pack(t4, 8, NULL, &buf, &len) < 0 && strstr(sd_errmsg(), "4 channels"));
	CHECK(sd_png_pack(i32, 8, NULL, &buf, &len) < 0 && strstr(sd_errmsg(), "dtype"));
	CHECK(sd_png_pack(b2, 8, NULL, &buf, &len) < 0 && strstr(sd_errmsg(), "shape"));
	CHECK(sd_png_pack(t4, 12, NULL, &buf, &len) < 0 && strstr(sd_errmsg(), "bit depth"));
	CHECK(buf == NULL && len == 0);
	sd_tensor_free(t4);
	sd_tensor_free(i32);
	sd_tensor_free(b2);
}

/* ==== text chunks ==== */

TEST(png_text)
{
	sd_tensor *t = picture(3, 2, 2);
	const char *text[] = {"parameters", "caf\xc3\xa9 \xe2\x98\x95\nSteps: 1", "Title", "plain ascii", NULL};
	char *buf;
	size_t len;
	CHECK_OK(sd_png_pack(t, 8, text, &buf, &len));
	sd_value *tx = NULL;
	sd_tensor *img = sd_image_decode(buf, len, "t.png", NULL, &tx);
	CHECK(img && tx);
	CHECK(tx && sd_map_str(tx, "parameters") && !strcmp(sd_map_str(tx, "parameters"), text[1]));
	CHECK(tx && sd_map_str(tx, "Title") && !strcmp(sd_map_str(tx, "Title"), "plain ascii"));
	CHECK(tx && sd_map_str(tx, "Software") && !strcmp(sd_map_str(tx, "Software"), "sdpipe " SD_VERSION));
	CHECK(memmem(buf, len, "iTXtparameters", 14) && memmem(buf, len, "tEXtTitle", 9));
	sd_value_free(tx);
	sd_tensor_free(img);
	free(buf);

	/* the caller's Software replaces ours; bad keywords and bad UTF-8 are refused */
	const char *sw[] = {"Software", "other 1.0", NULL};
	CHECK_OK(sd_png_pack(t, 8, sw, &buf, &len));
	img = sd_image_decode(buf, len, "t.png", NULL, &tx);
	CHECK(tx && !strcmp(sd_map_str(tx, "Software"), "other 1.0") && tx->u.m.n == 1);
	sd_value_free(tx);
	sd_tensor_free(img);
	free(buf);
	const char *badkey[] = {" lead", "x", NULL}, *longkey[] = {"0123456789012345678901234567890123456789"
	                       "0123456789012345678901234567890123456789", "x", NULL}, *badutf[] = {"k", "\xc3(", NULL};
	CHECK(sd_png_pack(t, 8, badkey, &buf, &len) < 0 && strstr(sd_errmsg(), "keyword"));
	CHECK(sd_png_pack(t, 8, longkey, &buf, &len) < 0 && strstr(sd_errmsg(), "keyword"));
	CHECK(sd_png_pack(t, 8, badutf, &buf, &len) < 0 && strstr(sd_errmsg(), "UTF-8"));

	/* no text wanted: none returned; a PNM has none */
	CHECK_OK(sd_png_pack(t, 8, NULL, &buf, &len));
	img = sd_image_decode(buf, len, "t.png", NULL, NULL);
	CHECK(img != NULL);
	sd_tensor_free(img);
	free(buf);
	sd_tensor_free(t);
}

/* ==== damaged data ==== */

TEST(png_every_truncation_and_flip)
{
	sd_tensor *t = picture(3, 16, 16);
	const char *text[] = {"parameters", "a cat", NULL};
	char *buf;
	size_t len;
	CHECK_OK(sd_png_pack(t, 8, text, &buf, &len));
	long bad = 0, flips_ok = 0;
	for (size_t n = 0; n < len; n++) bad += !fails_cleanly(buf, n);
	printf("  %zu truncations of a %zu-byte PNG: %ld did not fail cleanly\n", len, len, bad);
	CHECK(bad == 0);
	/* a flipped byte: the CRCs catch it (an ancillary chunk's is only dropped); nothing may crash */
	unsigned char *c = malloc(len);
	for (size_t i = 0; i < len; i++) {
		memcpy(c, buf, len);
		c[i] ^= 0x55;
		sd_tensor *img = sd_image_decode(c, len, "x.img", NULL, NULL);
		if (img) { flips_ok++; sd_tensor_free(img); }
		else CHECK(strncmp(sd_errmsg(), "x.img: ", 7) == 0);
	}
	printf("  %zu flipped bytes: %ld still decoded (in ancillary chunks)\n", len, flips_ok);
	CHECK(flips_ok < 64);
	free(c);
	free(buf);
	sd_tensor_free(t);
}

TEST(jpeg)
{
	unsigned long len;
	unsigned char *j = make_jpeg(3, 24, 16, 100, &len);
	int mv = 0;
	sd_tensor *img = sd_image_decode(j, len, "t.jpg", &mv, NULL);
	CHECK(img && img->shape[1] == 3 && img->shape[2] == 16 && img->shape[3] == 24 && mv == 255);
	sd_tensor_free(img);
	unsigned char *g = make_jpeg(1, 9, 7, 90, &len);
	img = sd_image_decode(g, len, "t.jpg", &mv, NULL);
	CHECK(img && img->shape[1] == 1 && img->shape[2] == 7 && img->shape[3] == 9);
	/* quality 90 on a smooth ramp: every sample within a few levels of the source */
	if (img) {
		const float *p = img->data;
		double worst = 0;
		for (int y = 0; y < 7; y++)
			for (int x = 0; x < 9; x++) {
				double d = fabs(p[y * 9 + x] * 255.0 - ((x * 7 + y * 5) & 0xff));
				if (d > worst) worst = d;
			}
		printf("  gray JPEG: max |decoded - source| = %g levels\n", worst);
		CHECK(worst <= 8);
	}
	sd_tensor_free(img);
	free(g);

	long bad = 0;
	free(j);
	j = make_jpeg(3, 24, 16, 75, &len);
	for (unsigned long n = 0; n < len; n++) bad += !fails_cleanly(j, n);
	printf("  %lu truncations of a %lu-byte JPEG: %ld did not fail cleanly\n", len, len, bad);
	CHECK(bad == 0);
	unsigned char *c = malloc(len);
	for (unsigned long i = 0; i < len; i++) { /* no crash, whatever the outcome */
		memcpy(c, j, len);
		c[i] ^= 0xa5;
		sd_tensor *x = sd_image_decode(c, len, "x.img", NULL, NULL);
		sd_tensor_free(x);
	}
	free(c);
	free(j);

	unsigned char *k = make_jpeg(4, 8, 8, 90, &len);
	CHECK(!sd_image_decode(k, len, "k.jpg", NULL, NULL) && strstr(sd_errmsg(), "k.jpg: JPEG image: CMYK"));
	printf("  CMYK: %s\n", sd_errmsg());
	free(k);
}

/* ==== size limits ==== */

/* A PNG of W x H RGB 8-bit whose IDAT is a tiny valid zlib stream (the one black row of a 1x1 image). */
static size_t hostile_png(unsigned char *p, uint32_t W, uint32_t H)
{
	static const unsigned char idat[] = {0x78, 0x9c, 0x63, 0x60, 0x60, 0x60, 0x00, 0x00, 0x00, 0x04, 0x00, 0x01};
	size_t n = 0;
	memcpy(p, "\x89PNG\r\n\x1a\n", 8); n = 8;
	put32(p + n, 13); memcpy(p + n + 4, "IHDR", 4);
	put32(p + n + 8, W); put32(p + n + 12, H);
	p[n + 16] = 8; p[n + 17] = 2; p[n + 18] = 0; p[n + 19] = 0; p[n + 20] = 0;
	put32(p + n + 21, crc32_(p + n + 4, 17)); n += 25;
	put32(p + n, sizeof idat); memcpy(p + n + 4, "IDAT", 4); memcpy(p + n + 8, idat, sizeof idat);
	put32(p + n + 8 + sizeof idat, crc32_(p + n + 4, 4 + sizeof idat)); n += 12 + sizeof idat;
	put32(p + n, 0); memcpy(p + n + 4, "IEND", 4); put32(p + n + 8, crc32_((const unsigned char *)"IEND", 4)); n += 12;
	return n;
}

TEST(hostile_sizes)
{
	unsigned char p[128];
	size_t n = hostile_png(p, 100000, 100000);
	CHECK(!sd_image_decode(p, n, "h.png", NULL, NULL) && strstr(sd_errmsg(), "larger than the limit"));
	printf("  %s\n", sd_errmsg());
	n = hostile_png(p, 16000, 16000);
	CHECK(!sd_image_decode(p, n, "h.png", NULL, NULL) && strstr(sd_errmsg(), "bytes left can hold"));
	printf("  %s\n", sd_errmsg());
	n = hostile_png(p, 1, 1); /* the same file at a sane size is a good 1x1 black image */
	sd_tensor *t = sd_image_decode(p, n, "h.png", NULL, NULL);
	CHECK(t && ((float *)t->data)[0] == 0);
	sd_tensor_free(t);

	sd_tensor *pic = picture(3, 8, 8);
	char *buf;
	size_t len;
	CHECK_OK(sd_png_pack(pic, 8, NULL, &buf, &len));
	setenv("SD_MAX_PIXELS", "63", 1);
	CHECK(sd_image_max_pixels() == 63);
	CHECK(!sd_image_decode(buf, len, "s.png", NULL, NULL) && strstr(sd_errmsg(), "SD_MAX_PIXELS"));
	unsigned long jl;
	unsigned char *j = make_jpeg(3, 8, 8, 90, &jl);
	CHECK(!sd_image_decode(j, jl, "s.jpg", NULL, NULL) && strstr(sd_errmsg(), "SD_MAX_PIXELS"));
	setenv("SD_MAX_PIXELS", "64", 1);
	t = sd_image_decode(buf, len, "s.png", NULL, NULL);
	CHECK(t != NULL);
	sd_tensor_free(t);
	unsetenv("SD_MAX_PIXELS");
	free(j);
	free(buf);
	sd_tensor_free(pic);
}

/* ==== files ==== */

TEST(files)
{
	char dir[] = "/tmp/sdpipe-test-image.XXXXXX", path[256];
	if (!mkdtemp(dir)) SKIP("mkdtemp: %s", strerror(errno));
	sd_tensor *t = picture(3, 4, 4);
	char *buf;
	size_t len;
	CHECK_OK(sd_png_pack(t, 8, NULL, &buf, &len));
	snprintf(path, sizeof path, "%s/ours.png", dir);
	CHECK_OK(sd_write_file_atomic(path, buf, len));
	CHECK(sd_png_made_by_sdpipe(path) == 1);
	sd_value *tx = NULL;
	sd_tensor *img = sd_image_read_file(path, NULL, &tx);
	CHECK(img && tx);
	sd_tensor_free(img);
	sd_value_free(tx);
	FILE *f = fopen(path, "rb");
	img = f ? sd_image_read(f, "stdin", NULL, NULL) : NULL;
	CHECK(img != NULL);
	sd_tensor_free(img);
	if (f) fclose(f);
	free(buf);

	const char *sw[] = {"Software", "GIMP 2.10", NULL};
	CHECK_OK(sd_png_pack(t, 8, sw, &buf, &len));
	snprintf(path, sizeof path, "%s/gimp.png", dir);
	CHECK_OK(sd_write_file_atomic(path, buf, len));
	CHECK(sd_png_made_by_sdpipe(path) == 0);
	free(buf);
	const char *isw[] = {"Software", "sdpipe \xc3\xa9", NULL}; /* iTXt: also recognised */
	CHECK_OK(sd_png_pack(t, 8, isw, &buf, &len));
	snprintf(path, sizeof path, "%s/itxt.png", dir);
	CHECK_OK(sd_write_file_atomic(path, buf, len));
	CHECK(sd_png_made_by_sdpipe(path) == 1);
	free(buf);
	snprintf(path, sizeof path, "%s/notes.png", dir);
	CHECK_OK(sd_write_file_atomic(path, "sdpipe\n", 7));
	CHECK(sd_png_made_by_sdpipe(path) == 0);
	snprintf(path, sizeof path, "%s/none.png", dir);
	CHECK(sd_png_made_by_sdpipe(path) == 0);
	CHECK(sd_png_made_by_sdpipe(dir) == -1 && strstr(sd_errmsg(), dir));
	printf("  a folder: %s\n", sd_errmsg());

	const char *names[] = {"ours.png", "gimp.png", "itxt.png", "notes.png"};
	for (int i = 0; i < 4; i++) {
		snprintf(path, sizeof path, "%s/%s", dir, names[i]);
		unlink(path);
	}
	rmdir(dir);
	sd_tensor_free(t);
}

/* ==== A1111 parameters ==== */

static sd_value *lora(const char *name, double scale, int with_scale)
{
	sd_value *l = sd_value_map();
	sd_map_set_str(l, "name", name);
	if (with_scale) sd_map_set_float(l, "scale", scale);
	return l;
}

#define EXPECT_TEXT(got, want) do { char *g_ = (got); const char *w_ = (want);                 \
	if (!g_ || strcmp(g_, w_)) { printf("  %s:%d: got  \"%s\"\n  want \"%s\"\n", __FILE__, __LINE__, \
	                                    g_ ? g_ : "(null)", w_); test_failed_++; }            \
	free(g_); } while (0)

TEST(a1111)
{
	sd_value *f = sd_value_map();
	EXPECT_TEXT(sd_a1111_parameters(f, 0, 1, 512, 768), "Size: 512x768, Version: sdpipe " SD_VERSION);

	sd_map_set_str(f, "prompt", "a cat\nin a hat");
	sd_map_set_str(f, "negative_prompt", "");
	sd_value *s = sd_value_map();
	sd_map_set_str(s, "name", "pndm");
	sd_map_set_int(s, "steps", 50);
	sd_map_set_int(s, "seed", 1234);
	sd_map_set(s, "karras", sd_value_bool(0));
	sd_map_set_float(s, "guidance", 7.5);
	sd_map_set_float(s, "eta", 0);
	sd_map_set(f, "sampler", s);
	EXPECT_TEXT(sd_a1111_parameters(f, 0, 1, 512, 512),
	            "a cat\nin a hat\nSteps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 1234, Size: 512x512, "
	            "Version: sdpipe " SD_VERSION);

	sd_map_set_str(f, "negative_prompt", "blurry");
	sd_map_set_str(f, "model", "tiny");
	sd_map_set_float(s, "strength", (double)0.7f); /* through f32: still "0.7" */
	sd_value *ls = sd_value_array();
	sd_array_push(ls, lora("style", 0.8, 1));
	sd_array_push(ls, lora("ink", 0, 0));
	sd_map_set(f, "lora", ls);
	EXPECT_TEXT(sd_a1111_parameters(f, 2, 4, 512, 512),
	            "a cat\nin a hat <lora:style:0.8> <lora:ink:1>\nNegative prompt: blurry\n"
	            "Steps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: tiny, "
	            "Batch size: 4, Batch pos: 2, Denoising strength: 0.7, Version: sdpipe " SD_VERSION);

	static const char *const names[][2] = {
		{"ddim", "DDIM"}, {"ddpm", "DDPM"}, {"euler", "Euler"}, {"euler_a", "Euler a"},
		{"dpmpp_2m", "DPM++ 2M"}, {"lms", "LMS"}, {"heun", "heun"},
	};
	sd_value *g = sd_value_map();
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
		sd_value *s2 = sd_value_map();
		sd_map_set_str(s2, "name", names[i][0]);
		sd_map_set(s2, "karras", sd_value_bool(1));
		sd_map_set(g, "sampler", s2);
		char want[128];
		snprintf(want, sizeof want, "Sampler: %s Karras, Size: 8x8, Version: sdpipe " SD_VERSION, names[i][1]);
		EXPECT_TEXT(sd_a1111_parameters(g, 0, 1, 8, 8), want);
	}
	/* the generator's seed when the sampler has none; DDIM's eta; a model name that needs quotes */
	sd_value *s3 = sd_value_map();
	sd_map_set_str(s3, "name", "ddim");
	sd_map_set_float(s3, "eta", 0.5);
	sd_map_set_float(s3, "guidance", 7);
	sd_map_set(g, "sampler", s3);
	sd_value *gen = sd_value_map();
	sd_map_set_int(gen, "seed", 42);
	sd_map_set(g, "generator", gen);
	sd_map_set_str(g, "model", "a \"b\", c");
	EXPECT_TEXT(sd_a1111_parameters(g, 0, 1, 64, 32),
	            "Sampler: DDIM, CFG scale: 7, Seed: 42, Size: 64x32, Model: \"a \\\"b\\\", c\", Eta: 0.5, "
	            "Version: sdpipe " SD_VERSION);
	/* a negative prompt without a prompt: no empty first line */
	sd_value *h = sd_value_map();
	sd_map_set_str(h, "negative_prompt", "ugly");
	EXPECT_TEXT(sd_a1111_parameters(h, 0, 1, 8, 8), "Negative prompt: ugly\nSize: 8x8, Version: sdpipe " SD_VERSION);
	sd_value_free(h);
	sd_value_free(g);
	sd_value_free(f);
}

int main(void)
{
	RUN(sniff);
	RUN(png_rgb8);
	RUN(png_rgb16);
	RUN(png_gray8);
	RUN(png_gray16);
	RUN(png_bad_tensors);
	RUN(png_text);
	RUN(png_every_truncation_and_flip);
	RUN(jpeg);
	RUN(hostile_sizes);
	RUN(files);
	RUN(a1111);
	return test_summary();
}
