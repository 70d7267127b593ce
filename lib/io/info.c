/*
 * info.c - readable summaries of tensor streams and .safetensors files (the `file`/`pamfile` of sdpipe,
 * for sd-info): per frame, each key with its value, tensors as dtype, shape and min/max/mean computed
 * in double over every element (f16/bf16 converted); per .safetensors file each tensor's name, dtype
 * and shape, the header's __metadata__ and the parameter count; folders of them.  Everything is written
 * to a FILE* the caller gives; nothing here prints anywhere else.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "sd.h"

/* ==== a small string builder for one output line ==== */

struct buf {
	char *p;
	size_t n, cap;
	int bad; /* out of memory: the rest is dropped */
};

static void bputs(struct buf *b, const char *s, size_t n)
{
	if (b->bad) return;
	if (b->n + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (b->n + n + 1 > cap) cap *= 2;
		char *p = realloc(b->p, cap);
		if (!p) {
			b->bad = 1;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->n, s, n);
	b->n += n;
	b->p[b->n] = 0;
}

static void bprintf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bprintf(struct buf *b, const char *fmt, ...)
{
	char tmp[512];
	va_list ap;
	va_start(ap, fmt);
	int k = vsnprintf(tmp, sizeof tmp, fmt, ap);
	va_end(ap);
	if (k < 0) return;
	bputs(b, tmp, (size_t)k < sizeof tmp ? (size_t)k : sizeof tmp - 1);
}

/* ==== numbers ==== */

char *sd_num_grouped(uint64_t v, char *buf, size_t n)
{
	char d[32];
	int k = snprintf(d, sizeof d, "%llu", (unsigned long long)v), j = 0;
	for (int i = 0; i < k && (size_t)j + 2 < n; i++) {
		if (i > 0 && (k - i) % 3 == 0) buf[j++] = ',';
		buf[j++] = d[i];
	}
	buf[j] = 0;
	return buf;
}

/* 859520964 → "859.5M"; bytes with unit "B": "1.72 GB". */
static char *human(double v, const char *unit, char *buf, size_t n)
{
	const char *sfx[] = {"", "K", "M", "G", "T", "P"};
	int i = 0;
	while (v >= 1000 && i < 5) { v /= 1000; i++; }
	if (i == 0) snprintf(buf, n, "%.0f%s%s", v, *unit ? " " : "", unit);
	else snprintf(buf, n, "%.1f%s%s%s", v, *unit ? " " : "", sfx[i], unit);
	return buf;
}

/* ==== tensors ==== */

struct stats {
	double min, max, sum;
	int64_t finite, nan, inf;
};

#define ACCUMULATE(TYPE, CONV)                                         \
	do {                                                               \
		const TYPE *p = t->data;                                       \
		for (int64_t i = 0; i < n; i++) {                              \
			double x = (double)CONV(p[i]);                             \
			if (isnan(x)) { st->nan++; continue; }                     \
			if (isinf(x)) { st->inf++; continue; }                     \
			if (x < st->min) st->min = x;                              \
			if (x > st->max) st->max = x;                              \
			st->sum += x;                                              \
			st->finite++;                                              \
		}                                                              \
	} while (0)
#define ASIS(x) (x)

/* min/max/mean in double over every element (NaN and ±inf counted apart). */
static void tensor_stats(const sd_tensor *t, struct stats *st)
{
	const int64_t n = sd_tensor_numel(t);
	st->min = INFINITY;
	st->max = -INFINITY;
	st->sum = 0;
	st->finite = st->nan = st->inf = 0;
	switch (t->dtype) {
	case SD_DTYPE_F32: ACCUMULATE(float, ASIS); break;
	case SD_DTYPE_F16: ACCUMULATE(uint16_t, sd_f16_to_f32); break;
	case SD_DTYPE_BF16: ACCUMULATE(uint16_t, sd_bf16_to_f32); break;
	case SD_DTYPE_F64: ACCUMULATE(double, ASIS); break;
	case SD_DTYPE_I32: ACCUMULATE(int32_t, ASIS); break;
	case SD_DTYPE_I64: ACCUMULATE(int64_t, ASIS); break;
	case SD_DTYPE_U8: ACCUMULATE(uint8_t, ASIS); break;
	default: break;
	}
}

/* "min 0  max 1  mean 0.5" (+ "  nan N  inf N"), or "empty" / "no finite values". */
static void stats_str(const sd_tensor *t, struct buf *b)
{
	struct stats st;
	if (t->device != SD_DEVICE_CPU || !t->data) { bprintf(b, "(not in CPU memory)"); return; }
	if (sd_tensor_numel(t) == 0) { bprintf(b, "empty"); return; }
	tensor_stats(t, &st);
	if (st.finite == 0) bprintf(b, "no finite values");
	else bprintf(b, "min %-11.6g max %-11.6g mean %.6g", st.min, st.max, st.sum / (double)st.finite);
	if (st.nan) bprintf(b, "  nan %lld", (long long)st.nan);
	if (st.inf) bprintf(b, "  inf %lld", (long long)st.inf);
}

/* ==== metadata values ==== */

/* A quoted string with C escapes, cut after `limit` bytes ("…" then marks the cut). */
static void quoted(struct buf *b, const char *s, size_t n, size_t limit)
{
	bputs(b, "\"", 1);
	size_t m = n < limit ? n : limit;
	for (size_t i = 0; i < m; i++) {
		unsigned char c = (unsigned char)s[i];
		switch (c) {
		case '"': bputs(b, "\\\"", 2); break;
		case '\\': bputs(b, "\\\\", 2); break;
		case '\n': bputs(b, "\\n", 2); break;
		case '\t': bputs(b, "\\t", 2); break;
		case '\r': bputs(b, "\\r", 2); break;
		default:
			if (c < 0x20 || c == 0x7f) bprintf(b, "\\x%02x", c);
			else bputs(b, (const char *)&s[i], 1);
		}
	}
	bputs(b, "\"", 1);
	if (m < n) bprintf(b, "... (%zu bytes)", n);
}

/* Metadata compactly: strings quoted, arrays and maps with at most 8 entries shown, nested tensors as
 * <dtype [shape]>.  Top-level strings are shown up to 400 bytes, nested ones up to 40. */
static void value_str(const sd_value *v, struct buf *b, int depth)
{
	char s[128];
	const size_t show = 8;
	if (depth > 6) { bprintf(b, "..."); return; }
	switch (v->type) {
	case SD_V_NIL: bprintf(b, "nil"); break;
	case SD_V_BOOL: bprintf(b, "%s", v->u.b ? "true" : "false"); break;
	case SD_V_INT: bprintf(b, "%lld", (long long)v->u.i); break;
	case SD_V_UINT: bprintf(b, "%llu", (unsigned long long)v->u.u); break;
	case SD_V_FLOAT: bprintf(b, "%.10g", v->u.f); break;
	case SD_V_STR: quoted(b, v->u.s.p, v->u.s.n, depth == 0 ? 400 : 40); break;
	case SD_V_BIN: bprintf(b, "<bin, %zu bytes>", v->u.s.n); break;
	case SD_V_TENSOR:
		bprintf(b, "<%s %s>", sd_dtype_name(v->u.t->dtype), sd_shape_str(v->u.t->ndim, v->u.t->shape, s, sizeof s));
		break;
	case SD_V_ARRAY:
		bputs(b, "[", 1);
		for (size_t i = 0; i < v->u.a.n && i < show; i++) {
			if (i) bputs(b, ", ", 2);
			value_str(v->u.a.v[i], b, depth + 1);
		}
		if (v->u.a.n > show) bprintf(b, ", ... (%zu items)", v->u.a.n);
		bputs(b, "]", 1);
		break;
	case SD_V_MAP:
		bputs(b, "{", 1);
		for (size_t i = 0; i < v->u.m.n && i < show; i++) {
			if (i) bputs(b, ", ", 2);
			bprintf(b, "%s: ", v->u.m.k[i]);
			value_str(v->u.m.v[i], b, depth + 1);
		}
		if (v->u.m.n > show) bprintf(b, ", ... (%zu keys)", v->u.m.n);
		bputs(b, "}", 1);
		break;
	}
}


/* ==== streams ==== */

int sd_frame_summarize(FILE *out, const sd_value *frame, long idx)
{
	char s[128];
	int kw = 0, dw = 0, sw = 0; /* column widths: key, dtype, shape */
	for (size_t i = 0; i < frame->u.m.n; i++) {
		int k = (int)strlen(frame->u.m.k[i]);
		if (k > kw) kw = k;
		const sd_value *v = frame->u.m.v[i];
		if (v->type == SD_V_TENSOR) {
			int w = (int)strlen(sd_shape_str(v->u.t->ndim, v->u.t->shape, s, sizeof s));
			if (w > sw) sw = w;
			w = (int)strlen(sd_dtype_name(v->u.t->dtype));
			if (w > dw) dw = w;
		}
	}
	fprintf(out, "frame %ld\n", idx);
	if (frame->u.m.n == 0) fprintf(out, "  (no keys)\n");
	struct buf b = {0};
	for (size_t i = 0; i < frame->u.m.n; i++) {
		const sd_value *v = frame->u.m.v[i];
		b.n = 0;
		bprintf(&b, "  %-*s  ", kw, frame->u.m.k[i]);
		if (v->type == SD_V_TENSOR) {
			const sd_tensor *t = v->u.t;
			bprintf(&b, "%-*s  %-*s  ", dw, sd_dtype_name(t->dtype), sw, sd_shape_str(t->ndim, t->shape, s, sizeof s));
			stats_str(t, &b);
		} else {
			value_str(v, &b, 0);
		}
		if (b.bad) break;
		while (b.n > 0 && b.p[b.n - 1] == ' ') b.p[--b.n] = 0;
		fprintf(out, "%s\n", b.p);
	}
	free(b.p);
	return b.bad ? sd_seterr("out of memory") : 0;
}

int sd_stream_summarize(FILE *out, FILE *in, const char *name)
{
	sd_reader *r = sd_reader_new(in, name);
	if (!r) return sd_preerr("%s", name);
	sd_value *frame;
	long n = 0;
	int rc;
	while ((rc = sd_reader_next(r, &frame)) == 1) {
		int bad = sd_frame_summarize(out, frame, sd_reader_index(r));
		sd_value_free(frame);
		if (bad) {
			sd_reader_free(r);
			return -1;
		}
		n++;
	}
	sd_reader_free(r);
	if (rc < 0) return -1;
	fprintf(out, "%ld frame%s\n", n, n == 1 ? "" : "s");
	return 0;
}

/* ==== safetensors ==== */

/* The error of a library call on path, with the path in front unless the message has it already. */
static int path_err(const char *path)
{
	const char *m = sd_errmsg();
	if (!strncmp(m, path, strlen(path))) return -1;
	return sd_preerr("%s", path);
}

int sd_st_summarize(FILE *out, const char *path, sd_st_totals *tot)
{
	char s[128], g[64], h[32], hb[32];
	sd_st *f = sd_st_open(path);
	if (!f) return path_err(path);
	const int n = sd_st_count(f);
	int nw = 4, sw = 5;
	uint64_t params = 0, bytes = 0;
	for (int i = 0; i < n; i++) {
		const sd_tensor *t = sd_st_tensor(f, i);
		int k = (int)strlen(sd_st_name(f, i));
		if (k > nw) nw = k;
		k = (int)strlen(sd_shape_str(t->ndim, t->shape, s, sizeof s));
		if (k > sw) sw = k;
		params += (uint64_t)sd_tensor_numel(t);
		bytes += sd_tensor_nbytes(t);
	}
	fprintf(out, "%s\n", path);
	if (n > 0) fprintf(out, "  %-*s  %-5s  %s\n", nw, "name", "dtype", "shape");
	for (int i = 0; i < n; i++) {
		const sd_tensor *t = sd_st_tensor(f, i);
		fprintf(out, "  %-*s  %-5s  %s\n", nw, sd_st_name(f, i), sd_dtype_name(t->dtype),
		        sd_shape_str(t->ndim, t->shape, s, sizeof s));
	}
	const int nm = sd_st_meta_count(f);
	if (nm > 0) {
		int kw = 0;
		for (int i = 0; i < nm; i++) {
			int k = (int)strlen(sd_st_meta_key(f, i));
			if (k > kw) kw = k;
		}
		fprintf(out, "  __metadata__\n");
		struct buf b = {0};
		for (int i = 0; i < nm && !b.bad; i++) {
			const char *v = sd_st_meta_val(f, i);
			b.n = 0;
			quoted(&b, v, strlen(v), 400);
			if (!b.bad) fprintf(out, "    %-*s  %s\n", kw, sd_st_meta_key(f, i), b.p);
		}
		free(b.p);
		if (b.bad) {
			sd_st_close(f);
			return sd_seterr("out of memory");
		}
	}
	fprintf(out, "  %d tensor%s, %s parameters (%s), %s\n", n, n == 1 ? "" : "s", sd_num_grouped(params, g, sizeof g),
	        human((double)params, "", h, sizeof h), human((double)bytes, "B", hb, sizeof hb));
	sd_st_close(f);
	if (tot) {
		tot->files++;
		tot->tensors += n;
		tot->params += params;
		tot->bytes += bytes;
	}
	return 0;
}

static int has_suffix(const char *s, const char *suffix)
{
	size_t n = strlen(s), m = strlen(suffix);
	return n >= m && !strcmp(s + n - m, suffix);
}

static int skip_dot(const struct dirent *d) { return d->d_name[0] != '.'; }

/* A folder (a diffusers model, a Hugging Face snapshot): config.json names and every .safetensors file,
 * in name order, recursing into subfolders (not into hidden ones nor through symbolic links). */
static int walk(FILE *out, const char *dir, sd_st_totals *tot)
{
	struct dirent **ents;
	int n = scandir(dir, &ents, skip_dot, alphasort), rc = 0;
	if (n < 0) return sd_seterr("%s: %s", dir, strerror(errno));
	/* files first, then subfolders, so that a folder's config.json heads its weights */
	for (int pass = 0; pass < 2 && !rc; pass++) {
		for (int i = 0; i < n && !rc; i++) {
			char path[4096];
			struct stat st;
			int k = snprintf(path, sizeof path, "%s%s%s", dir, has_suffix(dir, "/") ? "" : "/", ents[i]->d_name);
			if (k < 0 || (size_t)k >= sizeof path) {
				rc = sd_seterr("%s: path too long", dir);
				break;
			}
			if (lstat(path, &st) < 0) {
				rc = sd_seterr("%s: %s", path, strerror(errno));
				break;
			}
			if (S_ISLNK(st.st_mode) && stat(path, &st) < 0) continue; /* dangling link */
			int is_dir = S_ISDIR(st.st_mode);
			if (pass == 0 && !is_dir) {
				if (!strcmp(ents[i]->d_name, "config.json") || has_suffix(ents[i]->d_name, "_config.json"))
					fprintf(out, "%s  (config)\n", path);
				else if (has_suffix(ents[i]->d_name, ".safetensors"))
					rc = sd_st_summarize(out, path, tot);
			} else if (pass == 1 && is_dir) {
				struct stat lst;
				if (lstat(path, &lst) == 0 && !S_ISLNK(lst.st_mode)) rc = walk(out, path, tot);
			}
		}
	}
	for (int i = 0; i < n; i++) free(ents[i]);
	free(ents);
	return rc;
}

int sd_folder_summarize(FILE *out, const char *dir)
{
	char g[64], h[32], hb[32];
	sd_st_totals tot = {0};
	if (walk(out, dir, &tot)) return -1;
	fprintf(out, "%s: %ld safetensors file%s, %lld tensors, %s parameters (%s), %s\n", dir, tot.files,
	        tot.files == 1 ? "" : "s", (long long)tot.tensors, sd_num_grouped(tot.params, g, sizeof g),
	        human((double)tot.params, "", h, sizeof h), human((double)tot.bytes, "B", hb, sizeof hb));
	return 0;
}
