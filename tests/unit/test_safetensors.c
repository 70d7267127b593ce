/*
 * test_safetensors.c - tests of lib/io/safetensors.c and lib/io/file.c: every golden and model
 * .safetensors fixture (written by Hugging Face's safetensors via diffusers/transformers/peft) is read
 * and checked against facts from ../shared/fixtures/README.md; the writer round-trips every dtype
 * byte-exactly with a header that the reference reader accepts (8-aligned, contiguous offsets,
 * __metadata__ first); writes are atomic; and malformed files are refused with a message that says why.
 */
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <jansson.h>
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

static uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
	return h;
}

static int has_suffix(const char *s, const char *suf)
{
	size_t a = strlen(s), b = strlen(suf);
	return a >= b && strcmp(s + a - b, suf) == 0;
}

/*
 * Open one file and check what must hold for every tensor: names found again by sd_st_find, nbytes ==
 * numel * dtype size, data aligned for its dtype.  Prints one line with a checksum of all the data.
 * Returns the open file (the caller closes it) or NULL after counting a failure.
 */
static sd_st *check_file(const char *path, int want_meta)
{
	sd_st *f = sd_st_open(path);
	if (!f) {
		printf("  %s\n", sd_errmsg());
		test_failed_++;
		return NULL;
	}
	CHECK(strcmp(sd_st_path(f), path) == 0);
	CHECK(sd_st_count(f) > 0);
	uint64_t h = 0xcbf29ce484222325ull;
	size_t total = 0;
	for (int i = 0; i < sd_st_count(f); i++) {
		const char *name = sd_st_name(f, i);
		const sd_tensor *t = sd_st_tensor(f, i);
		CHECK(name && t);
		if (!name || !t) continue;
		CHECK(sd_st_find(f, name) == i);
		int64_t numel = -1;
		CHECK(sd_shape_numel(t->ndim, t->shape, &numel) == 0);
		CHECK(sd_tensor_numel(t) == numel);
		CHECK(sd_tensor_nbytes(t) == (size_t)numel * sd_dtype_size(t->dtype));
		CHECK(t->owns == 0 && t->device == SD_DEVICE_CPU);
		CHECK(numel == 0 || (uintptr_t)t->data % sd_dtype_size(t->dtype) == 0);
		h = fnv1a(h, name, strlen(name) + 1);
		h = fnv1a(h, t->data, sd_tensor_nbytes(t));
		total += sd_tensor_nbytes(t);
	}
	CHECK(sd_st_tensor(f, sd_st_count(f)) == NULL && sd_st_name(f, -1) == NULL);
	CHECK(sd_st_find(f, "no such tensor, surely") == -1);
	for (int i = 0; i < sd_st_meta_count(f); i++)
		CHECK(strcmp(sd_st_meta(f, sd_st_meta_key(f, i)), sd_st_meta_val(f, i)) == 0);
	if (want_meta) {
		CHECK(sd_st_meta(f, "desc") != NULL);
		CHECK(sd_st_meta(f, "call") != NULL);
	}
	printf("  %s: %d tensors, %zu data bytes, %d metadata keys, fnv1a %016llx\n", path, sd_st_count(f),
	       total, sd_st_meta_count(f), (unsigned long long)h);
	return f;
}

/* A tensor of f by name with the given dtype and shape (ndim values), or NULL after a failed CHECK. */
static const sd_tensor *expect(const sd_st *f, const char *name, enum sd_dtype dt, int ndim, ...)
{
	int i = sd_st_find(f, name);
	if (i < 0) {
		printf("  %s: no tensor '%s'\n", sd_st_path(f), name);
		test_failed_++;
		return NULL;
	}
	const sd_tensor *t = sd_st_tensor(f, i);
	va_list ap;
	va_start(ap, ndim);
	int ok = t->dtype == dt && t->ndim == ndim;
	for (int d = 0; d < ndim; d++) {
		int64_t v = va_arg(ap, int64_t);
		if (ok && t->shape[d] != v) ok = 0;
	}
	va_end(ap);
	if (!ok) {
		char s[128];
		printf("  %s: '%s' is %s %s\n", sd_st_path(f), name, sd_dtype_name(t->dtype),
		       sd_shape_str(t->ndim, t->shape, s, sizeof s));
		test_failed_++;
		return NULL;
	}
	return t;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every *.safetensors under a folder (recursively), sorted: collected by nftw into these globals. */
static char **found;
static int nfound;

static int collect(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	if (type == FTW_F && has_suffix(path, ".safetensors")) {
		char **n = realloc(found, (nfound + 1) * sizeof *found);
		if (!n) return -1;
		found = n;
		found[nfound++] = strdup(path);
	}
	return 0;
}

static void free_found(void)
{
	for (int i = 0; i < nfound; i++) free(found[i]);
	free(found);
	found = NULL;
	nfound = 0;
}

static int rm_entry(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	return remove(path);
}

/* A fresh temporary folder (removed with rm_tree). */
static char *tmp_dir(void)
{
	const char *t = getenv("TMPDIR");
	static char buf[4096];
	snprintf(buf, sizeof buf, "%s/sdst.XXXXXX", t && *t ? t : "/tmp");
	return mkdtemp(buf) ? strdup(buf) : NULL;
}

static void rm_tree(char *dir)
{
	if (dir) nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
	free(dir);
}

/* Number of entries in a folder other than . and .. (first name into first when not NULL). */
static int count_entries(const char *dir, char *first, size_t n)
{
	DIR *d = opendir(dir);
	int c = 0;
	if (!d) return -1;
	for (struct dirent *e; (e = readdir(d));) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
		if (c++ == 0 && first) snprintf(first, n, "%s", e->d_name);
	}
	closedir(d);
	return c;
}

static char *join(const char *dir, const char *name)
{
	char *s = malloc(strlen(dir) + strlen(name) + 2);
	if (s) sprintf(s, "%s/%s", dir, name);
	return s;
}

/* ==== reading the fixtures ==== */

TEST(golden_fixtures)
{
	char dir[4096];
	snprintf(dir, sizeof dir, "%s/golden", fixtures());
	DIR *d = opendir(dir);
	if (!d) {
		printf("  %s: %s\n", dir, strerror(errno));
		test_failed_++;
		return;
	}
	for (struct dirent *e; (e = readdir(d));)
		if (has_suffix(e->d_name, ".safetensors")) {
			char **n = realloc(found, (nfound + 1) * sizeof *found);
			if (!n) break;
			found = n;
			found[nfound++] = join(dir, e->d_name);
		}
	closedir(d);
	qsort(found, nfound, sizeof *found, cmp_str);
	CHECK(nfound >= 2);
	for (int i = 0; i < nfound; i++) {
		sd_st *f = check_file(found[i], 1);
		if (!f) continue;
		const sd_tensor *t;
		if (has_suffix(found[i], "/tokenizer.safetensors")) {
			if ((t = expect(f, "input_ids", SD_DTYPE_I64, 2, (int64_t)20, (int64_t)77))) {
				const int64_t *ids = t->data;
				CHECK(ids[0] == 49406);   /* <|startoftext|> */
				CHECK(ids[76] == 49407);  /* padded with <|endoftext|> */
			}
			expect(f, "full_offsets", SD_DTYPE_I64, 1, (int64_t)21);
			expect(f, "full_ids", SD_DTYPE_I64, 1, (int64_t)638);
		}
		if (has_suffix(found[i], "/rng.safetensors")) {
			if ((t = expect(f, "seed0.then_randn_3_f64", SD_DTYPE_F64, 1, (int64_t)3))) {
				const double *v = t->data;
				CHECK(isfinite(v[0]) && fabs(v[0]) < 10);
			}
			expect(f, "seed0.randn_1x4x8x8", SD_DTYPE_F32, 4, (int64_t)1, (int64_t)4, (int64_t)8,
			       (int64_t)8);
			expect(f, "seed0.then_randint_0_1000_x4", SD_DTYPE_I64, 1, (int64_t)4);
			/* header order is the file's order (alphabetical for files written by HF) */
			CHECK(sd_st_find(f, "seed0.fresh_randn_2x4x16x16") < sd_st_find(f, "seed0.randn_1x4x8x8"));
		}
		sd_st_close(f);
	}
	free_found();
}

TEST(shared_fixtures)
{
	const char *shared = getenv("SHARED");
	if (!shared || !*shared) shared = "../shared/fixtures";
	struct stat st;
	if (stat(shared, &st) < 0 || !S_ISDIR(st.st_mode))
		SKIP("no shared fixtures folder at %s", shared);
	if (nftw(shared, collect, 16, FTW_PHYS) != 0) {
		printf("  %s: cannot walk the folder\n", shared);
		test_failed_++;
	}
	qsort(found, nfound, sizeof *found, cmp_str);
	CHECK(nfound >= 10);
	int files = 0, tensors = 0, f16 = 0;
	for (int i = 0; i < nfound; i++) {
		int golden = strstr(found[i], "/golden/") != NULL;
		sd_st *f = check_file(found[i], golden);
		if (!f) continue;
		files++;
		tensors += sd_st_count(f);
		for (int k = 0; k < sd_st_count(f); k++) f16 += sd_st_tensor(f, k)->dtype == SD_DTYPE_F16;
		const sd_tensor *t;
		if (has_suffix(found[i], "/tiny/unet/diffusion_pytorch_model.safetensors"))
			expect(f, "conv_in.weight", SD_DTYPE_F32, 4, (int64_t)32, (int64_t)4, (int64_t)3,
			       (int64_t)3);
		if (has_suffix(found[i], "/sd15-shape-small.ldm.fp16.safetensors")) {
			t = expect(f, "cond_stage_model.transformer.text_model.embeddings.position_ids",
			           SD_DTYPE_I64, 2, (int64_t)1, (int64_t)77);
			if (t) {
				const int64_t *p = t->data;
				int ok = 1;
				for (int k = 0; k < 77; k++) ok &= p[k] == k;
				CHECK(ok);
			}
			expect(f, "alphas_cumprod", SD_DTYPE_F32, 1, (int64_t)1000);
			CHECK(sd_st_count(f) == 977);
		}
		if (has_suffix(found[i], "/tiny-lora/kohya/lora.safetensors")) {
			t = expect(f, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha", SD_DTYPE_F32, 0);
			if (t) CHECK(*(const float *)t->data == 16.0f);
		}
		sd_st_close(f);
	}
	printf("  %d files, %d tensors (%d float16)\n", files, tensors, f16);
	CHECK(files == nfound);
	CHECK(f16 > 0);
	free_found();
}

/* ==== writing ==== */

/* Fill a tensor's bytes with a pattern that depends on its index. */
static sd_tensor *patterned(enum sd_dtype dt, int ndim, const int64_t *shape, int seed)
{
	sd_tensor *t = sd_tensor_new(dt, ndim, shape);
	if (!t) return NULL;
	unsigned char *b = t->data;
	for (size_t k = 0; k < sd_tensor_nbytes(t); k++) b[k] = (unsigned char)(k * 31 + seed * 7 + 1);
	return t;
}

/*
 * Check a written file's raw bytes the way the reference (Rust) reader does: header length a multiple
 * of 8, padding spaces, "__metadata__" first when present, keys in the given order, offsets back to
 * back from 0 to the end of the file, each start a multiple of the element size.
 */
static void check_raw(const char *path, int n, const char *const *names, int with_meta)
{
	size_t len = 0;
	char *raw = sd_read_file(path, 0, &len);
	CHECK(raw != NULL);
	if (!raw) return;
	uint64_t hlen = 0;
	for (int i = 7; i >= 0; i--) hlen = hlen << 8 | (unsigned char)raw[i];
	CHECK(hlen % 8 == 0 && 8 + hlen <= len);
	if (hlen % 8 || 8 + hlen > len) goto out;
	CHECK(raw[8] == '{');
	size_t last = 8 + hlen;
	while (last > 8 && raw[last - 1] == ' ') last--;
	CHECK(raw[last - 1] == '}' && 8 + hlen - last < 8);
	if (with_meta) CHECK(strncmp(raw + 8, "{\"__metadata__\":{", 17) == 0);
	else CHECK(strstr(raw + 8, "__metadata__") == NULL || strstr(raw + 8, "__metadata__") > raw + last);

	json_error_t err;
	json_t *root = json_loadb(raw + 8, hlen, 0, &err);
	CHECK(root && json_is_object(root));
	if (!root) goto out;
	void *it = json_object_iter(root);
	if (with_meta) {
		CHECK(it && strcmp(json_object_iter_key(it), "__metadata__") == 0);
		it = json_object_iter_next(root, it);
	}
	uint64_t data = len - 8 - hlen;
	/* offsets: mark the covered bytes' starts and ends; back to back means sorted begin/end chain */
	int64_t *b = calloc(n + 1, sizeof *b), *e = calloc(n + 1, sizeof *e);
	for (int i = 0; i < n && it; i++, it = json_object_iter_next(root, it)) {
		CHECK(strcmp(json_object_iter_key(it), names[i]) == 0);
		json_t *v = json_object_iter_value(it);
		json_t *o = json_object_get(v, "data_offsets");
		b[i] = json_integer_value(json_array_get(o, 0));
		e[i] = json_integer_value(json_array_get(o, 1));
		const char *dt = json_string_value(json_object_get(v, "dtype"));
		int es = !dt ? 0 : !strcmp(dt, "F64") || !strcmp(dt, "I64") ? 8
		       : !strcmp(dt, "F32") || !strcmp(dt, "I32") ? 4
		       : !strcmp(dt, "F16") || !strcmp(dt, "BF16") ? 2 : 1;
		CHECK(es > 0 && b[i] % es == 0);
	}
	CHECK(it == NULL);
	/* chain: starting at 0, some tensor begins where the previous ended (zero-size ones anywhere) */
	int64_t pos = 0;
	for (int step = 0; step < n; step++)
		for (int i = 0; i < n; i++)
			if (b[i] == pos && e[i] > b[i] && e[i] != -1) {
				pos = e[i];
				e[i] = -1;
				break;
			}
	CHECK((uint64_t)pos == data);
	free(b);
	free(e);
	json_decref(root);
out:
	free(raw);
}

TEST(roundtrip_all_dtypes)
{
	char *dir = tmp_dir();
	CHECK(dir != NULL);
	if (!dir) return;
	char *path = join(dir, "all.safetensors");
	/* u8 first and odd sizes, so that the writer's layout by element size matters */
	struct { const char *name; enum sd_dtype dt; int ndim; int64_t shape[4]; } spec[] = {
		{ "u8", SD_DTYPE_U8, 1, { 3 } },
		{ "f32", SD_DTYPE_F32, 2, { 2, 3 } },
		{ "f16", SD_DTYPE_F16, 1, { 5 } },
		{ "bf16", SD_DTYPE_BF16, 2, { 1, 3 } },
		{ "i32", SD_DTYPE_I32, 1, { 3 } },
		{ "i64", SD_DTYPE_I64, 2, { 2, 2 } },
		{ "f64", SD_DTYPE_F64, 1, { 3 } },
		{ "scalar", SD_DTYPE_F32, 0, { 0 } },
		{ "empty", SD_DTYPE_F16, 2, { 0, 3 } },
		{ "unet.down_blocks.0.attentions.0.proj_in.weight \xc3\xa9", SD_DTYPE_BF16, 4, { 1, 1, 3, 1 } },
		{ "u8.tail", SD_DTYPE_U8, 1, { 7 } },
	};
	enum { N = sizeof spec / sizeof spec[0] };
	const char *names[N];
	sd_tensor *ts[N];
	for (int i = 0; i < N; i++) {
		names[i] = spec[i].name;
		ts[i] = patterned(spec[i].dt, spec[i].ndim, spec[i].shape, i);
		CHECK(ts[i] != NULL);
		if (!ts[i]) return;
	}
	const char *meta[] = { "format", "pt", "desc", "a \"quoted\" \xe2\x9c\x93 value\nwith a newline",
	                       "empty", "", NULL };
	CHECK_OK(sd_st_write(path, N, names, (const sd_tensor *const *)ts, meta));
	sd_st *f = sd_st_open(path);
	CHECK(f != NULL);
	if (f) {
		CHECK(sd_st_count(f) == N);
		for (int i = 0; i < N && i < sd_st_count(f); i++) {
			const sd_tensor *t = sd_st_tensor(f, i);
			CHECK(strcmp(sd_st_name(f, i), names[i]) == 0);
			CHECK(sd_st_find(f, names[i]) == i);
			CHECK(t->dtype == ts[i]->dtype && sd_tensor_same_shape(t, ts[i]));
			CHECK(sd_tensor_nbytes(t) == sd_tensor_nbytes(ts[i]));
			CHECK(memcmp(t->data, ts[i]->data, sd_tensor_nbytes(t)) == 0);
			CHECK(sd_tensor_nbytes(t) == 0 || (uintptr_t)t->data % sd_dtype_size(t->dtype) == 0);
		}
		CHECK(sd_st_meta_count(f) == 3);
		CHECK(strcmp(sd_st_meta_key(f, 0), "format") == 0 && strcmp(sd_st_meta_val(f, 0), "pt") == 0);
		CHECK(strcmp(sd_st_meta_key(f, 1), "desc") == 0 && strcmp(sd_st_meta_val(f, 1), meta[3]) == 0);
		CHECK(strcmp(sd_st_meta(f, "empty"), "") == 0);
		CHECK(sd_st_meta(f, "absent") == NULL && sd_st_meta_key(f, 3) == NULL);
		sd_st_close(f);
	}
	check_raw(path, N, names, 1);

	/* no metadata at all */
	CHECK_OK(sd_st_write(path, 2, names, (const sd_tensor *const *)ts, NULL));
	f = sd_st_open(path);
	CHECK(f && sd_st_count(f) == 2 && sd_st_meta_count(f) == 0);
	sd_st_close(f);
	check_raw(path, 2, names, 0);

	/* no tensors: a valid file with header "{}" padded */
	const char *m1[] = { "k", "v", NULL };
	CHECK_OK(sd_st_write(path, 0, NULL, NULL, m1));
	f = sd_st_open(path);
	CHECK(f && sd_st_count(f) == 0 && sd_st_meta_count(f) == 1);
	sd_st_close(f);

	/* bad arguments leave the file as it was */
	const char *dup[] = { "a", "a" };
	CHECK(sd_st_write(path, 2, dup, (const sd_tensor *const *)ts, NULL) == -1);
	CHECK(strstr(sd_errmsg(), "given twice") != NULL);
	const char *res[] = { "__metadata__" };
	CHECK(sd_st_write(path, 1, res, (const sd_tensor *const *)ts, NULL) == -1);
	CHECK(strstr(sd_errmsg(), "reserved") != NULL);
	const char *odd[] = { "key", NULL, NULL };
	CHECK(sd_st_write(path, 1, names, (const sd_tensor *const *)ts, odd) == -1);
	CHECK(strstr(sd_errmsg(), "no value") != NULL);
	const char *bad_utf8[] = { "\xff\xfe" };
	CHECK(sd_st_write(path, 1, bad_utf8, (const sd_tensor *const *)ts, NULL) == -1);
	CHECK(strstr(sd_errmsg(), "UTF-8") != NULL);
	const sd_tensor *nul[] = { NULL };
	CHECK(sd_st_write(path, 1, names, nul, NULL) == -1);
	f = sd_st_open(path);
	CHECK(f && sd_st_count(f) == 0 && sd_st_meta_count(f) == 1);
	sd_st_close(f);
	CHECK(count_entries(dir, NULL, 0) == 1);

	for (int i = 0; i < N; i++) sd_tensor_free(ts[i]);
	free(path);
	rm_tree(dir);
}

TEST(atomic_write)
{
	char *dir = tmp_dir();
	CHECK(dir != NULL);
	if (!dir) return;
	float a[3] = { 1, 2, 3 }, b[2] = { -1, 0.5f };
	int64_t sa[] = { 3 }, sb[] = { 2 };
	sd_tensor *ta = sd_tensor_wrap(SD_DTYPE_F32, 1, sa, a), *tb = sd_tensor_wrap(SD_DTYPE_F32, 1, sb, b);
	const char *na[] = { "a" }, *nb[] = { "b" };

	/* into a folder that does not exist: fails, names the folder, creates nothing */
	char *missing = join(dir, "missing/x.safetensors");
	CHECK(sd_st_write(missing, 1, na, (const sd_tensor *const *)&ta, NULL) == -1);
	CHECK(strstr(sd_errmsg(), "missing") && strstr(sd_errmsg(), "No such file"));
	CHECK(sd_write_file_atomic(missing, "x", 1) == -1);
	CHECK(strstr(sd_errmsg(), "temporary") != NULL);
	CHECK(count_entries(dir, NULL, 0) == 0);

	/* write, then write over it: the second version replaces the first, and keeps its mode */
	char *path = join(dir, "x.safetensors");
	CHECK_OK(sd_st_write(path, 1, na, (const sd_tensor *const *)&ta, NULL));
	CHECK(chmod(path, 0640) == 0);
	CHECK_OK(sd_st_write(path, 1, nb, (const sd_tensor *const *)&tb, NULL));
	sd_st *f = sd_st_open(path);
	CHECK(f && sd_st_count(f) == 1 && strcmp(sd_st_name(f, 0), "b") == 0);
	if (f) CHECK(memcmp(sd_st_tensor(f, 0)->data, b, sizeof b) == 0);
	sd_st_close(f);
	struct stat st;
	CHECK(stat(path, &st) == 0 && (st.st_mode & 07777) == 0640);
	char first[256] = "";
	CHECK(count_entries(dir, first, sizeof first) == 1 && strcmp(first, "x.safetensors") == 0);

	/* over a folder: rename fails, the temporary file is removed */
	char *sub = join(dir, "sub");
	CHECK(mkdir(sub, 0755) == 0);
	CHECK(sd_write_file_atomic(sub, "abc", 3) == -1);
	CHECK(strstr(sd_errmsg(), "rename") != NULL);
	CHECK(count_entries(dir, NULL, 0) == 2);

	/* sd_write_file_atomic + sd_read_file: bytes with an embedded NUL, the terminator, the cap */
	char *txt = join(dir, "t.bin");
	const char data[] = "hello\0world";
	CHECK_OK(sd_write_file_atomic(txt, data, sizeof data - 1));
	size_t len = 99;
	char *got = sd_read_file(txt, 0, &len);
	CHECK(got && len == sizeof data - 1 && memcmp(got, data, len) == 0 && got[len] == 0);
	free(got);
	got = sd_read_file(txt, sizeof data - 1, &len);
	CHECK(got && len == sizeof data - 1);
	free(got);
	CHECK(sd_read_file(txt, 4, &len) == NULL && strstr(sd_errmsg(), "too large"));
	CHECK(sd_read_file(sub, 0, &len) == NULL && strstr(sd_errmsg(), "folder"));
	CHECK(sd_read_file(missing, 0, &len) == NULL && strstr(sd_errmsg(), "No such file"));
	CHECK_OK(sd_write_file_atomic(txt, "", 0));
	got = sd_read_file(txt, 0, &len);
	CHECK(got && len == 0 && got[0] == 0);
	free(got);
	/* a file whose size stat does not know */
	got = sd_read_file("/proc/self/status", 0, &len);
	CHECK(got && len > 0 && strlen(got) == len && strstr(got, "Name:"));
	free(got);
	CHECK(count_entries(dir, NULL, 0) == 3); /* x.safetensors, sub, t.bin: no temporaries */

	sd_tensor_free(ta);
	sd_tensor_free(tb);
	free(missing);
	free(path);
	free(sub);
	free(txt);
	rm_tree(dir);
}

/* ==== malformed and unusual files ==== */

/* Write `8-byte length (hlen, or the header's own length when hlen < 0) + header + ndata bytes`. */
static void make_st(const char *path, long long hlen, const char *header, size_t ndata)
{
	size_t h = strlen(header);
	uint64_t n = hlen < 0 ? h : (uint64_t)hlen;
	unsigned char len[8];
	for (int i = 0; i < 8; i++) len[i] = (unsigned char)(n >> (8 * i));
	FILE *fp = fopen(path, "wb");
	if (!fp) return;
	fwrite(len, 1, 8, fp);
	fwrite(header, 1, h, fp);
	for (size_t i = 0; i < ndata; i++) fputc((int)(i * 13 + 5) & 0xff, fp);
	fclose(fp);
}

TEST(hostile_files)
{
	char *dir = tmp_dir();
	CHECK(dir != NULL);
	if (!dir) return;
	char *path = join(dir, "bad.safetensors");
	static const struct {
		const char *what;
		long long hlen;    /* -1: the header's length */
		const char *header;
		size_t ndata;
		const char *want;  /* a substring of the message */
	} cases[] = {
		{ "not JSON", -1, "{not json", 0, "not valid JSON" },
		{ "trailing garbage", -1, "{} x", 0, "not valid JSON" },
		{ "an array", -1, "[1, 2]", 0, "not a JSON object" },
		{ "header length past the end", 1000, "{}", 0, "larger than the rest of the file" },
		{ "header length > 100 MB", 200000000, "{}", 0, "100 MB" },
		{ "header length 2^64-1", -2, "{}", 0, "100 MB" },
		{ "entry not an object", -1, "{\"w\": 5}", 0, "'w': entry is not a JSON object" },
		{ "missing dtype", -1, "{\"w\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "'w': missing 'dtype'" },
		{ "missing shape", -1, "{\"w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4, "missing 'shape'" },
		{ "missing offsets", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, "missing 'data_offsets'" },
		{ "dtype a number", -1, "{\"w\": {\"dtype\": 1, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "'dtype' is not a string" },
		{ "shape a string", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": \"1\", \"data_offsets\": [0, 4]}}", 4, "'shape' is not an array" },
		{ "negative dim", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4, "negative" },
		{ "fractional dim", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}", 4, "not an integer" },
		{ "dim a string", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [\"1\"], \"data_offsets\": [0, 4]}}", 4, "not an integer" },
		{ "9 dims", -1, "{\"w\": {\"dtype\": \"U8\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 1]}}", 1, "9 dimensions" },
		{ "shape overflow", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [4611686018427387904, 4], \"data_offsets\": [0, 16]}}", 16, "overflow" },
		{ "huge dim", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [99999999999999999999], \"data_offsets\": [0, 4]}}", 4, "not valid JSON" },
		{ "offsets one number", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}", 4, "not [begin, end]" },
		{ "offsets an object", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": {}}}", 4, "not [begin, end]" },
		{ "begin > end", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 0]}}", 4, "begin <= end" },
		{ "negative begin", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", 4, "begin <= end" },
		{ "offsets past end", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 4, "beyond the end" },
		{ "wrong byte length", -1, "{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 4]}}", 8, "hold 4 bytes, but F32 [2] needs 8" },
		{ "unknown dtype F8", -1, "{\"w\": {\"dtype\": \"F8_E4M3\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 1, "'w': unsupported dtype 'F8_E4M3'" },
		{ "unknown dtype I16", -1, "{\"w\": {\"dtype\": \"I16\", \"shape\": [1], \"data_offsets\": [0, 2]}}", 2, "unsupported dtype 'I16'" },
		{ "metadata number", -1, "{\"__metadata__\": {\"a\": \"x\", \"b\": 5}}", 0, "value of 'b' is not a string" },
		{ "metadata array", -1, "{\"__metadata__\": [\"a\"]}", 0, "'__metadata__' is not a JSON object" },
		{ "duplicate name", -1, "{\"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}, \"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 1, "duplicate" },
		{ "NUL in a name", -1, "{\"w\\u0000x\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]}}", 1, "not valid JSON" },
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		make_st(path, cases[i].hlen == -2 ? -1 : cases[i].hlen, cases[i].header, cases[i].ndata);
		if (cases[i].hlen == -2) { /* patch the length to 2^64-1 */
			FILE *fp = fopen(path, "r+b");
			if (fp) { fwrite("\xff\xff\xff\xff\xff\xff\xff\xff", 1, 8, fp); fclose(fp); }
		}
		sd_st *f = sd_st_open(path);
		int ok = f == NULL && strstr(sd_errmsg(), cases[i].want) && strstr(sd_errmsg(), path);
		if (!ok) {
			printf("  %s: got %s, message \"%s\", want \"%s\"\n", cases[i].what, f ? "a file" : "NULL",
			       f ? "" : sd_errmsg(), cases[i].want);
			test_failed_++;
		}
		sd_st_close(f);
	}

	/* files too short to hold the length, and a folder */
	static const struct { size_t n; const char *want; } shorts[] = {
		{ 0, "empty file" }, { 1, "too short" }, { 7, "too short" },
	};
	for (size_t i = 0; i < sizeof shorts / sizeof shorts[0]; i++) {
		FILE *fp = fopen(path, "wb");
		if (fp) { fwrite("\x02\0\0\0\0\0\0\0", 1, shorts[i].n, fp); fclose(fp); }
		sd_st *f = sd_st_open(path);
		CHECK(f == NULL && strstr(sd_errmsg(), shorts[i].want) && strstr(sd_errmsg(), path));
		sd_st_close(f);
	}
	CHECK(sd_st_open(dir) == NULL && strstr(sd_errmsg(), "folder"));
	char *none = join(dir, "none.safetensors");
	CHECK(sd_st_open(none) == NULL && strstr(sd_errmsg(), "No such file") && strstr(sd_errmsg(), none));
	free(none);
	sd_st_close(NULL);
	free(path);
	rm_tree(dir);
}

/* Legal but unusual files: zero-size tensors, BOOL, a header length that misaligns the data, spaces. */
TEST(unusual_but_valid)
{
	char *dir = tmp_dir();
	CHECK(dir != NULL);
	if (!dir) return;
	char *path = join(dir, "odd.safetensors");

	/* header of 121 bytes: the F32 tensor at data offset 1 sits at file offset 130, not 4-aligned */
	char h[256];
	snprintf(h, sizeof h, "{\"b\":{\"dtype\":\"BOOL\",\"shape\":[1],\"data_offsets\":[0,1]},"
	                      "\"f\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1,9]}");
	size_t hl = strlen(h);
	while (hl < 120) h[hl++] = ' ';
	h[hl++] = '}';
	h[hl] = 0;
	CHECK(hl == 121);
	unsigned char len[8] = { (unsigned char)hl };
	float fv[2] = { 1.5f, -2.25f };
	FILE *fp = fopen(path, "wb");
	if (fp) {
		fwrite(len, 1, 8, fp);
		fwrite(h, 1, hl, fp);
		fputc(1, fp);
		fwrite(fv, sizeof fv, 1, fp);
		fclose(fp);
	}
	sd_st *f = sd_st_open(path);
	CHECK(f != NULL);
	if (f) {
		CHECK(sd_st_count(f) == 2);
		const sd_tensor *b = sd_st_tensor(f, 0), *t = sd_st_tensor(f, 1);
		CHECK(b->dtype == SD_DTYPE_U8 && *(const unsigned char *)b->data == 1);
		CHECK(t->dtype == SD_DTYPE_F32 && (uintptr_t)t->data % 4 == 0);
		CHECK(memcmp(t->data, fv, sizeof fv) == 0);
		sd_st_close(f);
	} else {
		printf("  %s\n", sd_errmsg());
	}

	/* zero-size tensors, one at the very end of the data; extra entry keys are ignored */
	make_st(path, -1, "{\"z\": {\"dtype\": \"F32\", \"shape\": [0, 4], \"data_offsets\": [4, 4]},"
	                  " \"x\": {\"dtype\": \"I32\", \"shape\": [1], \"data_offsets\": [0, 4], \"extra\": 1},"
	                  " \"s\": {\"dtype\": \"F64\", \"shape\": [], \"data_offsets\": [4, 12]},"
	                  " \"__metadata__\": {}}        ", 12);
	f = sd_st_open(path);
	CHECK(f != NULL);
	if (f) {
		CHECK(sd_st_count(f) == 3 && sd_st_meta_count(f) == 0);
		CHECK(strcmp(sd_st_name(f, 0), "z") == 0 && strcmp(sd_st_name(f, 2), "s") == 0);
		CHECK(sd_tensor_nbytes(sd_st_tensor(f, 0)) == 0 && sd_st_tensor(f, 2)->ndim == 0);
		CHECK(sd_st_find(f, "x") == 1 && sd_st_find(f, "s") == 2 && sd_st_find(f, "z") == 0);
		sd_st_close(f);
	} else {
		printf("  %s\n", sd_errmsg());
	}

	/* an empty header object and no data */
	make_st(path, -1, "{}", 0);
	f = sd_st_open(path);
	CHECK(f && sd_st_count(f) == 0);
	sd_st_close(f);
	free(path);
	rm_tree(dir);
}

int main(void)
{
	RUN(golden_fixtures);
	RUN(shared_fixtures);
	RUN(roundtrip_all_dtypes);
	RUN(atomic_write);
	RUN(hostile_files);
	RUN(unusual_but_valid);
	return test_summary();
}
