/*
 * fuzz_ckpt.c - libFuzzer target for .ckpt files (lib/io/ckpt.c: libarchive's zip reader and the
 * restricted unpickler).  The first byte picks the mode:
 *
 *   even:  the rest is the whole file, a zip as torch.save writes it (mutations mostly exercise the zip
 *          reader: a changed byte inside an entry breaks its CRC);
 *   odd:   the rest is data.pkl, which is wrapped here in a valid stored zip with the storages "0".."8"
 *          of the unit tests' views pickle (f32[6], i16[2], i8[1], bool[2], bf16[1], empty, f64[1],
 *          i64[3], 16 bytes), so mutations reach the unpickler and the tensor views.  Bit 1 puts the
 *          storages before data.pkl (they are kept until the pickle is read), bit 2 adds a byteorder.
 *
 * Every tensor that opens is read to its last byte and looked up by name.
 */
#include "fuzz.h"
#include "sd.h"

struct zbuf {
	unsigned char *p;
	size_t n, cap;
};

static void zput(struct zbuf *b, const void *s, size_t n)
{
	if (b->n + n > b->cap) {
		b->cap = 2 * (b->n + n) + 256;
		if (!(b->p = realloc(b->p, b->cap))) abort();
	}
	if (n) memcpy(b->p + b->n, s, n);
	b->n += n;
}

static void zle(struct zbuf *b, uint64_t v, int n)
{
	for (int i = 0; i < n; i++) {
		unsigned char c = (unsigned char)(v >> 8 * i);
		zput(b, &c, 1);
	}
}

static uint32_t crc32(const unsigned char *p, size_t n)
{
	static uint32_t tab[256];
	if (!tab[1])
		for (uint32_t i = 0; i < 256; i++) {
			uint32_t c = i;
			for (int k = 0; k < 8; k++) c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
			tab[i] = c;
		}
	uint32_t c = 0xffffffffu;
	for (size_t i = 0; i < n; i++) c = tab[(c ^ p[i]) & 0xff] ^ (c >> 8);
	return ~c;
}

struct zfile {
	const char *name;
	const void *data;
	size_t n;
};

/* A zip of uncompressed entries (local headers, data, central directory, end record). */
static void zip_stored(struct zbuf *z, const struct zfile *e, int n)
{
	struct zbuf cd = { 0 };
	for (int i = 0; i < n; i++) {
		uint32_t crc = crc32(e[i].data, e[i].n), off = (uint32_t)z->n;
		size_t nl = strlen(e[i].name);
		zle(z, 0x04034b50, 4); zle(z, 20, 2); zle(z, 0, 2); zle(z, 0, 2); zle(z, 0, 2); zle(z, 0x21, 2);
		zle(z, crc, 4); zle(z, e[i].n, 4); zle(z, e[i].n, 4); zle(z, nl, 2); zle(z, 0, 2);
		zput(z, e[i].name, nl);
		zput(z, e[i].data, e[i].n);
		zle(&cd, 0x02014b50, 4); zle(&cd, 20, 2); zle(&cd, 20, 2); zle(&cd, 0, 2); zle(&cd, 0, 2);
		zle(&cd, 0, 2); zle(&cd, 0x21, 2); zle(&cd, crc, 4); zle(&cd, e[i].n, 4); zle(&cd, e[i].n, 4);
		zle(&cd, nl, 2); zle(&cd, 0, 2); zle(&cd, 0, 2); zle(&cd, 0, 2); zle(&cd, 0, 2); zle(&cd, 0, 4);
		zle(&cd, off, 4);
		zput(&cd, e[i].name, nl);
	}
	uint32_t cdoff = (uint32_t)z->n;
	zput(z, cd.p, cd.n);
	zle(z, 0x06054b50, 4); zle(z, 0, 2); zle(z, 0, 2); zle(z, (uint64_t)n, 2); zle(z, (uint64_t)n, 2);
	zle(z, cd.n, 4); zle(z, cdoff, 4); zle(z, 0, 2);
	free(cd.p);
}

static const float f6[6] = { 0, 1, 2, 3, 4, 5 };
static const int16_t s2[2] = { -2, 300 };
static const int8_t c1[1] = { -1 };
static const uint8_t b2[2] = { 0, 1 };
static const uint16_t bf1[1] = { 0x3fc0 };
static const double d1[1] = { 2.5 };
static const int64_t l3[3] = { 7, -8, 1LL << 40 };
static const unsigned char x16[16] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 };

static const char *wrap_pickle(const uint8_t *pkl, size_t n, int flags)
{
	struct zfile st[] = {
		{ "archive/data/0", f6, sizeof f6 }, { "archive/data/1", s2, sizeof s2 },
		{ "archive/data/2", c1, sizeof c1 }, { "archive/data/3", b2, sizeof b2 },
		{ "archive/data/4", bf1, sizeof bf1 }, { "archive/data/5", "", 0 },
		{ "archive/data/6", d1, sizeof d1 }, { "archive/data/7", l3, sizeof l3 },
		{ "archive/data/8", x16, sizeof x16 },
	};
	struct zfile e[16];
	int k = 0, ns = (int)(sizeof st / sizeof st[0]);
	if (flags & 2)
		for (int i = 0; i < ns; i++) e[k++] = st[i];
	e[k++] = (struct zfile){ "archive/data.pkl", pkl, n };
	if (flags & 4) e[k++] = (struct zfile){ "archive/byteorder", "little", 6 };
	if (!(flags & 2))
		for (int i = 0; i < ns; i++) e[k++] = st[i];
	e[k++] = (struct zfile){ "archive/version", "3\n", 2 };
	struct zbuf z = { 0 };
	zip_stored(&z, e, k);
	const char *path = fuzz_file("in.ckpt", z.p, z.n);
	free(z.p);
	return path;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0) return 0;
	const char *path = data[0] & 1 ? wrap_pickle(data + 1, size - 1, data[0])
	                               : fuzz_file("in.ckpt", data + 1, size - 1);
	if (!path) return 0;
	sd_ckpt *c = sd_ckpt_open(path);
	if (!c) {
		if (!strstr(sd_errmsg(), path)) { /* every message names the file */
			fprintf(stderr, "fuzz_ckpt: message without the path: %s\n", sd_errmsg());
			abort();
		}
		return 0;
	}
	for (int i = 0; i < sd_ckpt_count(c); i++) {
		const sd_tensor *t = sd_ckpt_tensor(c, i);
		const char *name = sd_ckpt_name(c, i);
		if (!t || !name || sd_ckpt_find(c, name) != i) abort();
		fuzz_sink += fuzz_touch(t->data, sd_tensor_nbytes(t));
	}
	sd_ckpt_close(c);
	return 0;
}
