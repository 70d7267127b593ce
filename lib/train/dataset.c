/*
 * train/dataset.c - the training images of sd-lora-train: a folder or an archive (libarchive) of
 * PNG, JPEG or PNM/PAM images (lib/io/image.c) with same-name .txt captions, or a tensor stream of
 * "image" (+ "prompt") frames,
 * resized to a square (the study squashed with PIL's bilinear Image.resize; crop keeps the aspect) and
 * scaled to [-1, 1] as diffusers' transforms.Normalize([0.5], [0.5]) does.
 */
#include <archive.h>
#include <archive_entry.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include "sd.h"

/* ==== resizing ==== */

/* Weights of PIL's separable resampling along one axis (triangle filter, support 1 scaled by the
 * shrink factor): for output i the input range [*lo, *lo + *cnt) and cnt weights (normalised). */
static int axis_weights(int in, int out, int **lo, int **cnt, float **w, int *kmax)
{
	double scale = (double)in / out, fs = scale > 1 ? scale : 1, support = 1.0 * fs;
	int km = (int)ceil(support) * 2 + 1;
	*lo = malloc(out * sizeof **lo);
	*cnt = malloc(out * sizeof **cnt);
	*w = calloc((size_t)out * km, sizeof **w);
	if (!*lo || !*cnt || !*w) return sd_seterr("out of memory");
	for (int i = 0; i < out; i++) {
		double c = (i + 0.5) * scale;
		int a = (int)floor(c - support + 0.5), b = (int)floor(c + support + 0.5);
		if (a < 0) a = 0;
		if (b > in) b = in;
		double sum = 0;
		float *wi = *w + (size_t)i * km;
		for (int j = a; j < b && j - a < km; j++) {
			double x = (j - c + 0.5) / fs, t = fabs(x) < 1 ? 1 - fabs(x) : 0;
			wi[j - a] = (float)t;
			sum += t;
		}
		if (b - a > km) b = a + km;
		for (int j = 0; j < b - a; j++) wi[j] = sum > 0 ? (float)(wi[j] / sum) : 0;
		(*lo)[i] = a;
		(*cnt)[i] = b - a;
	}
	*kmax = km;
	return 0;
}

int sd_resize_bilinear(sd_tensor *out, const sd_tensor *in)
{
	int64_t C = in->shape[in->ndim - 3], ih = in->shape[in->ndim - 2], iw = in->shape[in->ndim - 1];
	int64_t oh = out->shape[out->ndim - 2], ow = out->shape[out->ndim - 1];
	int *xl = NULL, *xc = NULL, *yl = NULL, *yc = NULL, kx, ky, rc = -1;
	float *wx = NULL, *wy = NULL, *tmp = NULL;
	if (axis_weights((int)iw, (int)ow, &xl, &xc, &wx, &kx) || axis_weights((int)ih, (int)oh, &yl, &yc, &wy, &ky))
		goto done;
	if (!(tmp = malloc((size_t)C * ih * ow * sizeof *tmp))) {
		sd_seterr("out of memory");
		goto done;
	}
	const float *src = in->data;
	float *dst = out->data;
	for (int64_t c = 0; c < C; c++)
		for (int64_t y = 0; y < ih; y++)
			for (int64_t x = 0; x < ow; x++) {
				const float *row = src + (c * ih + y) * iw + xl[x], *w = wx + x * kx;
				double s = 0;
				for (int k = 0; k < xc[x]; k++) s += row[k] * w[k];
				tmp[(c * ih + y) * ow + x] = (float)s;
			}
	for (int64_t c = 0; c < C; c++)
		for (int64_t y = 0; y < oh; y++)
			for (int64_t x = 0; x < ow; x++) {
				const float *w = wy + y * ky;
				double s = 0;
				for (int k = 0; k < yc[y]; k++) s += tmp[(c * ih + yl[y] + k) * ow + x] * w[k];
				dst[(c * oh + y) * ow + x] = (float)s;
			}
	rc = 0;
done:
	free(xl), free(xc), free(yl), free(yc), free(wx), free(wy), free(tmp);
	return rc;
}

/* (3, res, res) in [-1, 1] from an image [1, C, H, W] in [0, 1]. */
static sd_tensor *prepare(const sd_tensor *img, int res, enum sd_resize_mode mode)
{
	int64_t C = img->shape[1], H = img->shape[2], W = img->shape[3];
	if (C != 1 && C != 3 && C != 4 && C != 2) return sd_seterr("depth %lld is not an image's", (long long)C), NULL;
	/* RGB (grey replicated, alpha dropped) */
	int64_t s3[3] = {3, H, W};
	sd_tensor *rgb = sd_tensor_new(SD_DTYPE_F32, 3, s3), *out = NULL;
	if (!rgb) return NULL;
	const float *p = img->data;
	for (int c = 0; c < 3; c++) {
		int sc = C >= 3 ? c : 0;
		memcpy((float *)rgb->data + c * H * W, p + sc * H * W, H * W * sizeof(float));
	}
	if (mode == SD_RESIZE_CROP) {
		/* resize the short side to res, then the centre res × res */
		int64_t nh = H <= W ? res : (int64_t)llround((double)H * res / W), nw = W < H ? res : (int64_t)llround((double)W * res / H);
		if (nh < res) nh = res;
		if (nw < res) nw = res;
		int64_t sr[3] = {3, nh, nw};
		sd_tensor *r = sd_tensor_new(SD_DTYPE_F32, 3, sr);
		if (!r || sd_resize_bilinear(r, rgb)) {
			sd_tensor_free(r);
			sd_tensor_free(rgb);
			return NULL;
		}
		int64_t so[3] = {3, res, res}, y0 = (nh - res) / 2, x0 = (nw - res) / 2;
		if (!(out = sd_tensor_new(SD_DTYPE_F32, 3, so))) goto fail;
		for (int c = 0; c < 3; c++)
			for (int64_t y = 0; y < res; y++)
				memcpy((float *)out->data + (c * res + y) * res, (float *)r->data + (c * nh + y + y0) * nw + x0,
				       res * sizeof(float));
		sd_tensor_free(r);
	} else {
		int64_t so[3] = {3, res, res};
		if (!(out = sd_tensor_new(SD_DTYPE_F32, 3, so))) goto fail;
		if (H == res && W == res) memcpy(out->data, rgb->data, sd_tensor_nbytes(out));
		else if (sd_resize_bilinear(out, rgb)) goto fail;
	}
	sd_tensor_free(rgb);
	float *o = out->data;
	for (int64_t i = 0; i < sd_tensor_numel(out); i++) {
		float v = o[i] < 0 ? 0 : o[i] > 1 ? 1 : o[i];
		o[i] = 2 * v - 1;
	}
	return out;
fail:
	sd_tensor_free(out);
	sd_tensor_free(rgb);
	return NULL;
}

/* ==== collecting entries ==== */

struct entry {
	char *name;   /* file name within the folder or archive */
	char *data;   /* its bytes */
	size_t len;
};

struct entries {
	struct entry *e;
	int n, cap;
};

static int entries_add(struct entries *E, const char *name, char *data, size_t len)
{
	if (E->n == E->cap) {
		int nc = E->cap ? 2 * E->cap : 32;
		struct entry *p = realloc(E->e, nc * sizeof *p);
		if (!p) return sd_seterr("out of memory");
		E->e = p, E->cap = nc;
	}
	if (!(E->e[E->n].name = strdup(name))) return sd_seterr("out of memory");
	E->e[E->n].data = data;
	E->e[E->n].len = len;
	E->n++;
	return 0;
}

static void entries_free(struct entries *E)
{
	for (int i = 0; i < E->n; i++) free(E->e[i].name), free(E->e[i].data);
	free(E->e);
}

static int cmp_entry(const void *a, const void *b)
{
	return strcmp(((const struct entry *)a)->name, ((const struct entry *)b)->name);
}

static const char *base_name(const char *p)
{
	const char *s = strrchr(p, '/');
	return s ? s + 1 : p;
}

static int read_folder(const char *dir, struct entries *E)
{
	DIR *d = opendir(dir);
	if (!d) return sd_seterr("%s: %s", dir, strerror(errno));
	struct dirent *de;
	int rc = 0;
	while (!rc && (de = readdir(d))) {
		if (de->d_name[0] == '.') continue;
		size_t n = strlen(dir) + strlen(de->d_name) + 2;
		char *p = malloc(n);
		if (!p) {
			rc = sd_seterr("out of memory");
			break;
		}
		snprintf(p, n, "%s/%s", dir, de->d_name);
		struct stat st;
		if (stat(p, &st) == 0 && S_ISREG(st.st_mode)) {
			size_t len;
			char *buf = sd_read_file(p, (size_t)1 << 31, &len);
			if (!buf) rc = -1;
			else rc = entries_add(E, de->d_name, buf, len);
		}
		free(p);
	}
	closedir(d);
	return rc;
}

static int read_archive(const char *path, struct entries *E)
{
	struct archive *a = archive_read_new();
	if (!a) return sd_seterr("out of memory");
	archive_read_support_filter_all(a);
	archive_read_support_format_all(a);
	int rc = 0;
	if (archive_read_open_filename(a, path, 1 << 16) != ARCHIVE_OK) {
		rc = sd_seterr("%s: %s", path, archive_error_string(a));
		goto out;
	}
	struct archive_entry *ae;
	int r;
	while ((r = archive_read_next_header(a, &ae)) == ARCHIVE_OK) {
		if (archive_entry_filetype(ae) != AE_IFREG) continue;
		const char *name = archive_entry_pathname(ae);
		if (!name || base_name(name)[0] == '.') continue;
		int64_t sz = archive_entry_size(ae);
		if (sz < 0 || sz > ((int64_t)1 << 31)) {
			rc = sd_seterr("%s: %s: entry too large", path, name);
			goto out;
		}
		char *buf = malloc(sz ? (size_t)sz : 1);
		if (!buf) {
			rc = sd_seterr("out of memory");
			goto out;
		}
		la_ssize_t got = archive_read_data(a, buf, (size_t)sz);
		if (got != sz) {
			free(buf);
			rc = sd_seterr("%s: %s: %s", path, name, got < 0 ? archive_error_string(a) : "truncated entry");
			goto out;
		}
		if ((rc = entries_add(E, name, buf, (size_t)sz))) goto out;
	}
	if (r != ARCHIVE_EOF) rc = sd_seterr("%s: %s", path, archive_error_string(a));
out:
	archive_read_free(a);
	return rc;
}

static int ends_with_ci(const char *s, const char *suf)
{
	size_t n = strlen(s), k = strlen(suf);
	return n >= k && !strcasecmp(s + n - k, suf);
}

static int ds_push(sd_dataset *d, sd_tensor *px, char *caption, const char *name)
{
	sd_tensor **p = realloc(d->pixels, (d->n + 1) * sizeof *p);
	if (p) d->pixels = p;
	char **c = realloc(d->captions, (d->n + 1) * sizeof *c);
	if (c) d->captions = c;
	char **nm = realloc(d->names, (d->n + 1) * sizeof *nm);
	if (nm) d->names = nm;
	if (!p || !c || !nm) return sd_seterr("out of memory");
	d->pixels[d->n] = px;
	d->captions[d->n] = caption;
	d->names[d->n] = strdup(name);
	d->n++;
	return 0;
}

/* A caption's text: trailing white space removed. */
static char *caption_text(const char *data, size_t len)
{
	while (len && (data[len - 1] == '\n' || data[len - 1] == '\r' || data[len - 1] == ' ' || data[len - 1] == '\t')) len--;
	char *s = malloc(len + 1);
	if (s) memcpy(s, data, len), s[len] = 0;
	return s;
}

static int from_entries(sd_dataset *d, struct entries *E, const char *where, enum sd_resize_mode mode)
{
	qsort(E->e, E->n, sizeof *E->e, cmp_entry);
	for (int i = 0; i < E->n; i++) {
		struct entry *e = &E->e[i];
		if (ends_with_ci(e->name, ".txt")) continue;
		if (!sd_image_sniff(e->data, e->len))
			return sd_seterr("%s/%s: not a PNG, JPEG or PNM image", where, e->name);
		char nm[4200];
		snprintf(nm, sizeof nm, "%s/%s", where, e->name);
		sd_tensor *img = sd_image_decode(e->data, e->len, nm, NULL, NULL);
		if (!img) return -1;
		sd_tensor *px = prepare(img, d->res, mode);
		sd_tensor_free(img);
		if (!px) return sd_preerr("%s/%s", where, e->name);
		/* the same-name caption: name with its extension replaced by .txt */
		char *cap = NULL;
		const char *dot = strrchr(e->name, '.');
		size_t stem = dot && dot > e->name + (strrchr(e->name, '/') ? strrchr(e->name, '/') - e->name : 0)
		                  ? (size_t)(dot - e->name) : strlen(e->name);
		for (int j = 0; j < E->n; j++) {
			const char *n = E->e[j].name;
			if (strlen(n) == stem + 4 && !strncmp(n, e->name, stem) && !strcasecmp(n + stem, ".txt")) {
				if (!(cap = caption_text(E->e[j].data, E->e[j].len))) return sd_seterr("out of memory");
				break;
			}
		}
		if (ds_push(d, px, cap, e->name)) return -1;
	}
	return 0;
}

static int from_stream(sd_dataset *d, enum sd_resize_mode mode)
{
	sd_reader *r = sd_reader_new(stdin, "stdin");
	if (!r) return -1;
	sd_value *fr;
	int rc;
	while ((rc = sd_reader_next(r, &fr)) == 1) {
		long idx = sd_reader_index(r);
		sd_tensor *img = sd_map_tensor(fr, "image"), *conv = NULL;
		if (!img) {
			sd_value_free(fr);
			sd_reader_free(r);
			return sd_seterr("stdin: frame %ld: no \"image\" tensor (images come in through pnmtotensor)", idx);
		}
		if (img->dtype != SD_DTYPE_F32 && !(conv = sd_tensor_convert(img, SD_DTYPE_F32))) {
			sd_value_free(fr);
			sd_reader_free(r);
			return sd_preerr("stdin: frame %ld", idx);
		}
		const sd_tensor *x = conv ? conv : img;
		if (x->ndim != 4) {
			sd_tensor_free(conv);
			sd_value_free(fr);
			sd_reader_free(r);
			return sd_seterr("stdin: frame %ld: \"image\" is not [N,C,H,W]", idx);
		}
		const char *prompt = sd_map_str(fr, "prompt");
		int64_t per = x->shape[1] * x->shape[2] * x->shape[3];
		for (int64_t n = 0; n < x->shape[0]; n++) {
			int64_t s[4] = {1, x->shape[1], x->shape[2], x->shape[3]};
			sd_tensor *one = sd_tensor_wrap(SD_DTYPE_F32, 4, s, (float *)x->data + n * per);
			sd_tensor *px = one ? prepare(one, d->res, mode) : NULL;
			sd_tensor_free(one);
			char name[64];
			snprintf(name, sizeof name, "stdin:frame %ld:%lld", idx, (long long)n);
			char *cap = prompt ? strdup(prompt) : NULL;
			if (!px || ds_push(d, px, cap, name)) {
				sd_tensor_free(conv);
				sd_value_free(fr);
				sd_reader_free(r);
				return sd_preerr("stdin: frame %ld", idx);
			}
		}
		sd_tensor_free(conv);
		sd_value_free(fr);
	}
	sd_reader_free(r);
	return rc < 0 ? -1 : 0;
}

sd_dataset *sd_dataset_read(const char *path, int res, enum sd_resize_mode mode)
{
	sd_dataset *d = calloc(1, sizeof *d);
	if (!d) return sd_seterr("out of memory"), NULL;
	d->res = res;
	int rc;
	if (!strcmp(path, "-")) {
		rc = from_stream(d, mode);
	} else {
		struct stat st;
		struct entries E = {0};
		if (stat(path, &st) != 0) rc = sd_seterr("%s: %s", path, strerror(errno));
		else if (S_ISDIR(st.st_mode)) rc = read_folder(path, &E);
		else rc = read_archive(path, &E);
		if (!rc) rc = from_entries(d, &E, path, mode);
		entries_free(&E);
	}
	if (!rc && d->n == 0) rc = sd_seterr("%s: no images (PNG, JPEG or PNM files) in the data set", !strcmp(path, "-") ? "stdin" : path);
	if (rc) {
		sd_dataset_free(d);
		return NULL;
	}
	return d;
}

void sd_dataset_free(sd_dataset *d)
{
	if (!d) return;
	for (int i = 0; i < d->n; i++) {
		sd_tensor_free(d->pixels[i]);
		free(d->captions[i]);
		free(d->names[i]);
	}
	free(d->pixels), free(d->captions), free(d->names);
	free(d);
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
	const unsigned char *s = p;
	for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ULL;
	return h;
}

void sd_dataset_hash(const sd_dataset *d, char *buf)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (int i = 0; i < d->n; i++) {
		h = fnv(h, d->pixels[i]->data, sd_tensor_nbytes(d->pixels[i]));
		const char *c = d->captions[i] ? d->captions[i] : "";
		h = fnv(h, c, strlen(c) + 1);
	}
	snprintf(buf, 17, "%016llx", (unsigned long long)h);
}
