/*
 * safetensors.c - reading and writing .safetensors files, the tensor container of Hugging Face's
 * safetensors library (github.com/huggingface/safetensors, "format" in its README):
 *
 *   u64 little-endian N | N bytes of UTF-8 JSON (the header) | data section
 *
 * The header is one JSON object: an optional "__metadata__" (string -> string) and, per tensor,
 *   "name": {"dtype": "F32", "shape": [d0, ...], "data_offsets": [begin, end]}
 * with byte offsets relative to the start of the data section, little-endian, row-major data.
 *
 * The reader mmaps the file read-only and hands out views into the mapping.  Model files come from
 * anywhere, so every number in the header is checked before it is used, and each error names the file
 * and the tensor.  The JSON is parsed by jansson.  Tensor order is the header's own order: jansson
 * (2.8 and later) iterates an object in insertion order, i.e. the order of the keys in the file, so
 * sd_st_name(f, i) is deterministic and matches what a text dump of the header shows.
 *
 * The writer puts "__metadata__" first and the tensors in the order given in the header.  In the data
 * section the tensors are laid out by element size (8-byte dtypes first, then 4, 2, 1; the given order
 * within each size), back to back with no gaps as the reference reader requires, and the header is
 * padded with spaces to a multiple of 8: so every tensor starts at a multiple of its element size in
 * the file, and an mmap of the file gives naturally aligned data.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "sd.h"
#include "io.h"

/* The largest header accepted, as in the reference implementation (100 MB). */
#define MAX_HEADER 100000000ull

/* safetensors dtype names; BOOL is read as u8 (one byte per value, 0 or 1). */
static const struct {
	const char *name;
	enum sd_dtype dtype;
} read_dtypes[] = {
	{ "F32", SD_DTYPE_F32 }, { "F16", SD_DTYPE_F16 }, { "BF16", SD_DTYPE_BF16 },
	{ "I32", SD_DTYPE_I32 }, { "I64", SD_DTYPE_I64 }, { "U8", SD_DTYPE_U8 },
	{ "F64", SD_DTYPE_F64 }, { "BOOL", SD_DTYPE_U8 },
};

static const char *const write_dtypes[SD_DTYPE_COUNT] = {
	[SD_DTYPE_F32] = "F32", [SD_DTYPE_F16] = "F16", [SD_DTYPE_BF16] = "BF16", [SD_DTYPE_I32] = "I32",
	[SD_DTYPE_I64] = "I64", [SD_DTYPE_U8] = "U8", [SD_DTYPE_F64] = "F64",
};

struct entry {
	char *name;
	sd_tensor *t; /* a view into the mapping (or into copy) */
	void *copy;   /* an aligned copy of the data when the file places it misaligned for its dtype */
};

struct sd_st {
	char *path;
	void *map;
	size_t size;
	int n;
	struct entry *e;
	struct entry **byname; /* the entries sorted by name, for sd_st_find */
	int nmeta;
	char **meta;  /* key0, value0, key1, value1, ... */
};

/* ==== reading ==== */

static int dtype_lookup(const char *s, enum sd_dtype *out)
{
	for (size_t i = 0; i < sizeof read_dtypes / sizeof read_dtypes[0]; i++)
		if (strcmp(s, read_dtypes[i].name) == 0) {
			*out = read_dtypes[i].dtype;
			return 0;
		}
	return -1;
}

/*
 * Check one tensor entry of the header (v, under key name) against the data section (dsize bytes at
 * data) and fill *out with a view.  -1 with a message naming the file and the tensor on any problem.
 */
static int parse_entry(const char *path, const char *name, json_t *v, const unsigned char *data,
                       uint64_t dsize, struct entry *out)
{
	if (!json_is_object(v))
		return sd_seterr("%s: tensor '%s': entry is not a JSON object", path, name);

	json_t *jd = json_object_get(v, "dtype");
	json_t *js = json_object_get(v, "shape");
	json_t *jo = json_object_get(v, "data_offsets");
	if (!jd) return sd_seterr("%s: tensor '%s': missing 'dtype'", path, name);
	if (!js) return sd_seterr("%s: tensor '%s': missing 'shape'", path, name);
	if (!jo) return sd_seterr("%s: tensor '%s': missing 'data_offsets'", path, name);

	enum sd_dtype dtype;
	if (!json_is_string(jd))
		return sd_seterr("%s: tensor '%s': 'dtype' is not a string", path, name);
	if (dtype_lookup(json_string_value(jd), &dtype) < 0)
		return sd_seterr("%s: tensor '%s': unsupported dtype '%s' (supported: F32 F16 BF16 I32 I64 "
		                 "U8 F64 BOOL)", path, name, json_string_value(jd));

	if (!json_is_array(js))
		return sd_seterr("%s: tensor '%s': 'shape' is not an array", path, name);
	size_t ndim = json_array_size(js);
	if (ndim > SD_MAX_DIMS)
		return sd_seterr("%s: tensor '%s': %zu dimensions (at most %d)", path, name, ndim, SD_MAX_DIMS);
	int64_t shape[SD_MAX_DIMS];
	for (size_t i = 0; i < ndim; i++) {
		json_t *d = json_array_get(js, i);
		if (!json_is_integer(d))
			return sd_seterr("%s: tensor '%s': shape[%zu] is not an integer", path, name, i);
		if (json_integer_value(d) < 0)
			return sd_seterr("%s: tensor '%s': shape[%zu] is negative (%lld)", path, name, i,
			                 (long long)json_integer_value(d));
		shape[i] = json_integer_value(d);
	}
	int64_t numel;
	if (sd_shape_numel((int)ndim, shape, &numel) < 0)
		return sd_preerr("%s: tensor '%s'", path, name);
	/* sd_shape_numel keeps numel * 8 within int64, so this cannot overflow */
	int64_t nbytes = numel * (int64_t)sd_dtype_size(dtype);

	if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
	    !json_is_integer(json_array_get(jo, 1)))
		return sd_seterr("%s: tensor '%s': 'data_offsets' is not [begin, end] (two integers)", path,
		                 name);
	long long begin = json_integer_value(json_array_get(jo, 0));
	long long end = json_integer_value(json_array_get(jo, 1));
	if (begin < 0 || end < begin)
		return sd_seterr("%s: tensor '%s': data_offsets [%lld, %lld] are not 0 <= begin <= end", path,
		                 name, begin, end);
	if ((uint64_t)end > dsize)
		return sd_seterr("%s: tensor '%s': data_offsets end %lld is beyond the end of the data "
		                 "section (%llu bytes)", path, name, end, (unsigned long long)dsize);
	if (end - begin != nbytes) {
		char s[256];
		return sd_seterr("%s: tensor '%s': data_offsets [%lld, %lld] hold %lld bytes, but %s %s needs "
		                 "%lld", path, name, begin, end, end - begin, json_string_value(jd),
		                 sd_shape_str((int)ndim, shape, s, sizeof s), (long long)nbytes);
	}

	const unsigned char *p = data + begin;
	size_t esize = sd_dtype_size(dtype);
	out->copy = NULL;
	if (nbytes > 0 && (uintptr_t)p % esize != 0) {
		/* a header length that is not a multiple of 8 (legal, if unusual) misaligns the data:
		 * copy the tensor to aligned memory rather than hand out misaligned pointers */
		out->copy = malloc((size_t)nbytes);
		if (!out->copy)
			return sd_seterr("%s: tensor '%s': out of memory (%lld bytes)", path, name,
			                 (long long)nbytes);
		memcpy(out->copy, p, (size_t)nbytes);
		p = out->copy;
	}
	out->t = sd_tensor_wrap(dtype, (int)ndim, shape, (void *)p);
	if (!out->t) {
		free(out->copy);
		out->copy = NULL;
		return sd_preerr("%s: tensor '%s'", path, name);
	}
	out->name = strdup(name);
	if (!out->name) {
		sd_tensor_free(out->t);
		free(out->copy);
		out->t = NULL;
		out->copy = NULL;
		return sd_seterr("%s: out of memory", path);
	}
	return 0;
}

/* Copy the "__metadata__" object (string values only) into f->meta.  -1 with a message otherwise. */
static int parse_meta(sd_st *f, json_t *m)
{
	if (!json_is_object(m))
		return sd_seterr("%s: '__metadata__' is not a JSON object", f->path);
	size_t n = json_object_size(m);
	f->meta = calloc(2 * n + 1, sizeof *f->meta);
	if (!f->meta)
		return sd_seterr("%s: out of memory", f->path);
	for (void *it = json_object_iter(m); it; it = json_object_iter_next(m, it)) {
		const char *k = json_object_iter_key(it);
		json_t *v = json_object_iter_value(it);
		if (!json_is_string(v))
			return sd_seterr("%s: __metadata__ value of '%s' is not a string", f->path, k);
		char *ks = strdup(k), *vs = strdup(json_string_value(v));
		f->meta[2 * f->nmeta] = ks;
		f->meta[2 * f->nmeta + 1] = vs;
		if (ks) f->nmeta++;
		else free(vs);
		if (!ks || !vs)
			return sd_seterr("%s: out of memory", f->path);
	}
	return 0;
}

static int by_name(const void *a, const void *b)
{
	return strcmp((*(struct entry *const *)a)->name, (*(struct entry *const *)b)->name);
}

/* Parse the header of an opened, mapped file.  -1 with a message naming the file. */
static int parse_header(sd_st *f)
{
	const unsigned char *b = f->map;
	uint64_t hlen = 0;
	for (int i = 7; i >= 0; i--) hlen = hlen << 8 | b[i];
	if (hlen > MAX_HEADER)
		return sd_seterr("%s: header length %llu exceeds the 100 MB limit (not a safetensors file?)",
		                 f->path, (unsigned long long)hlen);
	if (hlen > f->size - 8)
		return sd_seterr("%s: header length %llu is larger than the rest of the file (%zu bytes; "
		                 "truncated, or not a safetensors file?)", f->path, (unsigned long long)hlen,
		                 f->size - 8);

	json_error_t jerr;
	json_t *root = json_loadb((const char *)b + 8, hlen, JSON_REJECT_DUPLICATES, &jerr);
	if (!root)
		return sd_seterr("%s: header is not valid JSON: %s (at byte %d)", f->path, jerr.text,
		                 jerr.position);
	int rc = -1;
	if (!json_is_object(root)) {
		sd_seterr("%s: header is not a JSON object", f->path);
		goto out;
	}

	size_t nkeys = json_object_size(root);
	json_t *meta = json_object_get(root, "__metadata__");
	size_t ntensors = nkeys - (meta != NULL);
	if (ntensors > INT32_MAX) {
		sd_seterr("%s: too many tensors", f->path);
		goto out;
	}
	f->e = calloc(ntensors ? ntensors : 1, sizeof *f->e);
	f->byname = calloc(ntensors ? ntensors : 1, sizeof *f->byname);
	if (!f->e || !f->byname) {
		sd_seterr("%s: out of memory", f->path);
		goto out;
	}
	if (meta && parse_meta(f, meta) < 0)
		goto out;

	const unsigned char *data = b + 8 + hlen;
	uint64_t dsize = f->size - 8 - hlen;
	for (void *it = json_object_iter(root); it; it = json_object_iter_next(root, it)) {
		const char *name = json_object_iter_key(it);
		if (strcmp(name, "__metadata__") == 0)
			continue;
		if (parse_entry(f->path, name, json_object_iter_value(it), data, dsize, &f->e[f->n]) < 0)
			goto out;
		f->byname[f->n] = &f->e[f->n];
		f->n++;
	}
	qsort(f->byname, f->n, sizeof *f->byname, by_name);
	rc = 0;
out:
	json_decref(root);
	return rc;
}

/*
 * Open path, mmap it read-only and check its header (see the top of this file).  The caller owns the
 * result and releases it with sd_st_close, which also unmaps every tensor.  NULL with a message naming
 * the file (and the tensor, where one is at fault) when the file cannot be read or is not a valid
 * safetensors file.
 */
sd_st *sd_st_open(const char *path)
{
	if (!path) {
		sd_seterr("safetensors: no file name given");
		return NULL;
	}
	sd_st *f = calloc(1, sizeof *f);
	if (!f || !(f->path = strdup(path))) {
		free(f);
		sd_seterr("%s: out of memory", path);
		return NULL;
	}
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		sd_seterr("%s: cannot open: %s", path, strerror(errno));
		goto fail;
	}
	struct stat st;
	if (fstat(fd, &st) < 0) {
		sd_seterr("%s: cannot stat: %s", path, strerror(errno));
		close(fd);
		goto fail;
	}
	if (S_ISDIR(st.st_mode)) {
		sd_seterr("%s: is a folder, not a safetensors file", path);
		close(fd);
		goto fail;
	}
	if (!S_ISREG(st.st_mode)) {
		sd_seterr("%s: not a regular file (a safetensors file must be mmapped)", path);
		close(fd);
		goto fail;
	}
	if (st.st_size == 0) {
		sd_seterr("%s: empty file (0 bytes), not a safetensors file", path);
		close(fd);
		goto fail;
	}
	if (st.st_size < 8) {
		sd_seterr("%s: file too short for a safetensors header (%lld bytes, need at least 8)", path,
		          (long long)st.st_size);
		close(fd);
		goto fail;
	}
	f->size = (size_t)st.st_size;
	f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (f->map == MAP_FAILED) {
		f->map = NULL;
		sd_seterr("%s: cannot mmap: %s", path, strerror(errno));
		goto fail;
	}
	if (parse_header(f) < 0)
		goto fail;
	return f;
fail:
	sd_st_close(f);
	return NULL;
}

int sd_st_count(const sd_st *f)
{
	return f->n;
}

const char *sd_st_name(const sd_st *f, int i)
{
	return i >= 0 && i < f->n ? f->e[i].name : NULL;
}

/* Binary search over the names sorted at open time. */
int sd_st_find(const sd_st *f, const char *name)
{
	int lo = 0, hi = f->n - 1;
	while (lo <= hi) {
		int mid = lo + (hi - lo) / 2;
		int c = strcmp(name, f->byname[mid]->name);
		if (c == 0) return (int)(f->byname[mid] - f->e);
		if (c < 0) hi = mid - 1;
		else lo = mid + 1;
	}
	return -1;
}

const sd_tensor *sd_st_tensor(const sd_st *f, int i)
{
	return i >= 0 && i < f->n ? f->e[i].t : NULL;
}

int sd_st_meta_count(const sd_st *f)
{
	return f->nmeta;
}

const char *sd_st_meta_key(const sd_st *f, int i)
{
	return i >= 0 && i < f->nmeta ? f->meta[2 * i] : NULL;
}

const char *sd_st_meta_val(const sd_st *f, int i)
{
	return i >= 0 && i < f->nmeta ? f->meta[2 * i + 1] : NULL;
}

const char *sd_st_meta(const sd_st *f, const char *key)
{
	for (int i = 0; i < f->nmeta; i++)
		if (strcmp(f->meta[2 * i], key) == 0)
			return f->meta[2 * i + 1];
	return NULL;
}

const char *sd_st_path(const sd_st *f)
{
	return f->path;
}

/* Unmap the file and free every view; the tensors of f must not be used afterwards. */
void sd_st_close(sd_st *f)
{
	if (!f) return;
	for (int i = 0; i < f->n; i++) {
		sd_tensor_free(f->e[i].t);
		free(f->e[i].copy);
		free(f->e[i].name);
	}
	if (f->meta)
		for (int i = 0; i < 2 * f->nmeta; i++) free(f->meta[i]);
	free(f->meta);
	free(f->e);
	free(f->byname);
	if (f->map) munmap(f->map, f->size);
	free(f->path);
	free(f);
}

/* ==== writing ==== */

/* Set key in obj, taking v; -1 (with a message) when v is NULL (jansson refused a value) or no memory. */
static int set_new(json_t *obj, const char *key, json_t *v, const char *path)
{
	if (!v || json_object_set_new(obj, key, v) < 0)
		return sd_seterr("%s: cannot build the header entry '%s' (not valid UTF-8, or out of memory)",
		                 path, key);
	return 0;
}

/*
 * Build the JSON header: "__metadata__" first (when meta is not NULL), then one entry per tensor in
 * the given order, with offsets from the layout in off[].  Returns a malloc'd compact JSON string, or
 * NULL with a message.
 */
static char *build_header(const char *path, int n, const char *const *names,
                          const sd_tensor *const *tensors, const char *const *meta, const int64_t *off)
{
	json_t *root = json_object();
	char *s = NULL;
	if (!root) {
		sd_seterr("%s: out of memory", path);
		return NULL;
	}
	if (meta) {
		json_t *m = json_object();
		if (set_new(root, "__metadata__", m, path) < 0) goto out;
		for (int i = 0; meta[i]; i += 2) {
			if (!meta[i + 1]) {
				sd_seterr("%s: metadata key '%s' has no value", path, meta[i]);
				goto out;
			}
			if (json_object_get(m, meta[i])) {
				sd_seterr("%s: metadata key '%s' given twice", path, meta[i]);
				goto out;
			}
			if (set_new(m, meta[i], json_string(meta[i + 1]), path) < 0) goto out;
		}
	}
	for (int i = 0; i < n; i++) {
		const sd_tensor *t = tensors[i];
		if (strcmp(names[i], "__metadata__") == 0 || json_object_get(root, names[i])) {
			sd_seterr("%s: tensor name '%s' %s", path, names[i],
			          strcmp(names[i], "__metadata__") == 0 ? "is reserved" : "given twice");
			goto out;
		}
		json_t *e = json_object(), *shape = json_array(), *offs = json_array();
		if (!e || !shape || !offs) {
			json_decref(e);
			json_decref(shape);
			json_decref(offs);
			sd_seterr("%s: out of memory", path);
			goto out;
		}
		if (set_new(root, names[i], e, path) < 0) {
			json_decref(shape);
			json_decref(offs);
			goto out;
		}
		if (set_new(e, "dtype", json_string(write_dtypes[t->dtype]), path) < 0) {
			json_decref(shape);
			json_decref(offs);
			goto out;
		}
		if (set_new(e, "shape", shape, path) < 0) {
			json_decref(offs);
			goto out;
		}
		if (set_new(e, "data_offsets", offs, path) < 0) goto out;
		for (int d = 0; d < t->ndim; d++)
			if (json_array_append_new(shape, json_integer(t->shape[d])) < 0) goto nomem;
		if (json_array_append_new(offs, json_integer(off[i])) < 0 ||
		    json_array_append_new(offs, json_integer(off[i] + (int64_t)sd_tensor_nbytes(t))) < 0)
			goto nomem;
	}
	s = json_dumps(root, JSON_COMPACT);
	if (!s) goto nomem;
	goto out;
nomem:
	sd_seterr("%s: out of memory", path);
out:
	json_decref(root);
	return s;
}

/*
 * Write n CPU tensors with their names and optional metadata (key, value, ..., NULL) to path
 * atomically (see sd_io_write_atomic); the layout is described at the top of this file.  -1 with a
 * message naming path on bad arguments (a NULL or repeated name, a tensor not on the CPU, a bad dtype
 * or shape, a key without a value) or on a write failure; path is then left as it was.
 */
int sd_st_write(const char *path, int n, const char *const *names, const sd_tensor *const *tensors,
                const char *const *meta)
{
	if (!path)
		return sd_seterr("safetensors: no file name given");
	if (n < 0 || (n > 0 && (!names || !tensors)))
		return sd_seterr("%s: bad tensor list (n = %d)", path, n);
	for (int i = 0; i < n; i++) {
		const sd_tensor *t = tensors[i];
		int64_t numel;
		if (!names[i])
			return sd_seterr("%s: tensor %d has no name", path, i);
		if (!t)
			return sd_seterr("%s: tensor '%s' is NULL", path, names[i]);
		if (t->device != SD_DEVICE_CPU)
			return sd_seterr("%s: tensor '%s' is on %s; copy it to the CPU first", path, names[i],
			                 sd_device_name(t->device));
		if ((unsigned)t->dtype >= SD_DTYPE_COUNT)
			return sd_seterr("%s: tensor '%s' has an unknown dtype %d", path, names[i], (int)t->dtype);
		if (sd_shape_numel(t->ndim, t->shape, &numel) < 0)
			return sd_preerr("%s: tensor '%s'", path, names[i]);
		if (numel > 0 && !t->data)
			return sd_seterr("%s: tensor '%s' has no data", path, names[i]);
	}

	int rc = -1;
	char *header = NULL;
	int64_t *off = calloc(n ? n : 1, sizeof *off);
	struct sd_io_chunk *chunks = calloc(n + 1, sizeof *chunks);
	unsigned char *head = NULL;
	if (!off || !chunks) {
		sd_seterr("%s: out of memory", path);
		goto out;
	}
	/* data layout: element sizes 8, 4, 2, 1 in turn, the given order within each (see the top) */
	int nc = 1;
	int64_t pos = 0;
	for (size_t es = 8; es >= 1; es /= 2)
		for (int i = 0; i < n; i++) {
			if (sd_dtype_size(tensors[i]->dtype) != es) continue;
			off[i] = pos;
			chunks[nc].p = tensors[i]->data;
			chunks[nc].n = sd_tensor_nbytes(tensors[i]);
			pos += (int64_t)chunks[nc].n;
			nc++;
		}
	header = build_header(path, n, names, tensors, meta, off);
	if (!header) goto out;
	size_t hlen = strlen(header);
	size_t padded = (hlen + 7) & ~(size_t)7;
	head = malloc(8 + padded);
	if (!head) {
		sd_seterr("%s: out of memory", path);
		goto out;
	}
	for (int i = 0; i < 8; i++) head[i] = (unsigned char)((uint64_t)padded >> (8 * i));
	memcpy(head + 8, header, hlen);
	memset(head + 8 + hlen, ' ', padded - hlen);
	chunks[0].p = head;
	chunks[0].n = 8 + padded;
	rc = sd_io_write_atomic(path, chunks, nc);
out:
	free(head);
	free(header);
	free(chunks);
	free(off);
	return rc;
}
