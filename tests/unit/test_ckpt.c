/*
 * test_ckpt.c - tests of lib/io/ckpt.c, the torch.save (.ckpt) reader:
 *   - tests/fixtures/tiny.ldm.ckpt, a real torch.save of an LDM state dict (made by torch 1.13, see
 *     ../shared/fixtures/README.md), has the expected keys, dtypes and shapes, and its weights equal the
 *     tiny diffusers model's (../shared/fixtures/tiny, skipped when that folder is absent);
 *   - views (storage offsets, transposes, stride-0 broadcasts, scalars, empty tensors, shared storages)
 *     and every storage type, in pickles written here the way torch writes them (protocol 2) and with
 *     protocol 4 opcodes (FRAME, STACK_GLOBAL, MEMOIZE, storages before data.pkl);
 *   - hostile files: code-running pickles (os.system, builtins.eval, subprocess.Popen, posix.system,
 *     REDUCE and BUILD tricks), resource attacks (deep nesting, huge memo indices, huge lengths), broken
 *     references and extents, zip tricks ("../evil", absolute names, foreign folders) and files that are
 *     not checkpoints at all.  Each is refused with a message naming the file and the cause, and the
 *     os.system payload, had it run, would have left a file that must not exist.
 * The archives are built by a small stored-zip writer below (PKZIP APPNOTE 4.3: local headers, central
 * directory, end record).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>
#include "sd.h"
#include "test.h"

/* ==== helpers ==== */

static const char *fixtures(void)
{
	const char *s = getenv("SD_FIXTURES");
	return s && *s ? s : "tests/fixtures";
}

static const char *shared(void)
{
	const char *s = getenv("SHARED");
	return s && *s ? s : "../shared/fixtures";
}

/* A growing byte buffer (pickles, zips).  Out of memory aborts the test program. */
struct buf {
	unsigned char *p;
	size_t n, cap;
};

static void put(struct buf *b, const void *s, size_t n)
{
	if (b->n + n > b->cap) {
		b->cap = (b->n + n) * 2 + 64;
		b->p = realloc(b->p, b->cap);
		if (!b->p) abort();
	}
	if (n) memcpy(b->p + b->n, s, n);
	b->n += n;
}

static void put1(struct buf *b, int c)
{
	unsigned char x = (unsigned char)c;
	put(b, &x, 1);
}

static void put_le(struct buf *b, uint64_t v, int n)
{
	for (int i = 0; i < n; i++) put1(b, (int)(v >> (8 * i)));
}

/* ==== a pickle writer (opcodes as pickletools names them) ==== */

static void pk_str(struct buf *b, const char *s) /* BINUNICODE */
{
	put1(b, 'X');
	put_le(b, strlen(s), 4);
	put(b, s, strlen(s));
}

static void pk_int(struct buf *b, int64_t v)
{
	if (v >= 0 && v < 256) {
		put1(b, 'K');
		put_le(b, (uint64_t)v, 1);
	} else if (v >= 0 && v < 65536) {
		put1(b, 'M');
		put_le(b, (uint64_t)v, 2);
	} else if (v >= INT32_MIN && v <= INT32_MAX) {
		put1(b, 'J');
		put_le(b, (uint64_t)v, 4);
	} else {
		put1(b, 0x8a); /* LONG1 */
		put1(b, 8);
		put_le(b, (uint64_t)v, 8);
	}
}

static void pk_global(struct buf *b, const char *mod, const char *name)
{
	put1(b, 'c');
	put(b, mod, strlen(mod));
	put1(b, '\n');
	put(b, name, strlen(name));
	put1(b, '\n');
}

static void pk_ints(struct buf *b, int n, const int64_t *v) /* a tuple of ints */
{
	put1(b, '(');
	for (int i = 0; i < n; i++) pk_int(b, v[i]);
	put1(b, 't');
}

/* A tensor as torch pickles it: _rebuild_tensor_v2(persid('storage', torch.<stype>, key, 'cpu', numel),
 * offset, size, stride, False, OrderedDict()). */
static void pk_tensor(struct buf *b, const char *stype, const char *key, int64_t numel, int64_t off, int nd,
                      const int64_t *size, const int64_t *stride)
{
	pk_global(b, "torch._utils", "_rebuild_tensor_v2");
	put1(b, '(');
	put1(b, '(');
	pk_str(b, "storage");
	pk_global(b, "torch", stype);
	pk_str(b, key);
	pk_str(b, "cpu");
	pk_int(b, numel);
	put1(b, 't');
	put1(b, 'Q');
	pk_int(b, off);
	pk_ints(b, nd, size);
	pk_ints(b, nd, stride);
	put1(b, 0x89); /* NEWFALSE */
	pk_global(b, "collections", "OrderedDict");
	put1(b, ')');
	put1(b, 'R');
	put1(b, 't');
	put1(b, 'R');
}

/* A one-dimensional contiguous tensor of a whole storage of n elements. */
static void pk_vec(struct buf *b, const char *stype, const char *key, int64_t n)
{
	int64_t one = 1;
	pk_tensor(b, stype, key, n, 0, 1, &n, &one);
}

/* ==== a stored-zip writer ==== */

struct zent {
	const char *name;
	const void *data;
	size_t n;
};

static uint32_t crc32_of(const unsigned char *p, size_t n)
{
	uint32_t c = 0xffffffffu;
	for (size_t i = 0; i < n; i++) {
		c ^= p[i];
		for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0xedb88320u : c >> 1;
	}
	return ~c;
}

/* Write the entries, uncompressed, as a zip file at path. */
static void write_zip(const char *path, const struct zent *e, int n)
{
	struct buf z = { 0 }, cd = { 0 };
	for (int i = 0; i < n; i++) {
		uint32_t crc = crc32_of(e[i].data, e[i].n), off = (uint32_t)z.n;
		size_t nl = strlen(e[i].name);
		put_le(&z, 0x04034b50, 4);                       /* local file header */
		put_le(&z, 20, 2); put_le(&z, 0, 2); put_le(&z, 0, 2); /* version, flags, method: stored */
		put_le(&z, 0, 2); put_le(&z, 0x21, 2);                  /* time, date (1980-01-01) */
		put_le(&z, crc, 4); put_le(&z, e[i].n, 4); put_le(&z, e[i].n, 4);
		put_le(&z, nl, 2); put_le(&z, 0, 2);
		put(&z, e[i].name, nl);
		put(&z, e[i].data, e[i].n);
		put_le(&cd, 0x02014b50, 4);                      /* central directory header */
		put_le(&cd, 20, 2); put_le(&cd, 20, 2); put_le(&cd, 0, 2); put_le(&cd, 0, 2);
		put_le(&cd, 0, 2); put_le(&cd, 0x21, 2);
		put_le(&cd, crc, 4); put_le(&cd, e[i].n, 4); put_le(&cd, e[i].n, 4);
		put_le(&cd, nl, 2); put_le(&cd, 0, 2); put_le(&cd, 0, 2); /* name, extra, comment lengths */
		put_le(&cd, 0, 2); put_le(&cd, 0, 2); put_le(&cd, 0, 4);  /* disk, internal, external attrs */
		put_le(&cd, off, 4);
		put(&cd, e[i].name, nl);
	}
	uint32_t cdoff = (uint32_t)z.n;
	put(&z, cd.p, cd.n);
	put_le(&z, 0x06054b50, 4);                               /* end of central directory */
	put_le(&z, 0, 2); put_le(&z, 0, 2); put_le(&z, (uint64_t)n, 2); put_le(&z, (uint64_t)n, 2);
	put_le(&z, cd.n, 4); put_le(&z, cdoff, 4); put_le(&z, 0, 2);
	FILE *f = fopen(path, "wb");
	if (f) {
		fwrite(z.p, 1, z.n, f);
		fclose(f);
	}
	free(z.p);
	free(cd.p);
}

/* A checkpoint "archive/data.pkl" + the storages given as key, bytes, length, …, NULL. */
static void write_ckpt(const char *path, const struct buf *pkl, ...)
{
	struct zent e[16];
	char names[16][64];
	int n = 0;
	e[n++] = (struct zent){ "archive/data.pkl", pkl->p, pkl->n };
	va_list ap;
	va_start(ap, pkl);
	for (const char *key; n < 16 && (key = va_arg(ap, const char *));) {
		snprintf(names[n], sizeof names[n], "archive/data/%s", key);
		const void *data = va_arg(ap, const void *);
		size_t len = va_arg(ap, size_t);
		e[n] = (struct zent){ names[n], data, len };
		n++;
	}
	va_end(ap);
	e[n++] = (struct zent){ "archive/version", "3\n", 2 };
	write_zip(path, e, n);
}

static char tmpdir[4096];

static const char *tmp_path(const char *name)
{
	static char p[4200];
	snprintf(p, sizeof p, "%s/%s", tmpdir, name);
	return p;
}

/* ==== the real checkpoint ==== */

/* The tensor `name` of c with the given dtype and shape, or NULL after a failed check. */
static const sd_tensor *expect(const sd_ckpt *c, const char *name, enum sd_dtype dt, int ndim, ...)
{
	int i = sd_ckpt_find(c, name);
	const sd_tensor *t = i < 0 ? NULL : sd_ckpt_tensor(c, i);
	if (!t) {
		printf("  no tensor '%s'\n", name);
		test_failed_++;
		return NULL;
	}
	va_list ap;
	va_start(ap, ndim);
	int ok = t->dtype == dt && t->ndim == ndim && t->owns && t->device == SD_DEVICE_CPU;
	for (int d = 0; d < ndim; d++) {
		int64_t v = va_arg(ap, int64_t);
		if (ok && t->shape[d] != v) ok = 0;
	}
	va_end(ap);
	if (!ok) {
		char s[128];
		printf("  '%s' is %s %s\n", name, sd_dtype_name(t->dtype), sd_shape_str(t->ndim, t->shape, s, sizeof s));
		test_failed_++;
		return NULL;
	}
	return t;
}

static sd_ckpt *open_tiny(void)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/tiny.ldm.ckpt", fixtures());
	sd_ckpt *c = sd_ckpt_open(path);
	if (!c) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
	}
	return c;
}

TEST(tiny_ldm)
{
	sd_ckpt *c = open_tiny();
	if (!c) return;
	CHECK(sd_ckpt_count(c) == 525); /* the state dict; global_step and epoch are not tensors */
	/* insertion order (the pickle's), and find agrees with name */
	CHECK(strcmp(sd_ckpt_name(c, 0), "model.diffusion_model.input_blocks.0.0.bias") == 0);
	CHECK(strcmp(sd_ckpt_name(c, sd_ckpt_count(c) - 1),
	             "cond_stage_model.transformer.text_model.embeddings.position_ids") == 0);
	int found = 1, f16 = 0, f32 = 0, i64 = 0;
	for (int i = 0; i < sd_ckpt_count(c); i++) {
		found &= sd_ckpt_find(c, sd_ckpt_name(c, i)) == i;
		const sd_tensor *t = sd_ckpt_tensor(c, i);
		f16 += t->dtype == SD_DTYPE_F16;
		f32 += t->dtype == SD_DTYPE_F32;
		i64 += t->dtype == SD_DTYPE_I64;
	}
	CHECK(found);
	CHECK(f16 == 512 && f32 == 12 && i64 == 1);
	CHECK(sd_ckpt_find(c, "global_step") == -1 && sd_ckpt_find(c, "state_dict") == -1);
	CHECK(sd_ckpt_find(c, "no such tensor") == -1 && sd_ckpt_find(c, NULL) == -1);
	CHECK(sd_ckpt_tensor(c, -1) == NULL && sd_ckpt_tensor(c, sd_ckpt_count(c)) == NULL);
	CHECK(sd_ckpt_name(c, sd_ckpt_count(c)) == NULL);

	expect(c, "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", SD_DTYPE_F16, 2,
	       (int64_t)49408, (int64_t)32);
	expect(c, "first_stage_model.encoder.conv_in.weight", SD_DTYPE_F16, 4, (int64_t)32, (int64_t)3,
	       (int64_t)3, (int64_t)3);
	expect(c, "model.diffusion_model.input_blocks.0.0.weight", SD_DTYPE_F16, 4, (int64_t)32, (int64_t)4,
	       (int64_t)3, (int64_t)3);
	const sd_tensor *t = expect(c, "alphas_cumprod", SD_DTYPE_F32, 1, (int64_t)1000);
	if (t) { /* the DDPM schedule: decreasing from just below 1 */
		const float *a = t->data;
		int ok = a[0] < 1 && a[0] > 0.99f && a[999] > 0 && a[999] < 0.01f;
		for (int i = 1; i < 1000; i++) ok &= a[i] < a[i - 1];
		CHECK(ok);
	}
	t = expect(c, "cond_stage_model.transformer.text_model.embeddings.position_ids", SD_DTYPE_I64, 2,
	           (int64_t)1, (int64_t)77);
	if (t) {
		const int64_t *p = t->data;
		int ok = 1;
		for (int i = 0; i < 77; i++) ok &= p[i] == i;
		CHECK(ok);
	}
	sd_ckpt_close(c);
}

/* Compare a f16 ckpt tensor with an f32 safetensors one: same shape, values equal after f16 -> f32
 * (the checkpoint was made from these weights, which are exactly representable in f16). */
static void same_weights(const sd_ckpt *c, const char *cname, const sd_st *f, const char *fname)
{
	int i = sd_ckpt_find(c, cname), j = sd_st_find(f, fname);
	if (i < 0 || j < 0) {
		printf("  missing '%s' (ckpt) or '%s' (safetensors)\n", cname, fname);
		test_failed_++;
		return;
	}
	const sd_tensor *a = sd_ckpt_tensor(c, i), *b = sd_st_tensor(f, j);
	if (!sd_tensor_same_shape(a, b) || a->dtype != SD_DTYPE_F16 || b->dtype != SD_DTYPE_F32) {
		printf("  '%s': shapes or dtypes differ\n", cname);
		test_failed_++;
		return;
	}
	sd_tensor *a32 = sd_tensor_convert(a, SD_DTYPE_F32);
	CHECK(a32 != NULL);
	if (!a32) return;
	const float *x = a32->data, *y = b->data;
	long n = (long)sd_tensor_numel(a), diff = 0;
	for (long k = 0; k < n; k++) diff += x[k] != y[k];
	if (diff) {
		printf("  '%s': %ld of %ld values differ\n", cname, diff, n);
		CHECK_CLOSE(x, y, n, 1e-3);
		test_failed_++;
	}
	sd_tensor_free(a32);
}

TEST(matches_diffusers)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/tiny/text_encoder/model.safetensors", shared());
	if (access(path, R_OK) != 0) SKIP("no %.200s", path);
	sd_st *te = sd_st_open(path);
	CHECK(te != NULL);
	sd_ckpt *c = open_tiny();
	if (!te || !c) {
		sd_st_close(te);
		sd_ckpt_close(c);
		return;
	}
	/* every text encoder tensor under cond_stage_model.transformer. */
	int n = 0;
	for (int i = 0; i < sd_st_count(te); i++) {
		char name[512];
		snprintf(name, sizeof name, "cond_stage_model.transformer.%s", sd_st_name(te, i));
		same_weights(c, name, te, sd_st_name(te, i));
		n++;
	}
	printf("  %d text encoder tensors compared\n", n);
	CHECK(n == 84); /* the header has 84 tensors (and __metadata__) */
	sd_st_close(te);

	/* two tensors whose names the LDM conversion keeps simple */
	snprintf(path, sizeof path, "%s/tiny/vae/diffusion_pytorch_model.safetensors", shared());
	sd_st *f = sd_st_open(path);
	if (f) same_weights(c, "first_stage_model.encoder.conv_in.weight", f, "encoder.conv_in.weight");
	sd_st_close(f);
	snprintf(path, sizeof path, "%s/tiny/unet/diffusion_pytorch_model.safetensors", shared());
	f = sd_st_open(path);
	if (f) same_weights(c, "model.diffusion_model.input_blocks.0.0.weight", f, "conv_in.weight");
	sd_st_close(f);
	sd_ckpt_close(c);
}

/* ==== views and storage types ==== */

static const float f6[6] = { 0, 1, 2, 3, 4, 5 };
static const int16_t s2[2] = { -2, 300 };
static const int8_t c1[1] = { -1 };
static const uint8_t b2[2] = { 0, 1 };
static const uint16_t bf1[1] = { 0x3fc0 }; /* 1.5 */
static const double d1[1] = { 2.5 };
static const int64_t l3[3] = { 7, -8, 1LL << 40 };

/* The protocol 2 pickle of views.ckpt: views of storage '0' (6 floats) and one tensor per type. */
static void views_pickle(struct buf *b)
{
	put1(b, 0x80); put1(b, 2);
	pk_global(b, "collections", "OrderedDict"); /* OrderedDict(), as Module.state_dict() makes it */
	put1(b, ')');
	put1(b, 'R');
	put1(b, '(');
	pk_str(b, "t"); /* transpose of the (2, 3) storage */
	pk_tensor(b, "FloatStorage", "0", 6, 0, 2, (int64_t[]){ 3, 2 }, (int64_t[]){ 1, 3 });
	pk_str(b, "o"); /* offset */
	pk_tensor(b, "FloatStorage", "0", 6, 2, 1, (int64_t[]){ 2 }, (int64_t[]){ 1 });
	pk_str(b, "s"); /* a scalar, the last element */
	pk_tensor(b, "FloatStorage", "0", 6, 5, 0, NULL, NULL);
	pk_str(b, "bc"); /* expand(2, 3) of a row */
	pk_tensor(b, "FloatStorage", "0", 6, 0, 2, (int64_t[]){ 2, 3 }, (int64_t[]){ 0, 1 });
	pk_str(b, "full");
	pk_tensor(b, "FloatStorage", "0", 6, 0, 2, (int64_t[]){ 2, 3 }, (int64_t[]){ 3, 1 });
	pk_str(b, "h");
	pk_vec(b, "ShortStorage", "1", 2);
	pk_str(b, "c");
	pk_vec(b, "CharStorage", "2", 1);
	pk_str(b, "b");
	pk_vec(b, "BoolStorage", "3", 2);
	pk_str(b, "bf");
	pk_vec(b, "BFloat16Storage", "4", 1);
	pk_str(b, "e"); /* empty, of an empty storage */
	pk_tensor(b, "FloatStorage", "5", 0, 0, 2, (int64_t[]){ 0, 4 }, (int64_t[]){ 4, 1 });
	pk_str(b, "p"); /* an nn.Parameter */
	pk_global(b, "torch._utils", "_rebuild_parameter");
	put1(b, '(');
	pk_vec(b, "DoubleStorage", "6", 1);
	put1(b, 0x88); /* NEWTRUE */
	pk_global(b, "collections", "OrderedDict");
	put1(b, ')');
	put1(b, 'R');
	put1(b, 't');
	put1(b, 'R');
	pk_str(b, "l");
	pk_vec(b, "LongStorage", "7", 3);
	/* values that are not tensors, and a tensor under a key that is not a string: ignored */
	pk_str(b, "step");
	pk_int(b, 1234567890123LL);
	pk_str(b, "lr");
	put1(b, 'G');
	put(b, "\x3f\xe0\0\0\0\0\0\0", 8); /* 0.5 */
	pk_str(b, "cfg");
	put1(b, '}');
	pk_str(b, "none");
	put1(b, 'N');
	pk_int(b, 5);
	pk_vec(b, "FloatStorage", "0", 6);
	put1(b, 'u');
	/* Module.state_dict()'s OrderedDict carries _metadata: BUILD {'_metadata': {'': {'version': 1}}} */
	put1(b, '}');
	pk_str(b, "_metadata");
	put1(b, '}');
	pk_str(b, "");
	put1(b, '}');
	pk_str(b, "version");
	pk_int(b, 1);
	put1(b, 's');
	put1(b, 's');
	put1(b, 's');
	put1(b, 'b');
	put1(b, '.');
}

static int eq(const sd_ckpt *c, const char *name, enum sd_dtype dt, const void *want, size_t nbytes)
{
	int i = sd_ckpt_find(c, name);
	const sd_tensor *t = sd_ckpt_tensor(c, i);
	int ok = t && t->dtype == dt && sd_tensor_nbytes(t) == nbytes &&
	         (nbytes == 0 || memcmp(t->data, want, nbytes) == 0);
	if (!ok) printf("  tensor '%s' is not as expected\n", name);
	return ok;
}

static void check_views(const sd_ckpt *c)
{
	CHECK(sd_ckpt_count(c) == 12);
	static const char *const order[] = { "t", "o", "s", "bc", "full", "h", "c", "b", "bf", "e", "p", "l" };
	for (int i = 0; i < 12 && i < sd_ckpt_count(c); i++) CHECK(strcmp(sd_ckpt_name(c, i), order[i]) == 0);
	CHECK(eq(c, "t", SD_DTYPE_F32, (float[]){ 0, 3, 1, 4, 2, 5 }, 24));
	CHECK(eq(c, "o", SD_DTYPE_F32, (float[]){ 2, 3 }, 8));
	CHECK(eq(c, "s", SD_DTYPE_F32, (float[]){ 5 }, 4));
	CHECK(sd_ckpt_tensor(c, sd_ckpt_find(c, "s"))->ndim == 0);
	CHECK(eq(c, "bc", SD_DTYPE_F32, (float[]){ 0, 1, 2, 0, 1, 2 }, 24));
	CHECK(eq(c, "full", SD_DTYPE_F32, f6, 24));
	CHECK(eq(c, "h", SD_DTYPE_I32, (int32_t[]){ -2, 300 }, 8));
	CHECK(eq(c, "c", SD_DTYPE_I32, (int32_t[]){ -1 }, 4));
	CHECK(eq(c, "b", SD_DTYPE_U8, b2, 2));
	CHECK(eq(c, "bf", SD_DTYPE_BF16, bf1, 2));
	CHECK(eq(c, "e", SD_DTYPE_F32, NULL, 0));
	const sd_tensor *e = sd_ckpt_tensor(c, sd_ckpt_find(c, "e"));
	CHECK(e && e->ndim == 2 && e->shape[0] == 0 && e->shape[1] == 4);
	CHECK(eq(c, "p", SD_DTYPE_F64, d1, 8));
	CHECK(eq(c, "l", SD_DTYPE_I64, l3, 24));
}

TEST(views_and_types)
{
	struct buf b = { 0 };
	views_pickle(&b);
	const char *path = tmp_path("views.ckpt");
	write_ckpt(path, &b, "0", f6, sizeof f6, "1", s2, sizeof s2, "2", c1, sizeof c1, "3", b2, sizeof b2,
	           "4", bf1, sizeof bf1, "5", "", (size_t)0, "6", d1, sizeof d1, "7", l3, sizeof l3,
	           "99", "unused", (size_t)6, NULL);
	sd_ckpt *c = sd_ckpt_open(path);
	if (!c) printf("  %s\n", sd_errmsg());
	CHECK(c != NULL);
	if (c) check_views(c);
	sd_ckpt_close(c);
	free(b.p);
}

/*
 * The same kind of file in protocol 4 (FRAME, SHORT_BINUNICODE, STACK_GLOBAL, MEMOIZE, BINGET),
 * {"state_dict": {...}, "global_step": 0}, with the storages before data.pkl in the archive, a
 * byteorder entry and the bookkeeping entries newer torch writes.
 */
TEST(protocol4_and_order)
{
	struct buf b = { 0 }, body = { 0 };
	put1(&body, '}'); put1(&body, 0x94);                   /* memo 0 */
	put1(&body, '(');
	put1(&body, 0x8c); put1(&body, 10); put(&body, "state_dict", 10);
	put1(&body, '}'); put1(&body, 0x94);                   /* memo 1 */
	put1(&body, '(');
	put1(&body, 0x8c); put1(&body, 1); put(&body, "w", 1);
	put1(&body, 0x8c); put1(&body, 12); put(&body, "torch._utils", 12);
	put1(&body, 0x8c); put1(&body, 18); put(&body, "_rebuild_tensor_v2", 18);
	put1(&body, 0x93); put1(&body, 0x94);                  /* STACK_GLOBAL, memo 2 */
	put1(&body, '(');
	put1(&body, '(');
	pk_str(&body, "storage");
	put1(&body, 0x8c); put1(&body, 5); put(&body, "torch", 5);
	put1(&body, 0x8c); put1(&body, 11); put(&body, "HalfStorage", 11);
	put1(&body, 0x93);
	pk_str(&body, "0");
	pk_str(&body, "cuda:0");
	pk_int(&body, 4);
	put1(&body, 't');
	put1(&body, 'Q');
	pk_int(&body, 1);
	pk_ints(&body, 2, (int64_t[]){ 1, 3 });
	pk_ints(&body, 2, (int64_t[]){ 3, 1 });
	put1(&body, 0x89);
	pk_global(&body, "collections", "OrderedDict");
	put1(&body, ')'); put1(&body, 'R');
	put1(&body, 'N');                                      /* metadata None (the 7-argument form) */
	put1(&body, 't'); put1(&body, 'R');
	put1(&body, 0x8c); put1(&body, 1); put(&body, "v", 1);
	put1(&body, 'h'); put1(&body, 2);                      /* BINGET the rebuild function */
	put1(&body, '(');
	put1(&body, '(');
	pk_str(&body, "storage");
	pk_global(&body, "torch", "HalfStorage");
	pk_str(&body, "0");
	pk_str(&body, "cuda:0");
	pk_int(&body, 4);
	put1(&body, 't');
	put1(&body, 'Q');
	pk_int(&body, 0);
	pk_ints(&body, 1, (int64_t[]){ 4 });
	pk_ints(&body, 1, (int64_t[]){ 1 });
	put1(&body, 0x89);
	pk_global(&body, "collections", "OrderedDict");
	put1(&body, ')'); put1(&body, 'R');
	put1(&body, 't'); put1(&body, 'R');
	put1(&body, 'u');
	put1(&body, 0x8c); put1(&body, 11); put(&body, "global_step", 11);
	pk_int(&body, 0);
	put1(&body, 'u');
	put1(&body, '.');
	put1(&b, 0x80); put1(&b, 4);
	put1(&b, 0x95); put_le(&b, body.n, 8);
	put(&b, body.p, body.n);
	uint16_t h[4] = { 0x3c00, 0x4000, 0x4200, 0x4400 }; /* 1 2 3 4 */
	struct zent e[] = {
		{ "ckpt/data/0", h, sizeof h },
		{ "ckpt/byteorder", "little", 6 },
		{ "ckpt/data.pkl", b.p, b.n },
		{ "ckpt/.data/version", "3\n", 2 },
		{ "ckpt/.data/serialization_id", "1234567890", 10 },
	};
	const char *path = tmp_path("p4.ckpt");
	write_zip(path, e, 5);
	sd_ckpt *c = sd_ckpt_open(path);
	if (!c) printf("  %s\n", sd_errmsg());
	CHECK(c != NULL);
	if (c) {
		CHECK(sd_ckpt_count(c) == 2);
		CHECK(strcmp(sd_ckpt_name(c, 0), "w") == 0 && strcmp(sd_ckpt_name(c, 1), "v") == 0);
		CHECK(eq(c, "w", SD_DTYPE_F16, (uint16_t[]){ 0x4000, 0x4200, 0x4400 }, 6));
		CHECK(eq(c, "v", SD_DTYPE_F16, h, 8));
		CHECK(sd_ckpt_tensor(c, 0)->shape[0] == 1 && sd_ckpt_tensor(c, 0)->shape[1] == 3);
	}
	sd_ckpt_close(c);
	free(b.p);
	free(body.p);
}

/* ==== hostile files ==== */

static char pwned[256]; /* the file the os.system payload would create */

/* A pickle that calls module.name(arg) via GLOBAL + REDUCE, the classic pickle exploit. */
static void evil_call(struct buf *b, const char *mod, const char *name, const char *arg)
{
	put1(b, 0x80); put1(b, 2);
	pk_global(b, mod, name);
	pk_str(b, arg);
	put1(b, 0x85);
	put1(b, 'R');
	put1(b, '.');
}

/* A state dict {"x": <the bytes of `mid`>}: the usual framing around a hostile value. */
static void in_dict(struct buf *b, const struct buf *mid)
{
	put1(b, 0x80); put1(b, 2);
	put1(b, '}');
	pk_str(b, "x");
	put(b, mid->p, mid->n);
	put1(b, 's');
	put1(b, '.');
}

/* Expect sd_ckpt_open(path) to fail with a message holding `want` and the path. */
static void refused(const char *what, const char *path, const char *want)
{
	sd_ckpt *c = sd_ckpt_open(path);
	int ok = c == NULL && strstr(sd_errmsg(), want) && strstr(sd_errmsg(), path);
	printf("  %-28s %s\n", what, c ? "(opened!)" : sd_errmsg());
	if (!ok) {
		printf("  %s: want a failure with \"%s\"\n", what, want);
		test_failed_++;
	}
	sd_ckpt_close(c);
}

/* Write a ckpt with the pickle b and one storage '0' of 4 floats, and expect it to be refused. */
static void refused_pickle(const char *what, struct buf *b, const char *want)
{
	static const float four[4] = { 1, 2, 3, 4 };
	const char *path = tmp_path("bad.ckpt");
	write_ckpt(path, b, "0", four, sizeof four, NULL);
	refused(what, path, want);
	free(b->p);
	*b = (struct buf){ 0 };
}

TEST(hostile_pickles)
{
	struct buf b = { 0 }, m = { 0 };
	char cmd[512];
	snprintf(cmd, sizeof cmd, "touch %s", pwned);

	evil_call(&b, "os", "system", cmd);
	refused_pickle("os.system", &b, "forbidden global 'os.system'");
	evil_call(&b, "builtins", "eval", "__import__('os').system('touch /tmp/sdpipe-pwned')");
	refused_pickle("builtins.eval", &b, "forbidden global 'builtins.eval'");
	evil_call(&b, "subprocess", "Popen", cmd);
	refused_pickle("subprocess.Popen", &b, "forbidden global 'subprocess.Popen'");
	evil_call(&b, "torch", "load", cmd); /* a module we allow, a name we do not */
	refused_pickle("torch.load", &b, "forbidden global 'torch.load'");
	evil_call(&b, "collections\nOrderedDict", "x", cmd);
	refused_pickle("newline games", &b, "unknown opcode 0x78"); /* read as OrderedDict, then 'x' */
	/* posix.system by STACK_GLOBAL (protocol 4), inside a state dict */
	put1(&m, 0x8c); put1(&m, 5); put(&m, "posix", 5);
	put1(&m, 0x8c); put1(&m, 6); put(&m, "system", 6);
	put1(&m, 0x93);
	pk_str(&m, cmd);
	put1(&m, 0x85);
	put1(&m, 'R');
	in_dict(&b, &m);
	refused_pickle("posix.system (STACK_GLOBAL)", &b, "forbidden global 'posix.system'");
	m.n = 0;

	/* __reduce__ tricks: REDUCE on something that is not an allowed callable, BUILD on a non-dict */
	put1(&m, '}'); put1(&m, ')'); put1(&m, 'R');
	in_dict(&b, &m);
	refused_pickle("REDUCE on a dict", &b, "REDUCE on a dict is not allowed");
	m.n = 0;
	pk_str(&m, "os.system"); put1(&m, ')'); put1(&m, 'R');
	in_dict(&b, &m);
	refused_pickle("REDUCE on a str", &b, "REDUCE on a str is not allowed");
	m.n = 0;
	pk_global(&m, "torch", "FloatStorage"); put1(&m, ')'); put1(&m, 'R');
	in_dict(&b, &m);
	refused_pickle("REDUCE on a storage class", &b, "calling torch.FloatStorage is not allowed");
	m.n = 0;
	pk_global(&m, "collections", "OrderedDict"); pk_str(&m, "a"); put1(&m, 0x85); put1(&m, 'R');
	in_dict(&b, &m);
	refused_pickle("OrderedDict(args)", &b, "OrderedDict with arguments");
	m.n = 0;
	put1(&m, ']'); put1(&m, '}'); pk_str(&m, "a"); pk_int(&m, 1); put1(&m, 's'); put1(&m, 'b');
	in_dict(&b, &m);
	refused_pickle("BUILD on a list", &b, "BUILD on a list is not allowed");
	m.n = 0;
	pk_vec(&m, "FloatStorage", "0", 4); put1(&m, '}'); put1(&m, 'b');
	in_dict(&b, &m);
	refused_pickle("BUILD on a tensor", &b, "BUILD on a tensor is not allowed");
	m.n = 0;
	put1(&m, '}'); put1(&m, '('); pk_str(&m, "__setstate__"); put1(&m, 't'); put1(&m, 'b');
	in_dict(&b, &m);
	refused_pickle("BUILD with a tuple state", &b, "BUILD with a tuple state is not allowed");
	m.n = 0;
	put1(&m, '}'); pk_str(&m, "x"); put1(&m, 'b');
	in_dict(&b, &m);
	refused_pickle("BUILD with a str state", &b, "BUILD with a str state");
	m.n = 0;
	/* opcodes a state dict never needs */
	put1(&m, 'i'); put(&m, "os\nsystem\n", 10);
	in_dict(&b, &m);
	refused_pickle("INST", &b, "opcode INST (0x69) is not allowed");
	m.n = 0;
	pk_global(&m, "collections", "OrderedDict"); put1(&m, ')'); put1(&m, 0x81);
	in_dict(&b, &m);
	refused_pickle("NEWOBJ", &b, "opcode NEWOBJ");
	m.n = 0;
	put1(&m, 0x82); put1(&m, 1);
	in_dict(&b, &m);
	refused_pickle("EXT1", &b, "opcode EXT1");
	m.n = 0;
	put1(&m, 'S'); put(&m, "'x'\n", 4);
	in_dict(&b, &m);
	refused_pickle("STRING (protocol 0)", &b, "opcode STRING");
	m.n = 0;
	put1(&m, 0xff);
	in_dict(&b, &m);
	refused_pickle("unknown opcode", &b, "unknown opcode 0xff");
	m.n = 0;
	put1(&b, 0x80); put1(&b, 6); put1(&b, '}'); put1(&b, '.');
	refused_pickle("protocol 6", &b, "protocol 6 is not supported");

	/* resources */
	put1(&b, 0x80); put1(&b, 2);
	for (int i = 0; i < 100000; i++) put1(&b, '(');
	refused_pickle("100k MARKs", &b, "nesting deeper than");
	put1(&b, 0x80); put1(&b, 2);
	for (int i = 0; i < 1100000; i++) put1(&b, ']');
	put1(&b, '.');
	refused_pickle("1.1M lists on the stack", &b, "stack deeper than");
	/* a value nested 100k deep (TUPLE1 of TUPLE1 of …): the unpickler never recurses, so this is
	 * harmless and the file opens, with no tensors */
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); pk_str(&b, "x"); put1(&b, 'N');
	for (int i = 0; i < 100000; i++) put1(&b, 0x85);
	put1(&b, 's'); put1(&b, '.');
	{
		static const float four[4] = { 1, 2, 3, 4 };
		write_ckpt(tmp_path("bad.ckpt"), &b, "0", four, sizeof four, NULL);
		sd_ckpt *c = sd_ckpt_open(tmp_path("bad.ckpt"));
		CHECK(c && sd_ckpt_count(c) == 0);
		if (!c) printf("  %s\n", sd_errmsg());
		sd_ckpt_close(c);
		b.n = 0;
	}
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); put1(&b, 'j'); put_le(&b, 0xFFFFFFF0u, 4); put1(&b, '.');
	refused_pickle("LONG_BINGET 0xFFFFFFF0", &b, "memo index 4294967280 was never set");
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); put1(&b, 'r'); put_le(&b, 0xFFFFFFF0u, 4); put1(&b, '.');
	refused_pickle("LONG_BINPUT 0xFFFFFFF0", &b, "memo index 4294967280 is out of range");
	put1(&b, 0x80); put1(&b, 2); put1(&b, 'X'); put_le(&b, 0xFFFFFFFFu, 4); put(&b, "abc", 3);
	refused_pickle("BINUNICODE length 2^32-1", &b, "truncated");
	put1(&b, 0x80); put1(&b, 4); put1(&b, 0x8d); put_le(&b, UINT64_MAX, 8); put(&b, "abc", 3);
	refused_pickle("BINUNICODE8 length 2^64-1", &b, "truncated");
	put1(&b, 0x80); put1(&b, 4); put1(&b, 0x95); put_le(&b, 1u << 30, 8); put1(&b, '}'); put1(&b, '.');
	refused_pickle("FRAME past the end", &b, "longer than the rest");
	put1(&b, 0x80); put1(&b, 2); put1(&b, 0x8a); put1(&b, 9); put(&b, "123456789", 9); put1(&b, '.');
	refused_pickle("LONG1 of 9 bytes", &b, "does not fit in 64 bits");
	put1(&b, 0x80); put1(&b, 2); put1(&b, 'c'); for (int i = 0; i < 300; i++) put1(&b, 'a');
	refused_pickle("GLOBAL name too long", &b, "longer than 256 bytes");

	/* truncated and malformed structure */
	views_pickle(&b);
	b.n /= 2;
	refused_pickle("truncated pickle", &b, "truncated");
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}');
	refused_pickle("no STOP", &b, "no STOP");
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); put1(&b, 's'); put1(&b, '.');
	refused_pickle("SETITEM on too little", &b, "stack underflow");
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); put1(&b, '('); pk_str(&b, "a"); put1(&b, 'u'); put1(&b, '.');
	refused_pickle("SETITEMS odd", &b, "odd number of items");
	put1(&b, 0x80); put1(&b, 2); put1(&b, ']');
	put1(&b, '('); put1(&b, 'N'); put1(&b, 'N'); put1(&b, 'u'); put1(&b, '.');
	refused_pickle("SETITEMS on a list", &b, "SETITEMS on a list");
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); put1(&b, 't'); put1(&b, '.');
	refused_pickle("TUPLE without MARK", &b, "no MARK");
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); put1(&b, '('); put1(&b, 0x87); put1(&b, '.');
	refused_pickle("TUPLE3 across a MARK", &b, "stack underflow");
	put1(&b, 0x80); put1(&b, 2); put1(&b, ']'); put1(&b, '.');
	refused_pickle("a list, not a dict", &b, "holds a list, not a dict");

	/* tensors and storages */
	m.n = 0;
	pk_tensor(&m, "FloatStorage", "0", 100, 0, 2, (int64_t[]){ 20, 20 }, (int64_t[]){ 20, 1 });
	in_dict(&b, &m);
	refused_pickle("extent beyond the storage", &b, "storage '0' has 100 elements but tensor 'x' needs 400");
	m.n = 0;
	pk_tensor(&m, "FloatStorage", "0", 4, 3, 1, (int64_t[]){ 2 }, (int64_t[]){ 1 });
	in_dict(&b, &m);
	refused_pickle("offset + size beyond", &b, "storage '0' has 4 elements but tensor 'x' needs 5");
	m.n = 0;
	pk_tensor(&m, "FloatStorage", "0", 4, 0, 1, (int64_t[]){ 4 }, (int64_t[]){ INT64_MAX / 2 });
	in_dict(&b, &m);
	refused_pickle("stride overflow", &b, "overflow");
	m.n = 0;
	pk_tensor(&m, "FloatStorage", "0", 4, 0, 1, (int64_t[]){ 2 }, (int64_t[]){ -1 });
	in_dict(&b, &m);
	refused_pickle("negative stride", &b, "a tensor stride is negative");
	m.n = 0;
	pk_tensor(&m, "FloatStorage", "0", 4, 0, 9, (int64_t[]){ 1, 1, 1, 1, 1, 1, 1, 1, 1 },
	          (int64_t[]){ 1, 1, 1, 1, 1, 1, 1, 1, 1 });
	in_dict(&b, &m);
	refused_pickle("9 dimensions", &b, "9 dimensions");
	m.n = 0;
	pk_vec(&m, "FloatStorage", "7", 4);
	in_dict(&b, &m);
	refused_pickle("missing storage file", &b, "storage '7' (archive/data/7) of tensor 'x' is missing");
	m.n = 0;
	pk_vec(&m, "FloatStorage", "0", 8);
	in_dict(&b, &m);
	refused_pickle("storage file too short", &b, "holds 16 bytes, but 32 are needed");
	m.n = 0;
	pk_vec(&m, "FloatStorage", "0", 2);
	in_dict(&b, &m);
	refused_pickle("storage file too long", &b, "holds more than the 8 bytes");
	m.n = 0;
	pk_vec(&m, "FloatStorage", "../../etc/passwd", 2);
	in_dict(&b, &m);
	refused_pickle("storage key with a slash", &b, "bad storage key");
	m.n = 0;
	pk_vec(&m, "FloatStorage", "0", (int64_t)1 << 40);
	in_dict(&b, &m);
	refused_pickle("storage of 2^40 floats", &b, "limit of one storage");
	m.n = 0;
	put1(&m, '('); pk_str(&m, "storage"); pk_global(&m, "torch", "FloatStorage"); pk_str(&m, "0");
	put1(&m, 't'); put1(&m, 'Q');
	in_dict(&b, &m);
	refused_pickle("persistent id of 3", &b, "unsupported persistent id");
	m.n = 0;
	put1(&m, '('); pk_str(&m, "module"); pk_global(&m, "torch", "FloatStorage"); pk_str(&m, "0");
	pk_str(&m, "cpu"); pk_int(&m, 4); put1(&m, 't'); put1(&m, 'Q');
	in_dict(&b, &m);
	refused_pickle("persistent id 'module'", &b, "unsupported persistent id");
	m.n = 0;
	pk_global(&m, "torch._utils", "_rebuild_tensor_v2"); pk_str(&m, "a"); put1(&m, 0x85); put1(&m, 'R');
	in_dict(&b, &m);
	refused_pickle("_rebuild_tensor_v2('a')", &b, "takes 6 or 7 arguments, not 1");
	/* two tensors under one name: Python would keep the last, but no writer makes this */
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); put1(&b, '(');
	pk_str(&b, "w"); pk_vec(&b, "FloatStorage", "0", 4);
	pk_str(&b, "w"); pk_vec(&b, "FloatStorage", "0", 4);
	put1(&b, 'u'); put1(&b, '.');
	refused_pickle("duplicate name", &b, "duplicate tensor name 'w'");
	/* one storage seen as two types */
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); put1(&b, '(');
	pk_str(&b, "a"); pk_vec(&b, "FloatStorage", "0", 4);
	pk_str(&b, "b"); pk_vec(&b, "IntStorage", "0", 4);
	put1(&b, 'u'); put1(&b, '.');
	refused_pickle("storage as two types", &b, "is used as FloatStorage of 4 and IntStorage of 4");
	free(m.p);
}

TEST(hostile_archives)
{
	struct buf b = { 0 };
	static const float four[4] = { 1, 2, 3, 4 };
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); pk_str(&b, "x"); pk_vec(&b, "FloatStorage", "0", 4);
	put1(&b, 's'); put1(&b, '.');
	const char *path = tmp_path("z.ckpt");

	struct zent ok[] = { { "a/data.pkl", b.p, b.n }, { "a/data/0", four, 16 } };
	write_zip(path, ok, 2);
	sd_ckpt *c = sd_ckpt_open(path);
	CHECK(c && sd_ckpt_count(c) == 1 && eq(c, "x", SD_DTYPE_F32, four, 16));
	if (!c) printf("  %s\n", sd_errmsg());
	sd_ckpt_close(c);

	struct zent evil[] = { { "a/data.pkl", b.p, b.n }, { "a/../evil", "x", 1 }, { "a/data/0", four, 16 } };
	write_zip(path, evil, 3);
	refused("../evil", path, "refusing entry 'a/../evil'");
	struct zent evil2[] = { { "../evil/data.pkl", b.p, b.n } };
	write_zip(path, evil2, 1);
	refused("../evil first", path, "refusing entry");
	struct zent abs[] = { { "/tmp/a/data.pkl", b.p, b.n } };
	write_zip(path, abs, 1);
	refused("absolute name", path, "refusing entry '/tmp/a/data.pkl'");
	struct zent other[] = { { "a/data.pkl", b.p, b.n }, { "b/data/0", four, 16 } };
	write_zip(path, other, 2);
	refused("another folder", path, "entry 'b/data/0' is outside the archive's folder 'a/'");
	struct zent other2[] = { { "a/data/0", four, 16 }, { "b/data.pkl", b.p, b.n } };
	write_zip(path, other2, 2);
	refused("data.pkl in another folder", path, "outside the archive's folder");
	struct zent flat[] = { { "data.pkl", b.p, b.n } };
	write_zip(path, flat, 1);
	refused("no folder", path, "not inside a folder");
	struct zent twice[] = { { "a/data.pkl", b.p, b.n }, { "a/data/0", four, 16 }, { "a/data/0", four, 16 } };
	write_zip(path, twice, 3);
	refused("duplicate storage", path, "duplicate entry 'a/data/0'");
	struct zent twice2[] = { { "a/data.pkl", b.p, b.n }, { "a/data.pkl", b.p, b.n } };
	write_zip(path, twice2, 2);
	refused("duplicate data.pkl", path, "duplicate entry 'a/data.pkl'");
	struct zent big[] = { { "a/data.pkl", b.p, b.n }, { "a/byteorder", "big", 3 }, { "a/data/0", four, 16 } };
	write_zip(path, big, 3);
	refused("big-endian", path, "byte order is 'big'");
	struct zent nopkl[] = { { "a/data/0", four, 16 }, { "a/version", "3", 1 } };
	write_zip(path, nopkl, 2);
	refused("no data.pkl", path, "no a/data.pkl in the archive");
	write_zip(path, NULL, 0);
	refused("empty zip", path, "");

	FILE *f = fopen(path, "wb");
	if (f) { fputs("this is not a zip file, just some text\n", f); fclose(f); }
	refused("not a zip", path, "not a zip");
	f = fopen(path, "wb");
	if (f) fclose(f);
	refused("empty file", path, "empty file");
	f = fopen(path, "wb");
	if (f) { fwrite(b.p, 1, b.n, f); fclose(f); }
	refused("legacy torch.save", path, "legacy");
	/* a zip cut in the middle */
	write_zip(path, ok, 2);
	if (truncate(path, 40) != 0) test_failed_++;
	refused("truncated zip", path, "");
	refused("a folder", tmpdir, "is a folder");
	refused("no such file", tmp_path("none.ckpt"), "No such file");
	CHECK(sd_ckpt_open(NULL) == NULL);
	sd_ckpt_close(NULL);
	CHECK(sd_ckpt_count(NULL) == 0 && sd_ckpt_name(NULL, 0) == NULL && sd_ckpt_find(NULL, "x") == -1);
	free(b.p);
}

/* Random damage to a valid pickle (a fixed seed, so that a failure can be replayed): every mutant must
 * either open or fail with a message naming the file, and never crash (run under ASan or valgrind). */
TEST(mutations)
{
	struct buf good = { 0 }, b = { 0 };
	views_pickle(&good);
	const char *path = tmp_path("mut.ckpt");
	uint64_t x = 0x9e3779b97f4a7c15ull;
	int opened = 0, refused_n = 0, bad = 0;
	for (int k = 0; k < 400; k++) {
		b.n = 0;
		put(&b, good.p, good.n);
		int flips = 1 + k % 4;
		for (int f = 0; f < flips; f++) {
			x = x * 6364136223846793005ull + 1442695040888963407ull;
			size_t at = (size_t)(x >> 33) % b.n;
			b.p[at] = k % 3 == 0 ? (unsigned char)(x >> 17) : (unsigned char)(b.p[at] ^ (1u << (x >> 60) % 8));
		}
		if (k % 10 == 9) b.n = (size_t)(x >> 20) % b.n;
		write_ckpt(path, &b, "0", f6, sizeof f6, "1", s2, sizeof s2, "2", c1, sizeof c1, "3", b2, sizeof b2,
		           "4", bf1, sizeof bf1, "5", "", (size_t)0, "6", d1, sizeof d1, "7", l3, sizeof l3, NULL);
		sd_ckpt *c = sd_ckpt_open(path);
		if (c) opened++;
		else if (strstr(sd_errmsg(), path)) refused_n++;
		else if (bad++ < 5) printf("  mutant %d: message without the path: %s\n", k, sd_errmsg());
		sd_ckpt_close(c);
	}
	printf("  400 mutants: %d opened, %d refused\n", opened, refused_n);
	CHECK(bad == 0 && refused_n > 0);
	remove(path);
	free(good.p);
	free(b.p);
}

TEST(nothing_ran)
{
	struct stat st;
	CHECK(stat(pwned, &st) != 0 && errno == ENOENT);
}

int main(void)
{
	const char *t = getenv("TMPDIR");
	snprintf(tmpdir, sizeof tmpdir, "%s/sdckpt.XXXXXX", t && *t ? t : "/tmp");
	if (!mkdtemp(tmpdir)) {
		perror(tmpdir);
		return 1;
	}
	snprintf(pwned, sizeof pwned, "/tmp/sdpipe-pwned-%ld", (long)getpid());
	RUN(tiny_ldm);
	RUN(matches_diffusers);
	RUN(views_and_types);
	RUN(protocol4_and_order);
	RUN(hostile_pickles);
	RUN(hostile_archives);
	RUN(mutations);
	RUN(nothing_ran);
	remove(tmp_path("views.ckpt"));
	remove(tmp_path("p4.ckpt"));
	remove(tmp_path("bad.ckpt"));
	remove(tmp_path("z.ckpt"));
	rmdir(tmpdir);
	return test_summary();
}
