/*
 * pnm.c - PBM/PGM/PPM/PAM images in and out of f32 tensors, on top of libnetpbm's pam API (the same
 * pnm_readpaminit / pnm_readpamrow loop as netpbm's own editor/pamcut.c, multi-image streams ended by
 * pm_nextimage as in pamfile).
 *
 * libnetpbm reports errors by printing and calling exit(), which a library must never do.  Every entry
 * point here therefore installs a jmp_buf (pm_setjmpbufsave) and a message hook (pm_setusererrormsgfn):
 * the hook stores libnetpbm's text with sd_seterr, pm_error longjmps back, and the function returns -1.
 * Informational messages (pm_message) are dropped.  libnetpbm's error state is process-global, so these
 * functions are not thread-safe (nor is libnetpbm).
 *
 * Size: an image header is checked before anything is allocated for it: at most 2^28 pixels
 * ($SD_MAX_PIXELS overrides), and no more than a regular file can still hold (see check_size).
 *
 * Values: sample / maxval as f32, so [0,1] for every maxval; PBM reads as libnetpbm's pam view of it
 * (black = 0, white = 1).  Writing clamps to [0,1] (NaN counts as 0) and rounds x·maxval to nearest,
 * which gives back the exact samples of anything read with the same maxval.
 */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <pam.h>

#include "sd.h"
#include "io.h"

/* libnetpbm's PAM_STRUCT_SIZE(tuple_type) computes the offset through a null pointer, which UBSan
 * reports as undefined behaviour; this is the same number by offsetof. */
#define PAM_LEN (offsetof(struct pam, tuple_type) + sizeof(((struct pam *)NULL)->tuple_type))

/* ==== libnetpbm error handling ==== */

static int pm_ready;

/* pm_error's text goes to sd_errmsg() instead of stderr. */
static void on_pm_error(const char *msg)
{
	size_t n = strlen(msg);
	while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' ')) n--;
	sd_seterr("%.*s", (int)n, msg);
}

/* pm_message's text (warnings, progress) is dropped: the library never prints. */
static void on_pm_message(const char *msg) { (void)msg; }

static void pm_setup(void)
{
	if (!pm_ready) {
		pm_init("sdpipe", 0);
		pm_ready = 1;
	}
	pm_setusererrormsgfn(on_pm_error);
	pm_setusermessagefn(on_pm_message);
}

/* ==== reading ==== */

/* The largest image read is sd_image_max_pixels() (image.c): 2^28 pixels (16384×16384, an f32 RGB
 * tensor of 3 GiB) unless $SD_MAX_PIXELS says otherwise.  Samples (W·H·depth) may be 4 times that. */
#define max_pixels sd_image_max_pixels

/*
 * Is an image with this header acceptable?  Its pixels must be within max_pixels() and its samples
 * within four times that; and when the input is a regular file, the bytes left in it must be able to
 * hold the raster (raw formats: every sample's bytes, PBM 1 bit; plain formats: at least one byte per
 * sample), so a short file fails here instead of after a large allocation.  0, or -1 with a message
 * in why.
 */
static int check_size(FILE *f, const struct pam *pam, char *why, size_t n)
{
	const int64_t W = pam->width, H = pam->height, C = pam->depth, cap = max_pixels();
	const int64_t pixels = W * H; /* both < 2^31: no overflow */
	if (pixels > cap || pixels * C > 4 * cap) {
		snprintf(why, n, "image of %lldx%lld pixels and depth %lld is larger than the limit of %lld "
		         "pixels (SD_MAX_PIXELS)", (long long)W, (long long)H, (long long)C, (long long)cap);
		return -1;
	}
	struct stat st;
	int fd = fileno(f);
	off_t at = fd >= 0 ? ftello(f) : -1;
	if (fd < 0 || at < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) return 0; /* a pipe: as it comes */
	int64_t need;
	int plain = pam->format == PBM_FORMAT || pam->format == PGM_FORMAT || pam->format == PPM_FORMAT;
	if (plain) need = pixels * C;
	else if (pam->format == RPBM_FORMAT) need = (W + 7) / 8 * H;
	else need = pixels * C * (pam->maxval > 255 ? 2 : 1);
	if (st.st_size - at < need) {
		snprintf(why, n, "the header declares %lldx%lld pixels of depth %lld, but only %lld bytes of the "
		         "file are left (%lld needed; truncated?)", (long long)W, (long long)H, (long long)C,
		         (long long)(st.st_size - at), (long long)need);
		return -1;
	}
	return 0;
}

struct sd_pnm_reader {
	FILE *f;
	char *name;
	int count;       /* images returned so far */
	int done;        /* end of input seen, or an error: every later call returns 0 */
	/* Work memory of the image being read, here rather than in sd_pnm_read's locals so that it
	 * survives a longjmp without volatile tricks and is freed on the error path. */
	tuple *row;
	sd_tensor *img;
};

/* A reader of images from f (not closed by sd_pnm_reader_free); name prefixes messages.  NULL with a
 * message when out of memory. */
sd_pnm_reader *sd_pnm_reader_new(FILE *f, const char *name)
{
	sd_pnm_reader *r = calloc(1, sizeof *r);
	if (!r) { sd_seterr("out of memory"); return NULL; }
	r->f = f;
	r->name = strdup(name ? name : "input");
	if (!r->name) { free(r); sd_seterr("out of memory"); return NULL; }
	return r;
}

void sd_pnm_reader_free(sd_pnm_reader *r)
{
	if (!r) return;
	if (r->row) pnm_freepamrow(r->row);
	sd_tensor_free(r->img);
	free(r->name);
	free(r);
}

/* Read the next image into a new f32 [1,C,H,W] tensor the caller owns.  1 = an image, 0 = end of input
 * (only whitespace left), -1 = error with "<name>: [image N: ]<libnetpbm's message>".  After an error the
 * reader is finished (returns 0). */
int sd_pnm_read(sd_pnm_reader *r, sd_tensor **image, int *maxval)
{
	jmp_buf jb, *old;
	struct pam pam;

	*image = NULL;
	if (r->done) return 0;
	pm_setup();
	pm_setjmpbufsave(&jb, &old);
	if (setjmp(jb)) {
		pm_setjmpbuf(old);
		if (r->row) { pnm_freepamrow(r->row); r->row = NULL; }
		sd_tensor_free(r->img);
		r->img = NULL;
		r->done = 1;
		if (r->count > 0) sd_preerr("%s: image %d", r->name, r->count + 1);
		else sd_preerr("%s", r->name);
		return -1;
	}

	int eof = 0;
	pm_nextimage(r->f, &eof);
	if (eof) {
		pm_setjmpbuf(old);
		r->done = 1;
		return 0;
	}

	memset(&pam, 0, sizeof pam);
	pnm_readpaminit(r->f, &pam, PAM_LEN);
	if (pam.depth < 1 || pam.depth > 4096 || pam.height < 1 || pam.width < 1 || pam.maxval < 1) {
		/* libnetpbm already refuses these; keep the check so no odd header reaches the allocation. */
		pm_error("unsupported image header (%dx%d, depth %u, maxval %lu)", pam.width, pam.height,
		         pam.depth, (unsigned long)pam.maxval);
	}

	const int64_t C = pam.depth, H = pam.height, W = pam.width;
	const int64_t shape[4] = {1, C, H, W};
	/* The header alone must not make us allocate: pnm_readpam-style readers take W, H and depth on
	 * trust, and 20 bytes can declare 100000x100000.  Refuse what is over the cap, or more than a
	 * regular file can hold, before the tensor is allocated. */
	char why[256];
	if (check_size(r->f, &pam, why, sizeof why) < 0) pm_error("%s", why);
	/* Not sd_tensor_new, which zero-fills and so touches every page before a row has arrived: every
	 * sample is written below, so a pipe that ends early has only touched the rows it delivered.  The
	 * memory is the CPU backend's kind (posix_memalign, released with free by sd_tensor_free). */
	void *mem = NULL;
	if (posix_memalign(&mem, 64, (size_t)(C * H * W) * sizeof(float)) != 0) mem = NULL;
	if (!mem || !(r->img = sd_tensor_wrap(SD_DTYPE_F32, 4, shape, mem))) {
		free(mem);
		pm_error("%dx%d image of depth %u: out of memory", pam.width, pam.height, pam.depth);
	}
	r->img->owns = 1;
	r->row = pnm_allocpamrow(&pam);

	float *px = r->img->data;
	const float scale = 1.0f / (float)pam.maxval;
	for (int64_t y = 0; y < H; y++) {
		pnm_readpamrow(&pam, r->row);
		for (int64_t c = 0; c < C; c++) {
			float *dst = px + (c * H + y) * W;
			for (int64_t x = 0; x < W; x++) dst[x] = (float)r->row[x][c] * scale;
		}
	}

	pnm_freepamrow(r->row);
	r->row = NULL;
	pm_setjmpbuf(old);

	*image = r->img;
	r->img = NULL;
	if (maxval) *maxval = (int)pam.maxval;
	r->count++;
	return 1;
}

/* ==== writing ==== */

/* Check that image is a writable picture: CPU f32 [C,H,W] or [1,C,H,W] with C = 1 or 3, and return C,
 * H, W.  -1 with a message otherwise. */
static int image_dims(const sd_tensor *image, int64_t *C, int64_t *H, int64_t *W)
{
	char s[96];
	if (!image) return sd_seterr("no image");
	if (image->dtype != SD_DTYPE_F32)
		return sd_seterr("image dtype is %s, want f32", sd_dtype_name(image->dtype));
	if (image->device != SD_DEVICE_CPU) return sd_seterr("image is not in CPU memory");
	int o = image->ndim - 3;
	if (!(image->ndim == 3 || (image->ndim == 4 && image->shape[0] == 1)))
		return sd_seterr("image shape %s is not [C,H,W] or [1,C,H,W]",
		                 sd_shape_str(image->ndim, image->shape, s, sizeof s));
	*C = image->shape[o];
	*H = image->shape[o + 1];
	*W = image->shape[o + 2];
	if (*C != 1 && *C != 3)
		return sd_seterr("image has %lld channels; only 1 (PGM) or 3 (PPM) can be written", (long long)*C);
	if (*H < 1 || *W < 1 || *H > INT32_MAX || *W > INT32_MAX)
		return sd_seterr("image size %lldx%lld cannot be written", (long long)*W, (long long)*H);
	return 0;
}

/* Write the raster to m through libnetpbm; -1 with libnetpbm's message on failure. */
static int encode(FILE *m, const float *px, int C, int H, int W, int maxval)
{
	tuple *volatile row = NULL; /* volatile: read after the longjmp */
	jmp_buf jb, *old;
	struct pam pam;

	pm_setup();
	pm_setjmpbufsave(&jb, &old);
	if (setjmp(jb)) {
		pm_setjmpbuf(old);
		if (row) pnm_freepamrow(row);
		return sd_preerr("writing image");
	}

	memset(&pam, 0, sizeof pam);
	pam.size = sizeof pam;
	pam.len = PAM_LEN;
	pam.file = m;
	pam.format = C == 1 ? RPGM_FORMAT : RPPM_FORMAT;
	pam.plainformat = 0;
	pam.height = H;
	pam.width = W;
	pam.depth = (unsigned)C;
	pam.maxval = (sample)maxval;
	pam.bytes_per_sample = maxval > 255 ? 2 : 1;
	strcpy(pam.tuple_type, C == 1 ? PAM_PGM_TUPLETYPE : PAM_PPM_TUPLETYPE);

	pnm_writepaminit(&pam);
	row = pnm_allocpamrow(&pam);
	const double mv = maxval;
	for (int64_t y = 0; y < H; y++) {
		for (int64_t c = 0; c < C; c++) {
			const float *src = px + (c * H + y) * W;
			for (int64_t x = 0; x < W; x++) {
				row[x][c] = (sample)sd_io_quantize(src[x], mv);
			}
		}
		pnm_writepamrow(&pam, row);
	}
	pnm_freepamrow(row);
	pm_setjmpbuf(old);
	return 0;
}

/* Encode one image (see sd_pnm_write) as raw PGM/PPM into a malloc'd buffer *buf of *len bytes, which
 * the caller frees.  -1 with a message on a bad tensor, bad maxval or no memory (nothing allocated). */
int sd_pnm_pack(const sd_tensor *image, int maxval, char **buf, size_t *len)
{
	int64_t C = 0, H = 0, W = 0;
	*buf = NULL;
	*len = 0;
	if (maxval < 1 || maxval > 65535) return sd_seterr("maxval %d is not in [1, 65535]", maxval);
	if (image_dims(image, &C, &H, &W) < 0) return -1;

	/* libnetpbm writes to a FILE; an in-memory one lets the caller write the image whole. */
	char *mem = NULL;
	size_t memlen = 0;
	FILE *m = open_memstream(&mem, &memlen);
	if (!m) return sd_seterr("open_memstream: out of memory");
	int rc = encode(m, image->data, (int)C, (int)H, (int)W, maxval);
	if (fclose(m) != 0 && rc == 0) rc = sd_seterr("writing image: out of memory");
	if (rc < 0 || !mem) {
		free(mem);
		return rc < 0 ? -1 : sd_seterr("writing image: out of memory");
	}
	*buf = mem;
	*len = memlen;
	return 0;
}

/* Write one image to f with a single fwrite (so a failing image leaves nothing behind).  -1 with a
 * message on a bad tensor or a write error. */
int sd_pnm_write(FILE *f, const sd_tensor *image, int maxval)
{
	char *buf;
	size_t len;
	if (sd_pnm_pack(image, maxval, &buf, &len) < 0) return -1;
	size_t n = fwrite(buf, 1, len, f);
	free(buf);
	if (n != len) return sd_seterr("write error: %s", strerror(errno));
	return 0;
}
