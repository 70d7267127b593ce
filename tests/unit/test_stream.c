/*
 * test_stream.c - tensor streams (lib/io/stream.c) and frame values (lib/value.c): round trips of every
 * dtype, byte-identical pass-through of unknown keys, large frames through a pipe, and every kind of
 * hostile input sd-tensor(5) promises a one-line message for.  Hand-made frames are packed with
 * msgpack-c directly, the way a Python writer would produce them.
 */
#include <msgpack.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include "sd.h"
#include "test.h"

/* ==== helpers ==== */

/* A temporary stream holding n bytes, positioned at the start. */
static FILE *mem(const void *p, size_t n)
{
	FILE *f = tmpfile();
	if (!f) return NULL;
	if (n) fwrite(p, 1, n, f);
	rewind(f);
	return f;
}

/* Read every frame of p[0..n) as "stdin"; returns the last sd_reader_next code (0 or -1) and counts the
 * frames read in *count. */
static int read_all(const void *p, size_t n, long *count)
{
	FILE *f = mem(p, n);
	sd_reader *r = sd_reader_new(f, "stdin");
	sd_value *fr;
	int rc;
	*count = 0;
	while ((rc = sd_reader_next(r, &fr)) == 1) {
		sd_value_free(fr);
		(*count)++;
	}
	sd_reader_free(r);
	fclose(f);
	return rc;
}

/* The stream p[0..n) must fail after `good` frames with a message holding needle. */
#define EXPECT_ERR(p, n, good, needle) expect_err_(__LINE__, p, n, good, needle)
/* The same for a string literal of raw bytes (its NUL not included). */
#define EXPECT_LIT(lit, good, needle) expect_err_(__LINE__, lit, sizeof(lit) - 1, good, needle)
static void expect_err_(int line, const void *p, size_t n, long good, const char *needle)
{
	long count;
	int rc = read_all(p, n, &count);
	int ok = rc == -1 && count == good && strstr(sd_errmsg(), needle);
	printf("  line %d: %s \"%s\"\n", line, ok ? "ok" : "WRONG:", rc == -1 ? sd_errmsg() : "(no error)");
	if (!ok) {
		printf("  %s:%d: expected -1 after %ld frames with \"%s\", got rc %d after %ld\n", __FILE__, line,
		       good, needle, rc, count);
		test_failed_++;
	}
}

/* A msgpack packer into a fresh sbuffer. */
struct pk {
	msgpack_sbuffer sb;
	msgpack_packer p;
};

static void pk_init(struct pk *k)
{
	msgpack_sbuffer_init(&k->sb);
	msgpack_packer_init(&k->p, &k->sb, msgpack_sbuffer_write);
}

static void pk_str(struct pk *k, const char *s)
{
	msgpack_pack_str(&k->p, strlen(s));
	msgpack_pack_str_body(&k->p, s, strlen(s));
}

/* A frame {"latent": {dtype, shape[0..ndim), data of nbytes}} with the tensor keys as given. */
static void pk_tensor_frame(struct pk *k, const char *dtype, int ndim, const int64_t *shape, size_t nbytes)
{
	pk_init(k);
	msgpack_pack_map(&k->p, 1);
	pk_str(k, "latent");
	msgpack_pack_map(&k->p, 3);
	pk_str(k, "dtype");
	pk_str(k, dtype);
	pk_str(k, "shape");
	msgpack_pack_array(&k->p, ndim);
	for (int i = 0; i < ndim; i++) msgpack_pack_int64(&k->p, shape[i]);
	pk_str(k, "data");
	msgpack_pack_bin(&k->p, nbytes);
	char *z = calloc(1, nbytes + 1);
	msgpack_pack_bin_body(&k->p, z, nbytes);
	free(z);
}

static sd_tensor *tensor_bytes(enum sd_dtype dt, int ndim, const int64_t *shape, unsigned seed)
{
	sd_tensor *t = sd_tensor_new(dt, ndim, shape);
	unsigned char *b = t->data;
	for (size_t i = 0; i < sd_tensor_nbytes(t); i++) {
		seed = seed * 1103515245u + 12345u;
		b[i] = (unsigned char)(seed >> 16);
	}
	return t;
}

/* ==== round trips ==== */

/* Every dtype survives write → read bit-exactly (f16/bf16 raw bits, NaN payloads included). */
TEST(every_dtype)
{
	static const int64_t shape[3] = {2, 3, 5};
	FILE *f = tmpfile();
	sd_value *fr = sd_value_map();
	sd_tensor *orig[SD_DTYPE_COUNT];
	for (int d = 0; d < SD_DTYPE_COUNT; d++) {
		orig[d] = tensor_bytes((enum sd_dtype)d, 3, shape, 7 + d);
		if (d == SD_DTYPE_F16) ((uint16_t *)orig[d]->data)[0] = 0x7e01;  /* NaN with a payload */
		if (d == SD_DTYPE_BF16) ((uint16_t *)orig[d]->data)[0] = 0xffc1;
		sd_tensor *c = sd_tensor_new((enum sd_dtype)d, 3, shape);
		memcpy(c->data, orig[d]->data, sd_tensor_nbytes(c));
		CHECK_OK(sd_map_set_tensor(fr, sd_dtype_name((enum sd_dtype)d), c));
	}
	CHECK_OK(sd_frame_write(f, fr));
	sd_value_free(fr);
	rewind(f);
	sd_reader *r = sd_reader_new(f, "tmp");
	CHECK(sd_reader_next(r, &fr) == 1);
	for (int d = 0; d < SD_DTYPE_COUNT; d++) {
		sd_tensor *t = sd_map_tensor(fr, sd_dtype_name((enum sd_dtype)d));
		CHECK(t && t->dtype == d && sd_tensor_same_shape(t, orig[d]));
		if (!t) continue;
		CHECK(((uintptr_t)t->data & 63) == 0);
		size_t n = sd_tensor_nbytes(t), diff = 0;
		for (size_t i = 0; i < n; i++)
			if (((unsigned char *)t->data)[i] != ((unsigned char *)orig[d]->data)[i]) diff++;
		printf("  %s: %zu bytes, %zu differ (max|diff| over raw bytes)\n", sd_dtype_name((enum sd_dtype)d), n,
		       diff);
		CHECK(diff == 0);
	}
	if (fr) {
		sd_tensor *t = sd_map_tensor(fr, "f32");
		if (t) CHECK_CLOSE((float *)t->data, (float *)orig[SD_DTYPE_F32]->data, 30, 0.0);
	}
	sd_value_free(fr);
	CHECK(sd_reader_next(r, &fr) == 0);
	for (int d = 0; d < SD_DTYPE_COUNT; d++) sd_tensor_free(orig[d]);
	sd_reader_free(r);
	fclose(f);
}

/* 50 frames written one after another come back in order, then a clean end. */
TEST(many_frames)
{
	FILE *f = tmpfile();
	for (int i = 0; i < 50; i++) {
		sd_value *fr = sd_value_map();
		sd_tensor *t = sd_tensor_newv(SD_DTYPE_F32, 1, (int64_t)i + 1);
		for (int j = 0; j <= i; j++) ((float *)t->data)[j] = (float)(i * 1000 + j);
		CHECK_OK(sd_map_set_int(fr, "i", i));
		CHECK_OK(sd_map_set_tensor(fr, "x", t));
		CHECK_OK(sd_frame_write(f, fr));
		sd_value_free(fr);
	}
	rewind(f);
	sd_reader *r = sd_reader_new(f, "tmp");
	CHECK(sd_reader_index(r) == -1);
	sd_value *fr;
	int n = 0, bad = 0;
	double maxdiff = 0;
	while (sd_reader_next(r, &fr) == 1) {
		int64_t i = -1;
		CHECK_OK(sd_map_get_int(fr, "i", &i));
		sd_tensor *t = sd_map_tensor(fr, "x");
		if (i != n || sd_reader_index(r) != n || !t || t->shape[0] != n + 1) bad++;
		else
			for (int j = 0; j <= n; j++) {
				double d = fabs(((float *)t->data)[j] - (float)(n * 1000 + j));
				if (d > maxdiff) maxdiff = d;
			}
		sd_value_free(fr);
		n++;
	}
	printf("  %d frames, %d out of order, max|diff| %g\n", n, bad, maxdiff);
	CHECK(n == 50 && bad == 0 && maxdiff == 0);
	CHECK(sd_reader_next(r, &fr) == 0); /* still at the end */
	sd_reader_free(r);
	fclose(f);
}

/* A frame of every value kind, nested tensors and unknown keys: read → write is byte-identical. */
TEST(passthrough_identical)
{
	sd_value *fr = sd_value_map(), *arr = sd_value_array(), *sub = sd_value_map();
	CHECK_OK(sd_map_set_str(fr, "prompt", "a photo of an astronaut riding a horse \xc3\xa9"));
	CHECK_OK(sd_map_set(fr, "nothing", sd_value_nil()));
	CHECK_OK(sd_map_set(fr, "yes", sd_value_bool(1)));
	CHECK_OK(sd_map_set_int(fr, "neg", -1234567890123LL));
	CHECK_OK(sd_map_set_int(fr, "small", 7));
	CHECK_OK(sd_map_set_float(fr, "guidance", 7.5));
	CHECK_OK(sd_map_set(fr, "blob", sd_value_bin("\0\1\2\3", 4)));
	CHECK_OK(sd_map_set(fr, "empty_bin", sd_value_bin(NULL, 0)));
	CHECK_OK(sd_map_set_str(fr, "", "empty key"));
	CHECK_OK(sd_array_push(arr, sd_value_int(1)));
	CHECK_OK(sd_array_push(arr, sd_value_tensor(tensor_bytes(SD_DTYPE_I32, 1, (int64_t[]){4}, 3))));
	CHECK_OK(sd_array_push(arr, sd_value_array()));
	CHECK_OK(sd_array_push(arr, sd_value_map()));
	CHECK_OK(sd_map_set_str(sub, "name", "euler"));
	CHECK_OK(sd_map_set_tensor(sub, "noise", tensor_bytes(SD_DTYPE_F16, 2, (int64_t[]){2, 2}, 5)));
	CHECK_OK(sd_map_set(sub, "list", arr));
	CHECK_OK(sd_map_set(fr, "x-unknown", sub));
	CHECK_OK(sd_map_set_tensor(fr, "latent", tensor_bytes(SD_DTYPE_F32, 4, (int64_t[]){1, 4, 2, 2}, 9)));

	char *a, *b;
	size_t na, nb;
	sd_value *back = NULL;
	CHECK_OK(sd_frame_pack(fr, &a, &na));
	CHECK_OK(sd_frame_unpack(a, na, &back));
	CHECK(back != NULL);
	if (!back) return;
	CHECK_OK(sd_frame_pack(back, &b, &nb));
	CHECK(na == nb && memcmp(a, b, na) == 0);
	printf("  %zu bytes packed, repacked %zu bytes, %s\n", na, nb, na == nb && !memcmp(a, b, na) ? "identical" : "DIFFERENT");
	/* the same through a stream: read → write gives the written bytes */
	FILE *f = mem(a, na), *g = tmpfile();
	sd_reader *r = sd_reader_new(f, "tmp");
	sd_value *fr2;
	CHECK(sd_reader_next(r, &fr2) == 1);
	CHECK_OK(sd_frame_write(g, fr2));
	long ng = ftell(g);
	char *c = malloc(ng > 0 ? ng : 1);
	rewind(g);
	CHECK(fread(c, 1, ng, g) == (size_t)ng && (size_t)ng == na && memcmp(c, a, na) == 0);
	/* order and content of the nested values */
	CHECK(fr2->u.m.n == 11 && strcmp(fr2->u.m.k[0], "prompt") == 0 && strcmp(fr2->u.m.k[10], "latent") == 0);
	sd_value *s = sd_map_get(fr2, "x-unknown");
	CHECK(s && s->type == SD_V_MAP && strcmp(sd_map_str(s, "name"), "euler") == 0);
	sd_value *l = sd_map_get(s, "list");
	CHECK(l && l->type == SD_V_ARRAY && l->u.a.n == 4 && l->u.a.v[1]->type == SD_V_TENSOR);
	CHECK(l && l->u.a.v[1]->u.t->dtype == SD_DTYPE_I32);
	CHECK(sd_map_get(fr2, "empty_bin")->type == SD_V_BIN && sd_map_get(fr2, "empty_bin")->u.s.n == 0);
	CHECK(strcmp(sd_map_str(fr2, ""), "empty key") == 0);
	/* a deep copy packs the same */
	sd_value *d = sd_value_dup(fr2);
	char *e;
	size_t ne;
	CHECK_OK(sd_frame_pack(d, &e, &ne));
	CHECK(ne == na && memcmp(e, a, na) == 0);
	free(e);
	sd_value_free(d);
	free(c);
	sd_value_free(fr2);
	sd_reader_free(r);
	fclose(f);
	fclose(g);
	free(a);
	free(b);
	sd_value_free(back);
	sd_value_free(fr);
}

/* A tensor written by another tool with its keys in another order, next to a float32 value, reads as
 * the same tensor and is re-written in the canonical order dtype, shape, data. */
TEST(foreign_writer)
{
	struct pk k;
	float v[2] = {1.5f, -2.25f};
	pk_init(&k);
	msgpack_pack_map(&k.p, 2);
	pk_str(&k, "x");
	msgpack_pack_map(&k.p, 3);
	pk_str(&k, "data");
	msgpack_pack_bin(&k.p, 8);
	msgpack_pack_bin_body(&k.p, v, 8);
	pk_str(&k, "shape");
	msgpack_pack_array(&k.p, 1);
	msgpack_pack_uint8(&k.p, 2);
	pk_str(&k, "dtype");
	pk_str(&k, "f32");
	pk_str(&k, "s");
	msgpack_pack_float(&k.p, 0.1f);
	sd_value *fr = NULL;
	CHECK_OK(sd_frame_unpack(k.sb.data, k.sb.size, &fr));
	sd_tensor *t = sd_map_tensor(fr, "x");
	CHECK(t && t->ndim == 1 && t->shape[0] == 2);
	if (t) CHECK_CLOSE((float *)t->data, v, 2, 0.0);
	double s = 0;
	CHECK(sd_map_get_float(fr, "s", &s) == 0 && s == (double)0.1f);
	char *b;
	size_t nb;
	CHECK_OK(sd_frame_pack(fr, &b, &nb));
	/* {"x": {"dtype": "f32", ...}} : fixmap(2), fixstr "x", fixmap(3), fixstr(5) "dtype" */
	CHECK(nb > 10 && memcmp(b, "\x82\xa1x\x83\xa5" "dtype", 10) == 0);
	free(b);
	sd_value_free(fr);
	msgpack_sbuffer_destroy(&k.sb);
}

/* Scalar tensors (shape []) hold one element; zero-size tensors (shape [0,3]) hold none. */
TEST(scalar_and_empty)
{
	sd_value *fr = sd_value_map();
	sd_tensor *sc = sd_tensor_new(SD_DTYPE_F64, 0, NULL);
	*(double *)sc->data = 3.25;
	CHECK_OK(sd_map_set_tensor(fr, "scalar", sc));
	CHECK_OK(sd_map_set_tensor(fr, "empty", sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)0, (int64_t)3)));
	char *b;
	size_t n;
	sd_value *back = NULL;
	CHECK_OK(sd_frame_pack(fr, &b, &n));
	CHECK_OK(sd_frame_unpack(b, n, &back));
	sd_tensor *s = sd_map_tensor(back, "scalar"), *e = sd_map_tensor(back, "empty");
	CHECK(s && s->ndim == 0 && sd_tensor_numel(s) == 1 && *(double *)s->data == 3.25);
	CHECK(e && e->ndim == 2 && e->shape[0] == 0 && e->shape[1] == 3 && sd_tensor_nbytes(e) == 0);
	free(b);
	sd_value_free(back);
	sd_value_free(fr);
}

/* A 40 MB tensor through a pipe from another process: read in chunks, never whole. */
TEST(large_frame_pipe)
{
	enum { N = 10 * 1000 * 1000 };
	int fd[2];
	if (pipe(fd) < 0) SKIP("no pipe");
	pid_t pid = fork();
	if (pid < 0) SKIP("no fork");
	if (pid == 0) {
		close(fd[0]);
		FILE *w = fdopen(fd[1], "w");
		sd_value *fr = sd_value_map();
		sd_tensor *t = sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)N / 1000, (int64_t)1000);
		for (long i = 0; i < N; i++) ((float *)t->data)[i] = (float)(i % 9973) * 0.5f;
		sd_map_set_str(fr, "prompt", "big");
		sd_map_set_tensor(fr, "image", t);
		int rc = sd_frame_write(w, fr) | sd_frame_write(w, fr);
		sd_value_free(fr);
		rc |= fclose(w);
		_exit(rc ? 1 : 0);
	}
	close(fd[1]);
	FILE *f = fdopen(fd[0], "r");
	sd_reader *r = sd_reader_new(f, "pipe");
	float *want = malloc(sizeof(float) * N);
	for (long i = 0; i < N; i++) want[i] = (float)(i % 9973) * 0.5f;
	sd_value *fr;
	int frames = 0, rc;
	while ((rc = sd_reader_next(r, &fr)) == 1) {
		sd_tensor *t = sd_map_tensor(fr, "image");
		CHECK(t && sd_tensor_numel(t) == N);
		if (t) CHECK_CLOSE((float *)t->data, want, N, 0.0);
		sd_value_free(fr);
		frames++;
	}
	CHECK(frames == 2 && rc == 0);
	int st;
	waitpid(pid, &st, 0);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	free(want);
	sd_reader_free(r);
	fclose(f);
}

/* The reader never reads past the frame it returns: a frame that has arrived whole is returned while
 * the writer is still running (a read-ahead would block here; alarm() turns that into a failure). */
TEST(no_read_ahead)
{
	int fd[2];
	if (pipe(fd) < 0) SKIP("no pipe");
	sd_value *fr = sd_value_map();
	sd_map_set_str(fr, "prompt", "a");
	sd_map_set_tensor(fr, "x", sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)3, (int64_t)5));
	char *b;
	size_t n;
	CHECK_OK(sd_frame_pack(fr, &b, &n));
	sd_value_free(fr);
	CHECK(write(fd[1], b, n) == (ssize_t)n);
	FILE *f = fdopen(fd[0], "r");
	sd_reader *r = sd_reader_new(f, "pipe");
	alarm(60);
	CHECK(sd_reader_next(r, &fr) == 1);
	sd_value_free(fr);
	CHECK(write(fd[1], b, n) == (ssize_t)n);
	CHECK(sd_reader_next(r, &fr) == 1);
	sd_value_free(fr);
	close(fd[1]);
	CHECK(sd_reader_next(r, &fr) == 0);
	alarm(0);
	free(b);
	sd_reader_free(r);
	fclose(f);
}

/* ==== hostile input ==== */

TEST(empty_input)
{
	long n;
	CHECK(read_all("", 0, &n) == 0 && n == 0);
	sd_value *fr = (sd_value *)1;
	CHECK(sd_frame_unpack("", 0, &fr) == -1 && fr == NULL);
}

/* Every proper prefix of a valid frame is "truncated", never a crash or a hang. */
TEST(truncated)
{
	sd_value *fr = sd_value_map();
	sd_map_set_str(fr, "prompt", "cat");
	sd_map_set_tensor(fr, "latent", tensor_bytes(SD_DTYPE_F32, 2, (int64_t[]){2, 3}, 1));
	sd_map_set(fr, "nested", sd_value_array());
	sd_array_push(sd_map_get(fr, "nested"), sd_value_float(1.0));
	char *b;
	size_t n;
	CHECK_OK(sd_frame_pack(fr, &b, &n));
	/* three whole frames and a cut fourth: the error names frame 3 */
	char *s = malloc(4 * n);
	for (int i = 0; i < 4; i++) memcpy(s + i * n, b, n);
	int bad = 0;
	for (size_t cut = 1; cut < n; cut++) {
		long count;
		int rc = read_all(s, 3 * n + cut, &count);
		if (rc != -1 || count != 3 || !strstr(sd_errmsg(), "stdin: frame 3: truncated (stream ends inside a frame)")) {
			printf("  cut %zu: rc %d count %ld: %s\n", cut, rc, count, sd_errmsg());
			bad++;
		}
		sd_value *one;
		if (sd_frame_unpack(b, cut, &one) != -1 || !strstr(sd_errmsg(), "truncated")) bad++;
	}
	printf("  %zu cuts, %d wrong\n", n - 1, bad);
	CHECK(bad == 0);
	EXPECT_ERR(s, 3 * n + 1, 3, "stdin: frame 3: truncated (stream ends inside a frame)");
	free(s);
	free(b);
	sd_value_free(fr);
}

/* Garbage, non-maps and trailing garbage after good frames. */
TEST(garbage)
{
	EXPECT_LIT("\xc1", 0, "stdin: frame 0: not msgpack");
	EXPECT_LIT("hello world\n", 0, "stdin: frame 0: not a map");
	EXPECT_LIT("\x93\x01\x02\x03", 0, "not a map");
	EXPECT_LIT("\x81\xa1" "a\xc1", 0, "not msgpack (byte 0xc1");
	/* a good frame {"a": 1} then garbage */
	EXPECT_LIT("\x81\xa1" "a\x01" "\x81\xa1" "a\x01" "xyz", 2, "stdin: frame 2: not a map");
	EXPECT_LIT("\x81\xa1" "a\x01" "\xc1", 1, "stdin: frame 1: not msgpack");
	EXPECT_LIT("\x81\xa1" "a\x01" "\x82", 1, "stdin: frame 1: truncated");
	EXPECT_LIT("\x81\x01\x02", 0, "a key is an integer, not a string");
	EXPECT_LIT("\x81\xa1" "m\x81\xc0\x02", 0, "map 'm': a key is nil, not a string");
	EXPECT_LIT("\x82\xa1" "a\x01\xa1" "a\x02", 0, "duplicate key 'a'");
	EXPECT_LIT("\x81\xa1" "e\xd4\x01\x00", 0, "'e': msgpack ext values are not supported");
	/* five bytes announcing 2^32-1 entries must not allocate 64 GiB */
	EXPECT_LIT("\x81\xa1" "a\xdd\xff\xff\xff\xff", 0, "stdin: frame 0:");
	EXPECT_LIT("\xdf\xff\xff\xff\xff", 0, "stdin: frame 0:");
	EXPECT_LIT("\x81\xa1" "a\xc6\xff\xff\xff\xf0", 0, "truncated");
	sd_value *fr;
	CHECK(sd_frame_unpack("\x81\xa1" "a\x01\x00", 5, &fr) == -1 && strstr(sd_errmsg(), "garbage after"));
	/* after an error the reader stays failed */
	FILE *f = mem("\xc1\x80", 2);
	sd_reader *r = sd_reader_new(f, "stdin");
	CHECK(sd_reader_next(r, &fr) == -1 && sd_reader_next(r, &fr) == -1);
	sd_reader_free(r);
	fclose(f);
}

/* Bad tensors: each message names the tensor and the problem. */
TEST(bad_tensors)
{
	struct pk k;
	pk_tensor_frame(&k, "f13", 2, (int64_t[]){2, 3}, 24);
	EXPECT_ERR(k.sb.data, k.sb.size, 0, "stdin: frame 0: tensor 'latent': unknown dtype 'f13'");
	msgpack_sbuffer_destroy(&k.sb);
	pk_tensor_frame(&k, "f32", 2, (int64_t[]){(int64_t)1 << 62, (int64_t)1 << 62}, 0);
	EXPECT_ERR(k.sb.data, k.sb.size, 0, "tensor 'latent': shape [4611686018427387904,4611686018427387904] product overflows");
	msgpack_sbuffer_destroy(&k.sb);
	pk_tensor_frame(&k, "f32", 2, (int64_t[]){2, 3}, 8);
	EXPECT_ERR(k.sb.data, k.sb.size, 0, "tensor 'latent': data length 8 but shape [2,3] f32 needs 24 bytes");
	msgpack_sbuffer_destroy(&k.sb);
	pk_tensor_frame(&k, "u8", 2, (int64_t[]){2, -3}, 0);
	EXPECT_ERR(k.sb.data, k.sb.size, 0, "tensor 'latent': negative dimension -3");
	msgpack_sbuffer_destroy(&k.sb);
	pk_tensor_frame(&k, "u8", 9, (int64_t[]){1, 1, 1, 1, 1, 1, 1, 1, 1}, 1);
	EXPECT_ERR(k.sb.data, k.sb.size, 0, "tensor 'latent': too many dimensions (9, at most 8)");
	msgpack_sbuffer_destroy(&k.sb);
	pk_tensor_frame(&k, "u8", 8, (int64_t[]){1, 1, 1, 1, 1, 1, 1, 2}, 2); /* 8 dims is fine */
	long n;
	CHECK(read_all(k.sb.data, k.sb.size, &n) == 0 && n == 1);
	msgpack_sbuffer_destroy(&k.sb);

	/* nested: {"s": {"list": [0, {"dtype": "i64", "shape": 3, ...}]}} */
	pk_init(&k);
	msgpack_pack_map(&k.p, 1);
	pk_str(&k, "s");
	msgpack_pack_map(&k.p, 1);
	pk_str(&k, "list");
	msgpack_pack_array(&k.p, 2);
	msgpack_pack_nil(&k.p);
	msgpack_pack_map(&k.p, 3);
	pk_str(&k, "dtype");
	pk_str(&k, "i64");
	pk_str(&k, "shape");
	msgpack_pack_int(&k.p, 3);
	pk_str(&k, "data");
	msgpack_pack_bin(&k.p, 0);
	EXPECT_ERR(k.sb.data, k.sb.size, 0, "tensor 's.list[1]': shape is an integer, not an array");
	msgpack_sbuffer_destroy(&k.sb);

	/* extra, missing and mistyped keys */
	EXPECT_LIT("\x81\xa1t\x84\xa5" "dtype\xa2u8\xa5shape\x90\xa4" "data\xc4\x01\x00\xa1x\xc0", 0,
	           "tensor 't': unexpected key 'x'");
	EXPECT_LIT("\x81\xa1t\x82\xa5" "dtype\xa2u8\xa5shape\x90", 0, "tensor 't': no 'data'");
	EXPECT_LIT("\x81\xa1t\x83\xa5" "dtype\x01\xa5shape\x90\xa4" "data\xc4\x01\x00", 0, "dtype is an integer, not a string");
	EXPECT_LIT("\x81\xa1t\x83\xa5" "dtype\xa2u8\xa5shape\x90\xa4" "data\xa1\x00", 0, "data is a string, not a bin");
	EXPECT_LIT("\x81\xa1t\x83\xa5" "dtype\xa2u8\xa5shape\x91\xcb\x3f\xf0\0\0\0\0\0\0\xa4" "data\xc4\x01\x00", 0,
	           "shape holds a float, not an integer");
	/* an error after two good frames names frame 2 */
	pk_tensor_frame(&k, "f32", 1, (int64_t[]){2}, 8);
	size_t one = k.sb.size;
	char *s = malloc(3 * one);
	memcpy(s, k.sb.data, one);
	memcpy(s + one, k.sb.data, one);
	memcpy(s + 2 * one, k.sb.data, one);
	s[3 * one - 9] = 7;    /* bin8 length 8 → 7: the last frame has 7 bytes of data and 1 left over */
	EXPECT_ERR(s, 3 * one, 2, "stdin: frame 2:");
	free(s);
	msgpack_sbuffer_destroy(&k.sb);
}

/* 32 nested containers are fine, 33 are refused (msgpack-c's own limit). */
TEST(nesting)
{
	char b[256];
	for (int depth = 31; depth <= 34; depth++) {
		/* {"a": {"a": ... {} }} : depth maps */
		int n = 0;
		for (int i = 0; i < depth - 1; i++) {
			b[n++] = (char)0x81;
			b[n++] = (char)0xa1;
			b[n++] = 'a';
		}
		b[n++] = (char)0x80;
		long count;
		int rc = read_all(b, n, &count);
		printf("  depth %d: rc %d %s\n", depth, rc, rc < 0 ? sd_errmsg() : "");
		if (depth <= 32) CHECK(rc == 0 && count == 1);
		else CHECK(rc == -1 && strstr(sd_errmsg(), "nesting deeper than 32 levels"));
	}
	/* arrays too */
	memset(b, 0x91, 40);
	b[40] = (char)0xc0;
	char c[64] = "\x81\xa1" "a";
	memcpy(c + 3, b, 41);
	EXPECT_ERR(c, 44, 0, "nesting deeper than 32 levels");
}

/* The frame cap: $SD_MAX_FRAME_MB, noticed from the headers, before the bytes are buffered. */
TEST(frame_cap)
{
	struct pk k;
	setenv("SD_MAX_FRAME_MB", "1", 1);
	pk_tensor_frame(&k, "f32", 1, (int64_t[]){512 * 1024}, 2 << 20);
	FILE *f = mem(k.sb.data, k.sb.size);
	sd_reader *r = sd_reader_new(f, "stdin");
	sd_value *fr;
	CHECK(sd_reader_next(r, &fr) == -1 && strstr(sd_errmsg(), "stdin: frame 0: larger than the 1 MiB frame limit"));
	printf("  %s (read %ld of %zu bytes)\n", sd_errmsg(), ftell(f), k.sb.size);
	CHECK(ftell(f) < 4096);
	sd_reader_free(r);
	fclose(f);
	msgpack_sbuffer_destroy(&k.sb);

	/* many small bins: only noticed while buffering, still before 1 MiB + one chunk is read */
	pk_init(&k);
	msgpack_pack_map(&k.p, 20);
	char *z = calloc(1, 100000);
	for (int i = 0; i < 20; i++) {
		char key[16];
		snprintf(key, sizeof key, "b%d", i);
		pk_str(&k, key);
		msgpack_pack_bin(&k.p, 100000);
		msgpack_pack_bin_body(&k.p, z, 100000);
	}
	free(z);
	f = mem(k.sb.data, k.sb.size);
	r = sd_reader_new(f, "stdin");
	CHECK(sd_reader_next(r, &fr) == -1 && strstr(sd_errmsg(), "frame limit"));
	printf("  read %ld of %zu bytes\n", ftell(f), k.sb.size);
	CHECK(ftell(f) <= (1 << 20) + 100010);
	sd_reader_free(r);
	fclose(f);
	msgpack_sbuffer_destroy(&k.sb);

	setenv("SD_MAX_FRAME_MB", "abc", 1);
	f = tmpfile();
	CHECK(sd_reader_new(f, "stdin") == NULL && strstr(sd_errmsg(), "SD_MAX_FRAME_MB"));
	setenv("SD_MAX_FRAME_MB", "0", 1);
	CHECK(sd_reader_new(f, "stdin") == NULL);
	unsetenv("SD_MAX_FRAME_MB");
	r = sd_reader_new(f, "stdin");
	CHECK(r != NULL);
	sd_reader_free(r);
	fclose(f);
}

/* ==== values ==== */

/* uint64 above INT64_MAX is kept as UINT and written back unchanged. */
TEST(big_uint)
{
	const char in[] = "\x82\xa1u\xcf\xff\xff\xff\xff\xff\xff\xff\xfe\xa1i\xcf\x7f\xff\xff\xff\xff\xff\xff\xff";
	sd_value *fr = NULL;
	CHECK_OK(sd_frame_unpack(in, sizeof in - 1, &fr));
	if (!fr) return;
	sd_value *u = sd_map_get(fr, "u");
	CHECK(u && u->type == SD_V_UINT && u->u.u == UINT64_MAX - 1);
	int64_t i;
	double d;
	CHECK(sd_map_get_int(fr, "u", &i) == -1 && strstr(sd_errmsg(), "too large"));
	CHECK(sd_map_get_float(fr, "u", &d) == 0 && d == (double)(UINT64_MAX - 1));
	CHECK(sd_map_get_int(fr, "i", &i) == 0 && i == INT64_MAX);
	char *b;
	size_t n;
	CHECK_OK(sd_frame_pack(fr, &b, &n));
	CHECK(n == sizeof in - 1 && memcmp(b, in, n) == 0);
	free(b);
	sd_value_free(fr);
}

TEST(getters)
{
	sd_value *m = sd_value_map();
	sd_map_set_int(m, "steps", 20);
	sd_map_set_float(m, "cfg", 7.5);
	sd_map_set_float(m, "two", 2.0);
	sd_map_set_str(m, "name", "ddim");
	sd_map_set_tensor(m, "t", sd_tensor_newv(SD_DTYPE_U8, 1, (int64_t)3));
	int64_t i = -1;
	double d = -1;
	CHECK(sd_map_get_int(m, "steps", &i) == 0 && i == 20);
	CHECK(sd_map_get_float(m, "steps", &d) == 0 && d == 20.0);
	CHECK(sd_map_get_float(m, "cfg", &d) == 0 && d == 7.5);
	CHECK(sd_map_get_int(m, "two", &i) == 0 && i == 2);
	i = 99;
	CHECK(sd_map_get_int(m, "cfg", &i) == -1 && i == 99 && strstr(sd_errmsg(), "key 'cfg': 7.5 is not an integer"));
	sd_map_set_float(m, "cfg", 1.5);
	CHECK(sd_map_get_int(m, "cfg", &i) == -1 && strstr(sd_errmsg(), "1.5 is not an integer"));
	sd_map_set_float(m, "huge", 1e300);
	CHECK(sd_map_get_int(m, "huge", &i) == -1);
	sd_map_set_float(m, "nan", NAN);
	CHECK(sd_map_get_int(m, "nan", &i) == -1);
	CHECK(sd_map_get_int(m, "absent", &i) == 1 && i == 99);
	CHECK(sd_map_get_float(m, "absent", &d) == 1);
	CHECK(sd_map_get_int(m, "name", &i) == -1 && strstr(sd_errmsg(), "key 'name': expected an integer, got a string"));
	CHECK(sd_map_get_float(m, "t", &d) == -1 && strstr(sd_errmsg(), "got a tensor"));
	CHECK(strcmp(sd_map_str(m, "name"), "ddim") == 0);
	CHECK(sd_map_str(m, "steps") == NULL && sd_map_str(m, "absent") == NULL);
	CHECK(sd_map_tensor(m, "t") != NULL && sd_map_tensor(m, "t")->shape[0] == 3);
	CHECK(sd_map_tensor(m, "name") == NULL && sd_map_tensor(m, "absent") == NULL);
	CHECK(sd_map_get(m, "steps")->type == SD_V_INT && sd_map_get(m, "absent") == NULL);
	CHECK(sd_map_get(NULL, "x") == NULL);
	sd_value *a = sd_value_array();
	CHECK(sd_map_get(a, "x") == NULL && sd_map_set_int(a, "x", 1) == -1);
	CHECK(sd_array_push(m, sd_value_nil()) == -1);
	sd_value_free(a);
	sd_value_free(m);
	sd_value_free(NULL);
}

/* sd_map_set replaces in place (position kept), sd_map_del shifts, new keys append. */
TEST(map_order)
{
	sd_value *m = sd_value_map();
	sd_map_set_int(m, "a", 1);
	sd_map_set_int(m, "b", 2);
	sd_map_set_int(m, "c", 3);
	CHECK_OK(sd_map_set_str(m, "b", "two"));
	CHECK(m->u.m.n == 3 && strcmp(m->u.m.k[1], "b") == 0 && m->u.m.v[1]->type == SD_V_STR);
	CHECK(strcmp(sd_map_str(m, "b"), "two") == 0);
	CHECK(sd_map_del(m, "b") == 1 && sd_map_del(m, "b") == 0);
	CHECK(m->u.m.n == 2 && strcmp(m->u.m.k[0], "a") == 0 && strcmp(m->u.m.k[1], "c") == 0);
	CHECK_OK(sd_map_set_int(m, "b", 4));
	CHECK(m->u.m.n == 3 && strcmp(m->u.m.k[2], "b") == 0);
	for (int i = 0; i < 100; i++) {
		char k[16];
		snprintf(k, sizeof k, "k%d", i);
		CHECK_OK(sd_map_set_int(m, k, i));
	}
	int64_t v;
	CHECK(m->u.m.n == 103 && sd_map_get_int(m, "k77", &v) == 0 && v == 77);
	/* dup is deep: changing the copy leaves the original */
	sd_value *c = sd_value_dup(m);
	sd_map_set_int(c, "a", 100);
	CHECK(sd_map_get_int(m, "a", &v) == 0 && v == 1);
	/* NULL values from a failed constructor are refused without a leak */
	CHECK(sd_map_set(m, "x", NULL) == -1 && sd_map_get(m, "x") == NULL);
	CHECK(sd_map_set_tensor(m, "x", sd_tensor_newv(SD_DTYPE_F32, 1, (int64_t)-1)) == -1);
	sd_value_free(c);
	sd_value_free(m);
}

/* Writing: a frame must be a map, and a failed write says why. */
TEST(write_errors)
{
	sd_value *a = sd_value_array();
	char *b;
	size_t n;
	CHECK(sd_frame_pack(a, &b, &n) == -1 && b == NULL && strstr(sd_errmsg(), "must be a map"));
	sd_value_free(a);
	FILE *f = fopen("/dev/full", "w");
	if (!f) SKIP("no /dev/full");
	sd_value *m = sd_value_map();
	sd_map_set_str(m, "a", "b");
	CHECK(sd_frame_write(f, m) == -1 && strstr(sd_errmsg(), "write error: No space left on device"));
	printf("  %s\n", sd_errmsg());
	fclose(f);
	sd_value_free(m);
}

int main(void)
{
	RUN(every_dtype);
	RUN(many_frames);
	RUN(passthrough_identical);
	RUN(foreign_writer);
	RUN(scalar_and_empty);
	RUN(large_frame_pipe);
	RUN(no_read_ahead);
	RUN(empty_input);
	RUN(truncated);
	RUN(garbage);
	RUN(bad_tensors);
	RUN(nesting);
	RUN(frame_cap);
	RUN(big_uint);
	RUN(getters);
	RUN(map_order);
	RUN(write_errors);
	return test_summary();
}
