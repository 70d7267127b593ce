/*
 * fuzz_pnm.c - libFuzzer target for PNM input (lib/io/pnm.c over libnetpbm, the reader behind
 * pnmtotensor): every image of the input is read (libnetpbm's errors must come back as -1, never as an
 * exit), checked to be [1,C,H,W] with values in [0,1], and written back with sd_pnm_pack.  The pixel cap
 * is lowered to 2^20 ($SD_MAX_PIXELS) so that a header can reach it inside libFuzzer's memory limit.
 */
#include "fuzz.h"
#include "sd.h"

/* libnetpbm (not ours, not instrumented) leaks a strdup'd header line when pnm_readpaminit fails on a
 * bad PAM header: pm_error's longjmp skips its free.  One small string per bad image, and the tools stop
 * at the first bad image, so it is suppressed rather than worked around (the input that found it is
 * tests/fuzz/crashes/pnm/leak-pam-bad-header-line; leaks of our own code are still reported). */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void)
{
	return "leak:libnetpbm.so\n";
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	setenv("SD_MAX_PIXELS", "1048576", 1);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0) return 0;
	FILE *in = fmemopen((void *)data, size, "rb");
	if (!in) return 0;
	sd_pnm_reader *r = sd_pnm_reader_new(in, "fuzz");
	for (int k = 0; r && k < 16; k++) {
		sd_tensor *img = NULL;
		int maxval = 0;
		if (sd_pnm_read(r, &img, &maxval) <= 0) break;
		if (img->ndim != 4 || img->shape[0] != 1 || maxval < 1 || maxval > 65535) abort();
		const float *px = img->data;
		int64_t n = sd_tensor_numel(img);
		for (int64_t i = 0; i < n; i++)
			if (!(px[i] >= 0.0f && px[i] <= 1.0f)) {
				fprintf(stderr, "fuzz_pnm: sample %lld is %g, outside [0,1]\n", (long long)i, px[i]);
				abort();
			}
		char *buf = NULL;
		size_t len = 0;
		if (sd_pnm_pack(img, maxval, &buf, &len) == 0) free(buf); /* only C = 1 or 3 can be written */
		sd_tensor_free(img);
	}
	sd_pnm_reader_free(r);
	fclose(in);
	return 0;
}
