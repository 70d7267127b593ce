/*
 * fuzz_stream.c - libFuzzer target for the sd-tensor(5) stream reader (lib/io/stream.c): the input is
 * read both as one buffer (sd_frame_unpack) and as a stream of frames (sd_reader over fmemopen, with a
 * 1 MiB frame cap so that the cap is reachable), and every frame that parses must survive
 * pack → unpack → pack byte for byte (what a filter that passes keys through does).
 */
#include "fuzz.h"
#include "sd.h"

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	setenv("SD_MAX_FRAME_MB", "1", 1);
	return 0;
}

/* pack(f) == pack(unpack(pack(f))); abort() on a difference (a bug, not bad input). */
static void roundtrip(const sd_value *f)
{
	char *a = NULL, *b = NULL;
	size_t na = 0, nb = 0;
	sd_value *g = NULL;
	if (sd_frame_pack(f, &a, &na) < 0) return; /* e.g. out of memory: not a crash */
	if (sd_frame_unpack(a, na, &g) < 0) {
		fprintf(stderr, "fuzz_stream: a packed frame does not unpack: %s\n", sd_errmsg());
		abort();
	}
	if (sd_frame_pack(g, &b, &nb) < 0 || na != nb || memcmp(a, b, na) != 0) {
		fprintf(stderr, "fuzz_stream: pack/unpack/pack differs (%zu vs %zu bytes)\n", na, nb);
		abort();
	}
	/* the tensors' data must be readable to its end */
	for (size_t i = 0; i < g->u.m.n; i++)
		if (g->u.m.v[i]->type == SD_V_TENSOR)
			fuzz_sink += fuzz_touch(g->u.m.v[i]->u.t->data, sd_tensor_nbytes(g->u.m.v[i]->u.t));
	sd_value_free(g);
	free(a);
	free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	sd_value *f = NULL;
	if (sd_frame_unpack(data, size, &f) == 0) {
		roundtrip(f);
		sd_value_free(f);
	}
	if (size == 0) return 0; /* fmemopen refuses an empty buffer */
	FILE *in = fmemopen((void *)data, size, "rb");
	if (!in) return 0;
	sd_reader *r = sd_reader_new(in, "fuzz");
	for (int k = 0; r && k < 64; k++) {
		int rc = sd_reader_next(r, &f);
		if (rc <= 0) break;
		if (sd_reader_index(r) != k) abort();
		roundtrip(f);
		sd_value_free(f);
	}
	sd_reader_free(r);
	fclose(in);
	return 0;
}
