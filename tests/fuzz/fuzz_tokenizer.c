/*
 * fuzz_tokenizer.c - libFuzzer target for the CLIP tokenizer (lib/models/tokenizer.c, unicode.c).
 *
 * First byte even: the rest is a prompt (arbitrary bytes, as sd-tokenize gets them) for sd_tokenize and
 * sd_tokenize_padded with the shipped CLIP vocabulary; every id must be in the vocabulary and the
 * padded form must be exactly 77 ids starting with BOS and ending with EOS.
 * First byte odd: the rest is a hostile model's tokenizer folder, vocab.json and merges.txt split at the
 * first NUL byte, loaded with sd_tokenizer_load and used on a fixed prompt.
 */
#include "fuzz.h"
#include "sd.h"

static sd_tokenizer *clip;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc, (void)argv;
	/* the shipped vocabulary: $SD_DATADIR, else found next to the executable (build-fuzz/, build/fuzz/) */
	if (!getenv("SD_DATADIR")) setenv("SD_DATADIR", "lib/models/data", 1);
	clip = sd_tokenizer_load(NULL);
	if (!clip) {
		fprintf(stderr, "fuzz_tokenizer: %s (run from the source tree or set SD_DATADIR)\n", sd_errmsg());
		exit(1);
	}
	return 0;
}

static void check_ids(const sd_tokenizer *t, const int32_t *ids, int n)
{
	int v = sd_tokenizer_vocab_size(t);
	for (int i = 0; i < n; i++)
		if (ids[i] < 0 || ids[i] >= v) {
			fprintf(stderr, "fuzz_tokenizer: id %d at %d is outside the vocabulary (%d)\n", ids[i], i, v);
			abort();
		}
}

static void prompt(const uint8_t *data, size_t size)
{
	int32_t *ids = NULL, padded[SD_CLIP_MAX_LEN];
	int n = 0, full = 0;
	if (sd_tokenize(clip, (const char *)data, size, &ids, &n) == 0) {
		if (n < 2 || ids[0] != SD_CLIP_BOS || ids[n - 1] != SD_CLIP_EOS) abort();
		check_ids(clip, ids, n);
		free(ids);
		if (sd_tokenize_padded(clip, (const char *)data, size, padded, SD_CLIP_MAX_LEN, SD_CLIP_EOS, &full) < 0 ||
		    full != n || padded[0] != SD_CLIP_BOS || padded[SD_CLIP_MAX_LEN - 1] != SD_CLIP_EOS)
			abort();
		check_ids(clip, padded, SD_CLIP_MAX_LEN);
	} else if (sd_tokenize_padded(clip, (const char *)data, size, padded, SD_CLIP_MAX_LEN, SD_CLIP_EOS, &full) == 0) {
		abort(); /* the two must agree on what is valid */
	}
}

static void folder(const uint8_t *data, size_t size)
{
	const uint8_t *nul = memchr(data, 0, size);
	size_t nv = nul ? (size_t)(nul - data) : size;
	if (!fuzz_file("vocab.json", data, nv)) return;
	if (!fuzz_file("merges.txt", nul ? nul + 1 : data + size, nul ? size - nv - 1 : 0)) return;
	sd_tokenizer *t = sd_tokenizer_load(fuzz_dir());
	if (!t) return;
	static const char text[] = "a photo of an astronaut riding a horse, <|endoftext|> 12345 don't";
	int32_t *ids = NULL;
	int n = 0;
	if (sd_tokenize(t, text, sizeof text - 1, &ids, &n) == 0) { /* ids are whatever vocab.json says */
		fuzz_sink += fuzz_touch(ids, (size_t)n * sizeof *ids);
		free(ids);
	}
	fuzz_sink += (unsigned)sd_tokenizer_token_id(t, "cat</w>");
	sd_tokenizer_free(t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size == 0) return 0;
	if (data[0] & 1) folder(data + 1, size - 1);
	else prompt(data + 1, size - 1);
	return 0;
}
