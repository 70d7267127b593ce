/*
 * test_hostile.c - the bad-input table of issue 9 that the per-parser tests do not already hold:
 * resource limits (each hostile input refused with a clear message BEFORE a large allocation, checked
 * with getrusage's peak RSS) and more unpickler attacks (a table of dangerous globals, stride-0 and
 * shared-storage amplification, symlink entries, zip sizes that lie).  test_ckpt.c has os.system,
 * builtins.eval, subprocess.Popen, REDUCE/BUILD tricks, deep MARK nesting, huge memo indices, short
 * storages and ../ entries; test_stream.c and test_safetensors.c have their formats' malformed headers.
 */
#include <stdarg.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include "sd.h"
#include "test.h"

static char tmpdir[4096];

static const char *tmp_path(const char *name)
{
	static char p[2][4200];
	static int k;
	char *s = p[k++ & 1];
	snprintf(s, sizeof p[0], "%s/%s", tmpdir, name);
	return s;
}

/* Peak RSS of this process so far, in MiB. */
static long peak_mb(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_maxrss / 1024;
}

/* The peak must not have grown by more than 64 MiB while `what` ran (the peak is a high-water mark,
 * so a large allocation anywhere in between shows). */
#define RSS_LIMIT_MB 64
static void small_rss(const char *what, long before)
{
	long grew = peak_mb() - before;
	if (grew > RSS_LIMIT_MB) {
		printf("  %s: peak RSS grew by %ld MiB (limit %d)\n", what, grew, RSS_LIMIT_MB);
		test_failed_++;
	}
}

/* Expect a failure whose message holds want. */
static void refused_msg(const char *what, int failed, const char *want)
{
	int ok = failed && strstr(sd_errmsg(), want);
	printf("  %-36s %s\n", what, failed ? sd_errmsg() : "(accepted!)");
	if (!ok) {
		printf("  %s: want a failure with \"%s\"\n", what, want);
		test_failed_++;
	}
}

/* ==== byte buffers, pickles, stored zips ==== */

struct buf {
	unsigned char *p;
	size_t n, cap;
};

static void put(struct buf *b, const void *s, size_t n)
{
	if (b->n + n > b->cap) {
		b->cap = 2 * (b->n + n) + 64;
		if (!(b->p = realloc(b->p, b->cap))) abort();
	}
	if (n) memcpy(b->p + b->n, s, n);
	b->n += n;
}
static void put1(struct buf *b, int c) { unsigned char x = (unsigned char)c; put(b, &x, 1); }
static void put_le(struct buf *b, uint64_t v, int n) { for (int i = 0; i < n; i++) put1(b, (int)(v >> 8 * i)); }
static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

static void pk_str(struct buf *b, const char *s) { put1(b, 'X'); put_le(b, strlen(s), 4); puts_(b, s); }
static void pk_global(struct buf *b, const char *mod, const char *name)
{
	put1(b, 'c'); puts_(b, mod); put1(b, '\n'); puts_(b, name); put1(b, '\n');
}
static void pk_int(struct buf *b, int64_t v) { put1(b, 0x8a); put1(b, 8); put_le(b, (uint64_t)v, 8); }

/* _rebuild_tensor_v2(('storage', FloatStorage, key, 'cpu', numel), 0, (size,), (stride,), False, {}) */
static void pk_tensor1(struct buf *b, const char *key, int64_t numel, int64_t size, int64_t stride)
{
	pk_global(b, "torch._utils", "_rebuild_tensor_v2");
	put1(b, '('); put1(b, '(');
	pk_str(b, "storage"); pk_global(b, "torch", "FloatStorage"); pk_str(b, key); pk_str(b, "cpu");
	pk_int(b, numel);
	put1(b, 't'); put1(b, 'Q');
	pk_int(b, 0);
	put1(b, '('); pk_int(b, size); put1(b, 't');
	put1(b, '('); pk_int(b, stride); put1(b, 't');
	put1(b, 0x89); put1(b, '}'); put1(b, 't'); put1(b, 'R');
}

static uint32_t crc32_(const unsigned char *p, size_t n)
{
	uint32_t c = 0xffffffffu;
	for (size_t i = 0; i < n; i++) {
		c ^= p[i];
		for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0xedb88320u : c >> 1;
	}
	return ~c;
}

struct zent {
	const char *name;
	const void *data;
	size_t n;
	uint32_t mode;     /* unix mode for the external attributes (0: a plain file) */
	uint64_t claim;    /* size written in the headers (0: the real size) */
};

static void write_zip(const char *path, const struct zent *e, int n)
{
	struct buf z = { 0 }, cd = { 0 };
	for (int i = 0; i < n; i++) {
		uint32_t crc = crc32_(e[i].data, e[i].n), off = (uint32_t)z.n;
		uint64_t size = e[i].claim ? e[i].claim : e[i].n;
		size_t nl = strlen(e[i].name);
		put_le(&z, 0x04034b50, 4); put_le(&z, 20, 2); put_le(&z, 0, 2); put_le(&z, 0, 2);
		put_le(&z, 0, 2); put_le(&z, 0x21, 2); put_le(&z, crc, 4); put_le(&z, size, 4); put_le(&z, size, 4);
		put_le(&z, nl, 2); put_le(&z, 0, 2); puts_(&z, e[i].name); put(&z, e[i].data, e[i].n);
		put_le(&cd, 0x02014b50, 4); put_le(&cd, e[i].mode ? 0x0314 : 20, 2); put_le(&cd, 20, 2);
		put_le(&cd, 0, 2); put_le(&cd, 0, 2); put_le(&cd, 0, 2); put_le(&cd, 0x21, 2); put_le(&cd, crc, 4);
		put_le(&cd, size, 4); put_le(&cd, size, 4); put_le(&cd, nl, 2); put_le(&cd, 0, 2); put_le(&cd, 0, 2);
		put_le(&cd, 0, 2); put_le(&cd, 0, 2); put_le(&cd, (uint64_t)e[i].mode << 16, 4); put_le(&cd, off, 4);
		puts_(&cd, e[i].name);
	}
	uint32_t cdoff = (uint32_t)z.n;
	put(&z, cd.p, cd.n);
	put_le(&z, 0x06054b50, 4); put_le(&z, 0, 2); put_le(&z, 0, 2); put_le(&z, (uint64_t)n, 2);
	put_le(&z, (uint64_t)n, 2); put_le(&z, cd.n, 4); put_le(&z, cdoff, 4); put_le(&z, 0, 2);
	FILE *f = fopen(path, "wb");
	if (f) {
		fwrite(z.p, 1, z.n, f);
		fclose(f);
	}
	free(z.p);
	free(cd.p);
}

/* A checkpoint of pickle b and one storage "0" of n floats; sd_ckpt_open must refuse it with want. */
static void ckpt_refused(const char *what, struct buf *b, size_t nfloats, const char *want)
{
	float *data = calloc(nfloats ? nfloats : 1, sizeof *data);
	struct zent e[] = { { "a/data.pkl", b->p, b->n, 0, 0 }, { "a/data/0", data, nfloats * sizeof *data, 0, 0 } };
	const char *path = tmp_path("hostile.ckpt");
	write_zip(path, e, 2);
	free(data);
	long before = peak_mb();
	sd_ckpt *c = sd_ckpt_open(path);
	refused_msg(what, c == NULL, want);
	small_rss(what, before);
	sd_ckpt_close(c);
	b->n = 0;
}

/* ==== the unpickler ==== */

/* GLOBAL + REDUCE on callables that run code, read or write files, or import: each refused by name. */
TEST(dangerous_globals)
{
	static const char *const g[][2] = {
		{ "builtins", "exec" }, { "builtins", "getattr" }, { "builtins", "__import__" },
		{ "builtins", "open" }, { "builtins", "compile" }, { "__builtin__", "eval" },
		{ "copyreg", "_reconstructor" }, { "copy_reg", "_reconstructor" }, { "nt", "system" },
		{ "posix", "popen" }, { "os", "execv" }, { "os", "remove" }, { "shutil", "rmtree" },
		{ "subprocess", "check_output" }, { "pty", "spawn" }, { "runpy", "_run_code" },
		{ "importlib", "import_module" }, { "pickle", "loads" }, { "_pickle", "loads" },
		{ "marshal", "loads" }, { "types", "FunctionType" }, { "functools", "partial" },
		{ "operator", "attrgetter" }, { "code", "InteractiveInterpreter" }, { "webbrowser", "open" },
		{ "numpy.core.multiarray", "_reconstruct" }, { "torch", "load" },
		{ "torch.storage", "_load_from_bytes" }, { "torch._utils", "_rebuild_from_type_v2" },
		{ "torch.nn.modules.linear", "Linear" }, { "collections", "defaultdict" },
		{ "torch._utils ", "_rebuild_tensor_v2" }, { "torch._utils", "_rebuild_tensor_v2\r" },
	};
	struct buf b = { 0 };
	for (size_t i = 0; i < sizeof g / sizeof g[0]; i++) {
		char want[256], what[128];
		snprintf(what, sizeof what, "%s.%s", g[i][0], g[i][1]);
		snprintf(want, sizeof want, "forbidden global '%.60s.", g[i][0]);
		for (char *p = want; *p; p++) if (*p == '\r') *p = '?';
		put1(&b, 0x80); put1(&b, 2);
		put1(&b, '}'); pk_str(&b, "x");
		pk_global(&b, g[i][0], g[i][1]);
		pk_str(&b, "touch /tmp/sdpipe-pwned"); put1(&b, 0x85); put1(&b, 'R');
		put1(&b, 's'); put1(&b, '.');
		ckpt_refused(what, &b, 4, want);
	}
	/* the allowlisted callable reached through the memo after a forbidden one was refused: nothing
	 * gets past the first refusal */
	put1(&b, 0x80); put1(&b, 2); pk_global(&b, "os", "system"); put1(&b, 'q'); put1(&b, 0);
	put1(&b, 'h'); put1(&b, 0); put1(&b, ')'); put1(&b, 'R'); put1(&b, '.');
	ckpt_refused("memo of a forbidden global", &b, 4, "forbidden global 'os.system'");
	/* PERSID (protocol 0's text persistent id) is not torch's: refused */
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); pk_str(&b, "x"); put1(&b, 'P'); puts_(&b, "0\n");
	put1(&b, 's'); put1(&b, '.');
	ckpt_refused("PERSID", &b, 4, "opcode PERSID");
	free(b.p);
}

/* Tensors that would make far more bytes than the file holds. */
TEST(amplification)
{
	struct buf b = { 0 };
	/* a stride-0 view: 2^33 floats (32 GiB) from a storage of one float */
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); pk_str(&b, "x");
	pk_tensor1(&b, "0", 1, (int64_t)1 << 33, 0);
	put1(&b, 's'); put1(&b, '.');
	ckpt_refused("stride-0 view of 32 GiB", &b, 1, "more than 4 times the file's size");
	/* 2000 names over one storage of 64k floats: 512 MiB from a 256 KiB file */
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); put1(&b, '(');
	for (int i = 0; i < 2000; i++) {
		char k[16];
		snprintf(k, sizeof k, "w%d", i);
		pk_str(&b, k);
		pk_tensor1(&b, "0", 65536, 65536, 1);
	}
	put1(&b, 'u'); put1(&b, '.');
	ckpt_refused("2000 views of one storage", &b, 65536, "more than 4 times the file's size");
	/* legitimate sharing is fine: two names over one storage (tied weights) */
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); put1(&b, '(');
	pk_str(&b, "a"); pk_tensor1(&b, "0", 16, 16, 1);
	pk_str(&b, "b"); pk_tensor1(&b, "0", 16, 4, 4);
	put1(&b, 'u'); put1(&b, '.');
	float sixteen[16] = { 0 };
	struct zent e[] = { { "a/data.pkl", b.p, b.n, 0, 0 }, { "a/data/0", sixteen, sizeof sixteen, 0, 0 } };
	write_zip(tmp_path("tied.ckpt"), e, 2);
	sd_ckpt *c = sd_ckpt_open(tmp_path("tied.ckpt"));
	CHECK(c && sd_ckpt_count(c) == 2);
	if (!c) printf("  tied weights: %s\n", sd_errmsg());
	sd_ckpt_close(c);
	free(b.p);
}

/* Archive tricks beyond ../ names (test_ckpt.c): links, and sizes that lie. */
TEST(archive_tricks)
{
	struct buf b = { 0 };
	float four[4] = { 1, 2, 3, 4 };
	put1(&b, 0x80); put1(&b, 2); put1(&b, '}'); pk_str(&b, "x"); pk_tensor1(&b, "0", 4, 4, 1);
	put1(&b, 's'); put1(&b, '.');
	const char *path = tmp_path("trick.ckpt");

	struct zent link[] = { { "a/data.pkl", b.p, b.n, 0, 0 }, { "a/data/0", "/etc/passwd", 11, 0120777, 0 } };
	write_zip(path, link, 2);
	sd_ckpt *c = sd_ckpt_open(path);
	refused_msg("storage entry that is a symlink", c == NULL, "is not a regular file");
	sd_ckpt_close(c);

	/* headers claiming 2 GiB for a 16-byte storage: read as it comes, never allocated up front */
	struct zent lie[] = { { "a/data.pkl", b.p, b.n, 0, 0 }, { "a/data/0", four, 16, 0, (uint64_t)2 << 30 } };
	write_zip(path, lie, 2);
	long before = peak_mb();
	c = sd_ckpt_open(path);
	refused_msg("storage claiming 2 GiB", c == NULL, path);
	small_rss("storage claiming 2 GiB", before);
	sd_ckpt_close(c);

	struct zent lie2[] = { { "a/data.pkl", b.p, b.n, 0, (uint64_t)1 << 31 }, { "a/data/0", four, 16, 0, 0 } };
	write_zip(path, lie2, 2);
	before = peak_mb();
	c = sd_ckpt_open(path);
	refused_msg("data.pkl claiming 2 GiB", c == NULL, path);
	small_rss("data.pkl claiming 2 GiB", before);
	sd_ckpt_close(c);
	free(b.p);
}

/* ==== streams: counts and lengths that announce more than arrives ==== */

TEST(stream_announcements)
{
	static const struct {
		const char *what;
		const char *bytes;
		size_t n;
		const char *want;
	} cases[] = {
#define B(s) s, sizeof(s) - 1
		{ "map of 2^32-1 pairs", B("\xdf\xff\xff\xff\xff"), "frame limit" },
		{ "array of 2^32-1 items", B("\x81\xa1x\xdd\xff\xff\xff\xff\x01"), "frame limit" },
		{ "bin of 4 GiB - 1", B("\x81\xa1x\xc6\xff\xff\xff\xff" "abc"), "frame limit" },
		{ "str of 4 GiB - 1", B("\x81\xa1x\xdb\xff\xff\xff\xff" "abc"), "frame limit" },
		{ "ext32 of 4 GiB - 1", B("\x81\xa1x\xc9\xff\xff\xff\xff\x01"), "frame limit" },
		{ "shape product 2^64", B("\x81\xa1x\x83\xa5" "dtype" "\xa3" "f32" "\xa5" "shape"
		  "\x92\xcf\x40\0\0\0\0\0\0\0\x04" "\xa4" "data" "\xc4\x00"), "product overflows" },
		{ "shape 2^62 x 4 bytes", B("\x81\xa1x\x83\xa5" "dtype" "\xa3" "f32" "\xa5" "shape"
		  "\x91\xcf\x40\0\0\0\0\0\0\0" "\xa4" "data" "\xc4\x00"), "overflows" },
		{ "data shorter than the shape", B("\x81\xa1x\x83\xa5" "dtype" "\xa3" "f32" "\xa5" "shape"
		  "\x91\xce\x10\0\0\0" "\xa4" "data" "\xc4\x04" "abcd"), "needs 1073741824 bytes" },
#undef B
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		long before = peak_mb();
		FILE *f = fmemopen((void *)cases[i].bytes, cases[i].n, "rb");
		sd_reader *r = sd_reader_new(f, "stdin");
		sd_value *fr = NULL;
		int rc = r ? sd_reader_next(r, &fr) : -1;
		refused_msg(cases[i].what, rc == -1, cases[i].want);
		small_rss(cases[i].what, before);
		sd_value_free(fr);
		sd_reader_free(r);
		fclose(f);
		sd_value *g = NULL;
		refused_msg(cases[i].what, sd_frame_unpack(cases[i].bytes, cases[i].n, &g) < 0, "buffer: ");
		sd_value_free(g);
	}
}

/* ==== images: declared sizes ==== */

static void pnm_case(const char *what, const char *bytes, size_t n, int as_file, const char *want)
{
	FILE *f;
	if (as_file) {
		f = fopen(tmp_path("img.pnm"), "w+b");
		if (f) {
			fwrite(bytes, 1, n, f);
			rewind(f);
		}
	} else {
		f = fmemopen((void *)bytes, n, "rb");
	}
	if (!f) {
		test_failed_++;
		return;
	}
	long before = peak_mb();
	sd_pnm_reader *r = sd_pnm_reader_new(f, "img");
	sd_tensor *img = NULL;
	int rc = sd_pnm_read(r, &img, NULL);
	refused_msg(what, rc == -1, want);
	small_rss(what, before);
	sd_tensor_free(img);
	sd_pnm_reader_free(r);
	fclose(f);
}

TEST(image_sizes)
{
	static const char huge[] = "P6\n100000 100000\n255\n";
	pnm_case("PPM 100000x100000 (file)", huge, sizeof huge - 1, 1, "larger than the limit of 268435456 pixels");
	pnm_case("PPM 100000x100000 (pipe)", huge, sizeof huge - 1, 0, "larger than the limit");
	static const char pam[] = "P7\nWIDTH 16384\nHEIGHT 16384\nDEPTH 4096\nMAXVAL 255\nENDHDR\n";
	pnm_case("PAM 16384x16384, depth 4096", pam, sizeof pam - 1, 0, "depth 4096 is larger than the limit");
	/* under the cap, but far more than the file holds: refused from the header */
	static const char big[] = "P6\n8000 8000\n255\nabcdef";
	pnm_case("PPM 8000x8000 in 6 bytes (file)", big, sizeof big - 1, 1, "only 6 bytes of the file are left");
	static const char pbm[] = "P4\n16000 16000\n\x01\x02";
	pnm_case("PBM 16000x16000 in 2 bytes (file)", pbm, sizeof pbm - 1, 1, "(32000000 needed");
	/* from a pipe: read as it comes, and the memory of rows that never arrive is not touched (4000² RGB
	 * is 192 MB of f32; ASan's shadow of it, 24 MB, does count) */
	static const char pipe[] = "P6\n4000 4000\n255\nabcdef";
	pnm_case("PPM 4000x4000 in 6 bytes (pipe)", pipe, sizeof pipe - 1, 0, "img");
	/* the cap can be lowered (and a bad value keeps the default) */
	static const char small[] = "P5\n100 100\n255\n";
	setenv("SD_MAX_PIXELS", "1000", 1);
	pnm_case("SD_MAX_PIXELS=1000, 100x100", small, sizeof small - 1, 0, "limit of 1000 pixels");
	setenv("SD_MAX_PIXELS", "lots", 1);
	pnm_case("SD_MAX_PIXELS=lots, 100x100 (short)", small, sizeof small - 1, 1, "only 0 bytes");
	unsetenv("SD_MAX_PIXELS");
}

int main(void)
{
	const char *t = getenv("TMPDIR");
	snprintf(tmpdir, sizeof tmpdir, "%s/sdhostile.XXXXXX", t && *t ? t : "/tmp");
	if (!mkdtemp(tmpdir)) {
		perror(tmpdir);
		return 1;
	}
	RUN(stream_announcements);
	RUN(image_sizes);
	RUN(dangerous_globals);
	RUN(amplification);
	RUN(archive_tricks);
	char cmd[4200];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
	if (system(cmd) != 0) printf("  could not remove %s\n", tmpdir);
	return test_summary();
}
