/*
 * fuzz_safetensors.c - libFuzzer target for the safetensors reader (lib/io/safetensors.c): the input
 * is written to a scratch file and opened with sd_st_open; every tensor that it accepts must lie inside
 * the mapping (each byte is read, so ASan reports a view past the end), and the name and metadata
 * lookups must agree with the listing.
 */
#include "fuzz.h"
#include "sd.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *path = fuzz_file("in.safetensors", data, size);
	if (!path) return 0;
	sd_st *f = sd_st_open(path);
	if (!f) return 0;
	for (int i = 0; i < sd_st_count(f); i++) {
		const sd_tensor *t = sd_st_tensor(f, i);
		const char *name = sd_st_name(f, i);
		if (!t || !name || sd_st_find(f, name) != i) abort();
		fuzz_sink += fuzz_touch(t->data, sd_tensor_nbytes(t));
	}
	for (int i = 0; i < sd_st_meta_count(f); i++) {
		const char *k = sd_st_meta_key(f, i), *v = sd_st_meta_val(f, i);
		if (!k || !v || !sd_st_meta(f, k)) abort();
		fuzz_sink += (unsigned)strlen(v);
	}
	if (sd_st_tensor(f, -1) || sd_st_tensor(f, sd_st_count(f)) || sd_st_find(f, "\x01no such name") >= 0)
		abort();
	sd_st_close(f);
	return 0;
}
