/*
 * stream.c - tensor streams (sd-tensor(5)): a sequence of msgpack maps, read until end of file, whose
 * tensors are {"dtype", "shape", "data"} maps.  Mirrors what Python's msgpack.Unpacker(sys.stdin.buffer)
 * yields, with msgpack-c 4.0 doing the decoding and encoding.
 *
 * Reading is in two passes over each frame.  A small resumable scanner walks the msgpack headers as the
 * bytes arrive (fread in chunks of at most 1 MiB, never past the end of the current frame, so a filter in
 * a pipe sees each frame as soon as it is whole) to find where the frame ends, to enforce the frame cap
 * and the nesting limit, and to reject garbage early.  Only then does msgpack_unpack_next() decode the
 * complete frame.  The scanner is there because msgpack-c allocates n objects as soon as it sees an
 * array or map header announcing n entries: five hostile bytes would ask for 64 GiB.  Once the frame is
 * known to be complete, every announced count is backed by real bytes, so memory stays proportional to
 * the input.
 */
#include <errno.h>
#include <limits.h>
#include <msgpack.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "sd.h"

#define CHUNK ((size_t)1 << 20)
#define MAX_DEPTH 32 /* msgpack-c's own limit (MSGPACK_EMBED_STACK_SIZE) */

/* ==== the scanner: where does the frame end? ==== */

/* Where an error happened, for messages: "<name>: frame <index>". */
struct where {
	const char *name;
	long frame;
	uint64_t base; /* stream offset of the frame's first byte */
};

/* Progress through one frame: level 0 holds the root item, level k the k-th nested container. */
struct scan {
	size_t pos;              /* first byte not yet scanned (relative to the frame) */
	int top;                 /* current level */
	uint64_t left[MAX_DEPTH + 1]; /* items still to come at each level (a map of n pairs has 2n) */
	uint64_t pending;        /* sum of left[]: each needs at least one more byte */
};

static void scan_init(struct scan *s)
{
	memset(s, 0, sizeof *s);
	s->left[0] = 1;
	s->pending = 1;
}

static uint64_t be(const unsigned char *p, int n)
{
	uint64_t v = 0;
	for (int i = 0; i < n; i++) v = v << 8 | p[i];
	return v;
}

/* What the byte b starts, for messages. */
static const char *kind(unsigned b)
{
	if (b <= 0x7f || (b >= 0xcc && b <= 0xcf)) return "a positive integer";
	if (b >= 0xe0 || (b >= 0xd0 && b <= 0xd3)) return "a negative integer";
	if (b <= 0x8f || b == 0xde || b == 0xdf) return "a map";
	if (b <= 0x9f || b == 0xdc || b == 0xdd) return "an array";
	if (b <= 0xbf || (b >= 0xd9 && b <= 0xdb)) return "a string";
	if (b == 0xc0) return "nil";
	if (b == 0xc2 || b == 0xc3) return "a bool";
	if (b >= 0xc4 && b <= 0xc6) return "a bin";
	if (b == 0xca || b == 0xcb) return "a float";
	if (b == 0xc1) return "never used in msgpack";
	return "an ext value";
}

/*
 * Scan the items of buf[0..len) from where the last call stopped.  1: the frame is complete and ends at
 * s->pos.  0: more bytes are needed; *need is a lower bound on how many (every item still announced is
 * at least one byte, and a string or bin announces its whole length), so reading *need more bytes never
 * reads past the frame.  -1: the bytes cannot start a frame (not msgpack, not a map, too deep).
 */
static int scan_frame(struct scan *s, const unsigned char *buf, size_t len, uint64_t *need,
                      const struct where *w)
{
	while (s->pending) {
		size_t avail = len - s->pos;
		if (!avail) {
			*need = s->pending;
			return 0;
		}
		const unsigned char *p = buf + s->pos;
		unsigned b = p[0];
		if (s->top == 0 && !((b >= 0x80 && b <= 0x8f) || b == 0xde || b == 0xdf)) {
			if (b == 0xc1)
				return sd_seterr("%s: frame %ld: not msgpack (byte 0xc1 at offset %llu)", w->name,
				                 w->frame, (unsigned long long)w->base);
			return sd_seterr("%s: frame %ld: not a map (byte 0x%02x at offset %llu starts %s; "
			                 "garbage in the stream?)", w->name, w->frame, b,
			                 (unsigned long long)w->base, kind(b));
		}
		int hdr = 1;          /* header bytes */
		uint64_t body = 0;    /* payload bytes after the header */
		uint64_t items = 0;   /* children, for a container */
		int container = 0;
		if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
			hdr = 1;
		} else if (b <= 0x8f) {
			container = 1, items = 2 * (uint64_t)(b & 15);
		} else if (b <= 0x9f) {
			container = 1, items = b & 15;
		} else if (b <= 0xbf) {
			body = b & 31;
		} else {
			switch (b) {
			case 0xc4: case 0xd9: hdr = 2; break;      /* bin8, str8 */
			case 0xc5: case 0xda: hdr = 3; break;      /* bin16, str16 */
			case 0xc6: case 0xdb: hdr = 5; break;      /* bin32, str32 */
			case 0xc7: hdr = 3; break;                 /* ext8: length, type */
			case 0xc8: hdr = 4; break;
			case 0xc9: hdr = 6; break;
			case 0xca: hdr = 5; break;                 /* float32 */
			case 0xcb: hdr = 9; break;
			case 0xcc: case 0xd0: hdr = 2; break;
			case 0xcd: case 0xd1: hdr = 3; break;
			case 0xce: case 0xd2: hdr = 5; break;
			case 0xcf: case 0xd3: hdr = 9; break;
			case 0xd4: hdr = 2, body = 1; break;       /* fixext1..16: type, data */
			case 0xd5: hdr = 2, body = 2; break;
			case 0xd6: hdr = 2, body = 4; break;
			case 0xd7: hdr = 2, body = 8; break;
			case 0xd8: hdr = 2, body = 16; break;
			case 0xdc: case 0xde: hdr = 3, container = 1; break;
			case 0xdd: case 0xdf: hdr = 5, container = 1; break;
			default:
				return sd_seterr("%s: frame %ld: not msgpack (byte 0x%02x at offset %llu)", w->name,
				                 w->frame, b, (unsigned long long)(w->base + s->pos));
			}
		}
		if (avail < (size_t)hdr) {
			*need = (uint64_t)hdr - avail + s->pending - 1;
			return 0;
		}
		switch (b) { /* lengths and counts that live in the header */
		case 0xc4: case 0xc5: case 0xc6: case 0xd9: case 0xda: case 0xdb:
			body = be(p + 1, hdr - 1);
			break;
		case 0xc7: case 0xc8: case 0xc9:
			body = be(p + 1, hdr - 2);
			break;
		case 0xdc: case 0xdd:
			items = be(p + 1, hdr - 1);
			break;
		case 0xde: case 0xdf:
			items = 2 * be(p + 1, hdr - 1);
			break;
		}
		if (avail - hdr < body) {
			*need = hdr + body - avail + s->pending - 1;
			return 0;
		}
		s->pos += hdr + (size_t)body;
		s->left[s->top]--;
		s->pending--;
		if (container) {
			if (s->top >= MAX_DEPTH)
				return sd_seterr("%s: frame %ld: nesting deeper than %d levels", w->name, w->frame,
				                 MAX_DEPTH);
			if (items) {
				s->left[++s->top] = items;
				s->pending += items;
			}
		}
		while (s->top > 0 && s->left[s->top] == 0) s->top--;
	}
	return 1;
}

/* ==== msgpack objects to values ==== */

/* The dotted path of the value being converted ("sampler.noise", "images[2]"), for messages. */
struct path {
	char s[200];
	size_t n;
};

static size_t path_push_key(struct path *p, const char *k, size_t kn)
{
	size_t old = p->n;
	int w = snprintf(p->s + p->n, sizeof p->s - p->n, "%s%.*s", p->n ? "." : "", (int)(kn > 64 ? 64 : kn), k);
	if (w > 0) p->n = p->n + (size_t)w < sizeof p->s ? p->n + (size_t)w : sizeof p->s - 1;
	return old;
}

static size_t path_push_index(struct path *p, size_t i)
{
	size_t old = p->n;
	int w = snprintf(p->s + p->n, sizeof p->s - p->n, "[%zu]", i);
	if (w > 0) p->n = p->n + (size_t)w < sizeof p->s ? p->n + (size_t)w : sizeof p->s - 1;
	return old;
}

static void path_pop(struct path *p, size_t old)
{
	p->n = old;
	p->s[old] = 0;
}

static const char *otype(const msgpack_object *o)
{
	switch (o->type) {
	case MSGPACK_OBJECT_NIL: return "nil";
	case MSGPACK_OBJECT_BOOLEAN: return "a bool";
	case MSGPACK_OBJECT_POSITIVE_INTEGER:
	case MSGPACK_OBJECT_NEGATIVE_INTEGER: return "an integer";
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64: return "a float";
	case MSGPACK_OBJECT_STR: return "a string";
	case MSGPACK_OBJECT_BIN: return "a bin";
	case MSGPACK_OBJECT_ARRAY: return "an array";
	case MSGPACK_OBJECT_MAP: return "a map";
	default: return "an ext value";
	}
}

/* Printable copy of a (possibly binary) string for messages. */
static const char *shown(const char *s, size_t n, char *buf, size_t cap)
{
	size_t k = n < cap - 4 ? n : cap - 4;
	for (size_t i = 0; i < k; i++) buf[i] = (s[i] >= 32 && s[i] < 127) ? s[i] : '?';
	strcpy(buf + k, n > k ? "..." : "");
	return buf;
}

static int key_is(const msgpack_object *k, const char *s)
{
	return k->type == MSGPACK_OBJECT_STR && k->via.str.size == strlen(s) &&
	       memcmp(k->via.str.ptr, s, k->via.str.size) == 0;
}

static int strcmp_obj(const void *a, const void *b)
{
	const msgpack_object_str *x = *(msgpack_object_str *const *)a, *y = *(msgpack_object_str *const *)b;
	if (x->size != y->size) return x->size < y->size ? -1 : 1;
	return x->size ? memcmp(x->ptr, y->ptr, x->size) : 0;
}

/*
 * Check that a map's keys are strings without NUL bytes and without repeats (a map with two equal keys
 * would lose one of them in Python).  Sorting keeps a hostile map of a million keys from taking n².
 */
static int check_keys(const msgpack_object_map *m, const struct where *w, struct path *p)
{
	char b[80];
	for (uint32_t i = 0; i < m->size; i++) {
		const msgpack_object *k = &m->ptr[i].key;
		if (k->type != MSGPACK_OBJECT_STR)
			return sd_seterr("%s: frame %ld: %s%s%s: a key is %s, not a string", w->name, w->frame,
			                 p->n ? "map '" : "the frame", p->s, p->n ? "'" : "", otype(k));
		if (k->via.str.size && memchr(k->via.str.ptr, 0, k->via.str.size)) /* "" may have a NULL ptr */
			return sd_seterr("%s: frame %ld: key '%s' holds a NUL byte", w->name, w->frame,
			                 shown(k->via.str.ptr, k->via.str.size, b, sizeof b));
	}
	if (m->size < 2) return 0;
	const msgpack_object_str **v = malloc(m->size * sizeof *v);
	if (!v) return sd_seterr("out of memory");
	for (uint32_t i = 0; i < m->size; i++) v[i] = &m->ptr[i].key.via.str;
	qsort(v, m->size, sizeof *v, strcmp_obj);
	for (uint32_t i = 1; i < m->size; i++)
		if (strcmp_obj(&v[i - 1], &v[i]) == 0) {
			sd_seterr("%s: frame %ld: %s%s%s: duplicate key '%s'", w->name, w->frame,
			          p->n ? "map '" : "the frame", p->s, p->n ? "'" : "",
			          shown(v[i]->ptr, v[i]->size, b, sizeof b));
			free(v);
			return -1;
		}
	free(v);
	return 0;
}

/*
 * A tensor map {"dtype", "shape", "data"} (keys already checked to be distinct strings) to an owned
 * sd_tensor: exactly those keys, a known dtype, 0..8 non-negative dims whose product fits, and a bin of
 * exactly numel × dtype size bytes.  NULL with a message naming the tensor's path otherwise.
 */
static sd_tensor *conv_tensor(const msgpack_object_map *m, const struct where *w, const struct path *p)
{
	const msgpack_object *dt = NULL, *sh = NULL, *da = NULL;
	char b[80], s[200];
	for (uint32_t i = 0; i < m->size; i++) {
		const msgpack_object *k = &m->ptr[i].key, *v = &m->ptr[i].val;
		if (key_is(k, "dtype")) dt = v;
		else if (key_is(k, "shape")) sh = v;
		else if (key_is(k, "data")) da = v;
		else {
			sd_seterr("%s: frame %ld: tensor '%s': unexpected key '%s' (a tensor has exactly dtype, "
			          "shape and data)", w->name, w->frame, p->s,
			          shown(k->via.str.ptr, k->via.str.size, b, sizeof b));
			return NULL;
		}
	}
	const char *what = !sh ? "shape" : !da ? "data" : NULL;
	if (what) {
		sd_seterr("%s: frame %ld: tensor '%s': no '%s' (a tensor has dtype, shape and data)", w->name,
		          w->frame, p->s, what);
		return NULL;
	}
	enum sd_dtype dtype;
	if (dt->type != MSGPACK_OBJECT_STR) {
		sd_seterr("%s: frame %ld: tensor '%s': dtype is %s, not a string", w->name, w->frame, p->s,
		          otype(dt));
		return NULL;
	}
	if (sd_dtype_parse(dt->via.str.ptr, dt->via.str.size, &dtype) < 0) {
		sd_seterr("%s: frame %ld: tensor '%s': unknown dtype '%s' (expected f32, f16, bf16, i32, i64, "
		          "u8 or f64)", w->name, w->frame, p->s, shown(dt->via.str.ptr, dt->via.str.size, b, sizeof b));
		return NULL;
	}
	if (sh->type != MSGPACK_OBJECT_ARRAY) {
		sd_seterr("%s: frame %ld: tensor '%s': shape is %s, not an array of integers", w->name, w->frame,
		          p->s, otype(sh));
		return NULL;
	}
	if (sh->via.array.size > SD_MAX_DIMS) {
		sd_seterr("%s: frame %ld: tensor '%s': too many dimensions (%u, at most %d)", w->name, w->frame,
		          p->s, sh->via.array.size, SD_MAX_DIMS);
		return NULL;
	}
	int ndim = (int)sh->via.array.size;
	int64_t shape[SD_MAX_DIMS], numel;
	for (int i = 0; i < ndim; i++) {
		const msgpack_object *d = &sh->via.array.ptr[i];
		if (d->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
			sd_seterr("%s: frame %ld: tensor '%s': negative dimension %lld in its shape", w->name,
			          w->frame, p->s, (long long)d->via.i64);
			return NULL;
		}
		if (d->type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
			sd_seterr("%s: frame %ld: tensor '%s': shape holds %s, not an integer", w->name, w->frame,
			          p->s, otype(d));
			return NULL;
		}
		if (d->via.u64 > INT64_MAX) {
			sd_seterr("%s: frame %ld: tensor '%s': shape product overflows (dimension %llu)", w->name,
			          w->frame, p->s, (unsigned long long)d->via.u64);
			return NULL;
		}
		shape[i] = (int64_t)d->via.u64;
	}
	if (sd_shape_numel(ndim, shape, &numel) < 0) {
		sd_seterr("%s: frame %ld: tensor '%s': shape %s product overflows", w->name, w->frame, p->s,
		          sd_shape_str(ndim, shape, s, sizeof s));
		return NULL;
	}
	if (da->type != MSGPACK_OBJECT_BIN) {
		sd_seterr("%s: frame %ld: tensor '%s': data is %s, not a bin", w->name, w->frame, p->s, otype(da));
		return NULL;
	}
	uint64_t want = (uint64_t)numel * sd_dtype_size(dtype); /* numel <= INT64_MAX / 8: no overflow */
	if (da->via.bin.size != want) {
		sd_seterr("%s: frame %ld: tensor '%s': data length %u but shape %s %s needs %llu bytes", w->name,
		          w->frame, p->s, da->via.bin.size, sd_shape_str(ndim, shape, s, sizeof s),
		          sd_dtype_name(dtype), (unsigned long long)want);
		return NULL;
	}
	sd_tensor *t = sd_tensor_new(dtype, ndim, shape);
	if (!t) {
		sd_preerr("%s: frame %ld: tensor '%s'", w->name, w->frame, p->s);
		return NULL;
	}
	if (want) memcpy(t->data, da->via.bin.ptr, want);
	return t;
}

/*
 * A msgpack object to a new value tree (the caller owns it).  Maps must have string keys; a map with a
 * "dtype" key is a tensor.  NULL with a message naming the path of the offending value.
 */
static sd_value *conv(const msgpack_object *o, const struct where *w, struct path *p)
{
	sd_value *v = NULL;
	size_t old;
	switch (o->type) {
	case MSGPACK_OBJECT_NIL:
		return sd_value_nil();
	case MSGPACK_OBJECT_BOOLEAN:
		return sd_value_bool(o->via.boolean);
	case MSGPACK_OBJECT_POSITIVE_INTEGER:
		if (o->via.u64 <= INT64_MAX) return sd_value_int((int64_t)o->via.u64);
		if ((v = sd_value_int(0))) {
			v->type = SD_V_UINT;
			v->u.u = o->via.u64;
		}
		return v;
	case MSGPACK_OBJECT_NEGATIVE_INTEGER:
		return sd_value_int(o->via.i64);
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64:
		return sd_value_float(o->via.f64);
	case MSGPACK_OBJECT_STR:
		return sd_value_strn(o->via.str.ptr, o->via.str.size);
	case MSGPACK_OBJECT_BIN:
		return sd_value_bin(o->via.bin.ptr, o->via.bin.size);
	case MSGPACK_OBJECT_ARRAY:
		if (!(v = sd_value_array())) return NULL;
		for (uint32_t i = 0; i < o->via.array.size; i++) {
			old = path_push_index(p, i);
			int rc = sd_array_push(v, conv(&o->via.array.ptr[i], w, p));
			path_pop(p, old);
			if (rc < 0) {
				sd_value_free(v);
				return NULL;
			}
		}
		return v;
	case MSGPACK_OBJECT_MAP: {
		const msgpack_object_map *m = &o->via.map;
		if (check_keys(m, w, p) < 0) return NULL;
		for (uint32_t i = 0; i < m->size; i++)
			if (key_is(&m->ptr[i].key, "dtype")) return sd_value_tensor(conv_tensor(m, w, p));
		if (!(v = sd_value_map())) return NULL;
		/* appended directly: the keys are known to be distinct, and sd_map_set's search is linear */
		v->u.m.k = malloc((m->size ? m->size : 1) * sizeof *v->u.m.k);
		v->u.m.v = malloc((m->size ? m->size : 1) * sizeof *v->u.m.v);
		if (!v->u.m.k || !v->u.m.v) {
			sd_value_free(v);
			sd_seterr("out of memory");
			return NULL;
		}
		v->u.m.cap = m->size ? m->size : 1;
		for (uint32_t i = 0; i < m->size; i++) {
			const msgpack_object_str *k = &m->ptr[i].key.via.str;
			char *key = malloc(k->size + 1);
			if (!key) {
				sd_value_free(v);
				sd_seterr("out of memory");
				return NULL;
			}
			if (k->size) memcpy(key, k->ptr, k->size);
			key[k->size] = 0;
			old = path_push_key(p, k->ptr, k->size);
			sd_value *c = conv(&m->ptr[i].val, w, p);
			path_pop(p, old);
			if (!c) {
				free(key);
				sd_value_free(v);
				return NULL;
			}
			v->u.m.k[v->u.m.n] = key;
			v->u.m.v[v->u.m.n++] = c;
		}
		return v;
	}
	default:
		sd_seterr("%s: frame %ld: '%s': msgpack ext values are not supported", w->name, w->frame, p->s);
		return NULL;
	}
}

/* Decode a complete frame (already scanned) of len bytes into a value tree. */
static int decode(const char *buf, size_t len, const struct where *w, sd_value **frame)
{
	msgpack_unpacked up;
	size_t off = 0;
	msgpack_unpacked_init(&up);
	int rc = msgpack_unpack_next(&up, buf, len, &off);
	if (rc != MSGPACK_UNPACK_SUCCESS || off != len) {
		msgpack_unpacked_destroy(&up);
		if (rc == MSGPACK_UNPACK_NOMEM_ERROR)
			return sd_seterr("%s: frame %ld: out of memory decoding %zu bytes", w->name, w->frame, len);
		return sd_seterr("%s: frame %ld: msgpack parse error", w->name, w->frame);
	}
	struct path p = {.n = 0};
	p.s[0] = 0;
	*frame = conv(&up.data, w, &p);
	msgpack_unpacked_destroy(&up);
	return *frame ? 0 : -1;
}

/* ==== the reader ==== */

struct sd_reader {
	FILE *f;
	char *name;
	size_t cap;      /* largest frame accepted, bytes */
	char *buf;       /* the current frame's bytes */
	size_t len, alloc;
	uint64_t offset; /* stream offset of buf[0] */
	long count;      /* frames returned so far */
	int failed;      /* an error ended the stream */
};

/* The frame cap: $SD_MAX_FRAME_MB MiB when set, else SD_STREAM_MAX_FRAME. */
static int frame_cap(size_t *cap)
{
	const char *e = getenv("SD_MAX_FRAME_MB");
	*cap = SD_STREAM_MAX_FRAME;
	if (!e || !*e) return 0;
	char *end;
	errno = 0;
	unsigned long long mb = strtoull(e, &end, 10);
	if (errno || *end || e[0] == '-' || mb < 1 || mb > (SIZE_MAX >> 21))
		return sd_seterr("SD_MAX_FRAME_MB: '%s' is not a frame size in MiB (1 or more)", e);
	*cap = (size_t)mb << 20;
	return 0;
}

sd_reader *sd_reader_new(FILE *f, const char *name)
{
	size_t cap;
	if (!f) {
		sd_seterr("sd_reader_new: NULL file");
		return NULL;
	}
	if (frame_cap(&cap) < 0) return NULL;
	sd_reader *r = calloc(1, sizeof *r);
	if (!r || !(r->name = strdup(name ? name : "stream"))) {
		free(r);
		sd_seterr("out of memory");
		return NULL;
	}
	r->f = f;
	r->cap = cap;
	return r;
}

/* Make room for n more bytes in r->buf, growing by doubling but never past the frame cap. */
static int reserve(sd_reader *r, size_t n, const struct where *w)
{
	if (r->len + n <= r->alloc) return 0;
	size_t a = r->alloc ? r->alloc : 64 << 10;
	while (a < r->len + n) a = a > SIZE_MAX / 2 ? SIZE_MAX : a * 2;
	if (a > r->cap) a = r->cap > r->len + n ? r->cap : r->len + n;
	char *b = realloc(r->buf, a);
	if (!b)
		return sd_seterr("%s: frame %ld: out of memory buffering %zu bytes", w->name, w->frame, a);
	r->buf = b;
	r->alloc = a;
	return 0;
}

/*
 * Read the next frame: scan what has arrived, read at most what the frame still needs, and decode it
 * once it is whole.  1 with *frame set (the caller owns it), 0 at a clean end of the stream, -1 with a
 * message naming the frame (and every later call fails too: the stream's framing is lost).
 */
static void image_magic(sd_reader *r);

int sd_reader_next(sd_reader *r, sd_value **frame)
{
	struct where w = {r->name, r->count, r->offset};
	struct scan s;
	*frame = NULL;
	if (r->failed)
		return sd_seterr("%s: frame %ld: the stream cannot be read on after an error", r->name, r->count);
	r->len = 0;
	scan_init(&s);
	for (;;) {
		uint64_t need;
		int rc = scan_frame(&s, (const unsigned char *)r->buf, r->len, &need, &w);
		if (rc < 0) goto fail;
		if (rc == 1) break;
		if (need > r->cap || r->len > r->cap - need) {
			sd_seterr("%s: frame %ld: larger than the %zu MiB frame limit (SD_MAX_FRAME_MB)", r->name,
			          r->count, r->cap >> 20);
			goto fail;
		}
		size_t want = need < CHUNK ? (size_t)need : CHUNK;
		if (reserve(r, want, &w) < 0) goto fail;
		size_t got = fread(r->buf + r->len, 1, want, r->f);
		r->len += got;
		if (got < want) {
			if (ferror(r->f)) {
				sd_seterr("%s: frame %ld: read error: %s", r->name, r->count, strerror(errno));
				goto fail;
			}
			if (r->len == 0) return 0;
			sd_seterr("%s: frame %ld: truncated (stream ends inside a frame)", r->name, r->count);
			goto fail;
		}
	}
	if (decode(r->buf, s.pos, &w, frame) < 0) goto fail;
	r->offset += s.pos;
	r->count++;
	return 1;
fail:
	if (r->count == 0 && r->offset == 0) image_magic(r);
	r->failed = 1;
	return -1;
}

/*
 * An image where a stream belongs (a PNG's 0x89 reads as a 9-entry map, a JPEG's 0xff as a negative
 * integer, a PNM's 'P' as a positive one): replace the msgpack complaint by one that names the format
 * and the converter.  Reads a few more bytes of the first frame when fewer have arrived (the stream
 * has failed anyway).
 */
static void image_magic(sd_reader *r)
{
	if (r->len < 8 && reserve(r, 8, &(struct where){r->name, 0, 0}) == 0)
		r->len += fread(r->buf + r->len, 1, 8 - r->len, r->f);
	const unsigned char *b = (const unsigned char *)r->buf;
	const char *what = NULL;
	if (r->len >= 4 && !memcmp(b, "\x89PNG", 4)) what = "a PNG image";
	else if (r->len >= 3 && b[0] == 0xff && b[1] == 0xd8 && b[2] == 0xff) what = "a JPEG image";
	else if (r->len >= 3 && b[0] == 'P' && b[1] >= '1' && b[1] <= '7' && (b[2] == ' ' || b[2] == '\n' || b[2] == '\r' ||
	                                                                     b[2] == '\t' || b[2] == '#'))
		what = "a PNM image";
	if (what)
		sd_seterr("%s: %s, not a tensor stream (images enter a pipe through pnmtotensor: pnmtotensor FILE | ...)",
		          r->name, what);
}

long sd_reader_index(const sd_reader *r)
{
	return r->count - 1;
}

void sd_reader_free(sd_reader *r)
{
	if (!r) return;
	free(r->buf);
	free(r->name);
	free(r);
}

/* ==== writing ==== */

static int too_big(const char *what, const struct path *p, size_t n)
{
	return sd_seterr("'%s': %s of %zu is over msgpack's limit of 4294967295", p->s, what, n);
}

/* Pack a tensor as the 3-key map dtype, shape, data (a CUDA tensor through a temporary CPU copy). */
static int pack_tensor(msgpack_packer *pk, const sd_tensor *t, const struct path *p)
{
	sd_tensor *tmp = NULL;
	if (t->device != SD_DEVICE_CPU) {
		if (!(tmp = sd_tensor_to_device(t, SD_DEVICE_CPU))) return sd_preerr("'%s'", p->s);
		t = tmp;
	}
	size_t n = sd_tensor_nbytes(t);
	int rc = -1;
	if (n > UINT32_MAX) {
		too_big("tensor data", p, n);
		goto out;
	}
	if (msgpack_pack_map(pk, 3) || msgpack_pack_str(pk, 5) || msgpack_pack_str_body(pk, "dtype", 5))
		goto nomem;
	const char *dn = sd_dtype_name(t->dtype);
	if (msgpack_pack_str(pk, strlen(dn)) || msgpack_pack_str_body(pk, dn, strlen(dn)) ||
	    msgpack_pack_str(pk, 5) || msgpack_pack_str_body(pk, "shape", 5) ||
	    msgpack_pack_array(pk, (size_t)t->ndim))
		goto nomem;
	for (int i = 0; i < t->ndim; i++)
		if (msgpack_pack_int64(pk, t->shape[i])) goto nomem;
	if (msgpack_pack_str(pk, 4) || msgpack_pack_str_body(pk, "data", 4) || msgpack_pack_bin(pk, n) ||
	    (n && msgpack_pack_bin_body(pk, t->data, n)))
		goto nomem;
	rc = 0;
	goto out;
nomem:
	sd_seterr("out of memory packing tensor '%s'", p->s);
out:
	sd_tensor_free(tmp);
	return rc;
}

/* Pack one value (recursively); -1 with a message on a size over msgpack's limits or no memory. */
static int pack(msgpack_packer *pk, const sd_value *v, struct path *p)
{
	size_t old;
	int rc = 1; /* nonzero: a packer call failed (msgpack-c fails only when the buffer cannot grow) */
	switch (v->type) {
	case SD_V_NIL: rc = msgpack_pack_nil(pk); break;
	case SD_V_BOOL: rc = v->u.b ? msgpack_pack_true(pk) : msgpack_pack_false(pk); break;
	case SD_V_INT: rc = msgpack_pack_int64(pk, v->u.i); break;
	case SD_V_UINT: rc = msgpack_pack_uint64(pk, v->u.u); break;
	case SD_V_FLOAT: rc = msgpack_pack_double(pk, v->u.f); break;
	case SD_V_STR:
	case SD_V_BIN:
		if (v->u.s.n > UINT32_MAX) return too_big(v->type == SD_V_STR ? "a string" : "a bin", p, v->u.s.n);
		if (v->type == SD_V_STR)
			rc = msgpack_pack_str(pk, v->u.s.n) || (v->u.s.n && msgpack_pack_str_body(pk, v->u.s.p, v->u.s.n));
		else
			rc = msgpack_pack_bin(pk, v->u.s.n) || (v->u.s.n && msgpack_pack_bin_body(pk, v->u.s.p, v->u.s.n));
		break;
	case SD_V_ARRAY:
		if (v->u.a.n > UINT32_MAX) return too_big("an array", p, v->u.a.n);
		if (msgpack_pack_array(pk, v->u.a.n)) break;
		for (size_t i = 0; i < v->u.a.n; i++) {
			old = path_push_index(p, i);
			rc = pack(pk, v->u.a.v[i], p);
			path_pop(p, old);
			if (rc < 0) return -1;
		}
		return 0;
	case SD_V_MAP:
		if (v->u.m.n > UINT32_MAX) return too_big("a map", p, v->u.m.n);
		if (msgpack_pack_map(pk, v->u.m.n)) break;
		for (size_t i = 0; i < v->u.m.n; i++) {
			const char *k = v->u.m.k[i];
			size_t kn = strlen(k);
			if (msgpack_pack_str(pk, kn) || msgpack_pack_str_body(pk, k, kn)) goto nomem;
			old = path_push_key(p, k, kn);
			rc = pack(pk, v->u.m.v[i], p);
			path_pop(p, old);
			if (rc < 0) return -1;
		}
		return 0;
	case SD_V_TENSOR:
		return pack_tensor(pk, v->u.t, p);
	default:
		return sd_seterr("'%s': bad value type %d", p->s, (int)v->type);
	}
	if (!rc) return 0;
nomem:
	return sd_seterr("out of memory packing '%s'", p->s);
}

/* Pack frame into sb (initialised here; the caller destroys it on success and failure alike). */
static int pack_frame(const sd_value *frame, msgpack_sbuffer *sb)
{
	msgpack_packer pk;
	struct path p = {.n = 0};
	p.s[0] = 0;
	msgpack_sbuffer_init(sb);
	if (!frame || frame->type != SD_V_MAP) return sd_seterr("a frame must be a map");
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	return pack(&pk, frame, &p);
}

/* Serialise into one malloc'd buffer that the caller frees (*buf NULL and -1 on failure). */
int sd_frame_pack(const sd_value *frame, char **buf, size_t *len)
{
	msgpack_sbuffer sb;
	*buf = NULL;
	*len = 0;
	if (pack_frame(frame, &sb) < 0) {
		msgpack_sbuffer_destroy(&sb);
		return -1;
	}
	*len = sb.size;
	*buf = msgpack_sbuffer_release(&sb);
	if (!*buf && !(*buf = malloc(1))) return sd_seterr("out of memory");
	return 0;
}

/*
 * Write the frame whole with one fwrite, then flush, so that the next tool in a pipe sees each frame as
 * soon as it is done and a full disk or closed pipe is reported at the frame that hit it.
 */
int sd_frame_write(FILE *f, const sd_value *frame)
{
	msgpack_sbuffer sb;
	if (pack_frame(frame, &sb) < 0) {
		msgpack_sbuffer_destroy(&sb);
		return -1;
	}
	errno = 0;
	size_t put = fwrite(sb.data, 1, sb.size, f);
	int bad = put != sb.size || fflush(f) != 0;
	msgpack_sbuffer_destroy(&sb);
	if (bad) return sd_seterr("write error: %s", errno ? strerror(errno) : "short write");
	return 0;
}

/* Parse exactly one frame from buf: a truncated frame or bytes after it are errors. */
int sd_frame_unpack(const void *buf, size_t len, sd_value **frame)
{
	struct where w = {"buffer", 0, 0};
	struct scan s;
	uint64_t need;
	*frame = NULL;
	scan_init(&s);
	int rc = scan_frame(&s, buf, len, &need, &w);
	if (rc < 0) return -1;
	if (rc == 0) {
		if (len == 0) return sd_seterr("buffer: empty (no frame)");
		return sd_seterr("buffer: frame 0: truncated (buffer ends inside a frame)");
	}
	if (s.pos != len)
		return sd_seterr("buffer: %zu bytes of garbage after the frame", len - s.pos);
	return decode(buf, len, &w, frame);
}
