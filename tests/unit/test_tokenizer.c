/*
 * test_tokenizer.c - the CLIP tokenizer (lib/models/tokenizer.c, unicode.c) against Hugging Face's
 * CLIPTokenizer with ftfy 6.1.1: the 20 prompts of golden/tokenizer_prompts.json must give exactly the
 * padded input_ids [20,77] and the untruncated full_ids of golden/tokenizer.safetensors, loading both
 * from a diffusers tokenizer/ folder and from the merges file that ships with sdpipe.  Also: the
 * vocabulary rebuilt from merges equals vocab.json id for id, invalid UTF-8 is refused, empty and
 * megabyte-long prompts, and a few ftfy/str.lower cases checked as "tokenises the same as".
 */
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "sd.h"
#include "test.h"

#define MAXLEN 77

static const char *fixtures(void)
{
	const char *f = getenv("SD_FIXTURES");
	return f && *f ? f : "tests/fixtures";
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ==== the golden data ==== */

typedef struct {
	int n;
	char *text[32];
	size_t len[32];
	sd_st *st;
	const int64_t *input_ids, *full_ids, *full_offsets;
	int64_t nfull;
} golden;

static int unhex(const char *h, char **out, size_t *len)
{
	size_t n = strlen(h) / 2;
	char *p = malloc(n + 1);
	if (!p)
		return -1;
	for (size_t i = 0; i < n; i++) {
		unsigned v;
		if (sscanf(h + 2 * i, "%2x", &v) != 1) {
			free(p);
			return -1;
		}
		p[i] = (char)v;
	}
	p[n] = 0;
	*out = p;
	*len = n;
	return 0;
}

static void golden_free(golden *g)
{
	for (int i = 0; i < g->n; i++)
		free(g->text[i]);
	sd_st_close(g->st);
	memset(g, 0, sizeof *g);
}

/* Load the prompts (their exact bytes, from utf8_hex) and the expected ids; 0 or -1 with a message. */
static int golden_load(golden *g)
{
	char path[1024];
	memset(g, 0, sizeof *g);
	snprintf(path, sizeof path, "%s/golden/tokenizer_prompts.json", fixtures());
	json_error_t err;
	json_t *root = json_load_file(path, 0, &err);
	if (!root || !json_is_array(root) || json_array_size(root) > 32) {
		printf("  %s: %s\n", path, root ? "not an array of at most 32 prompts" : err.text);
		json_decref(root);
		return -1;
	}
	for (size_t i = 0; i < json_array_size(root); i++) {
		const char *hex = json_string_value(json_object_get(json_array_get(root, i), "utf8_hex"));
		if (!hex || unhex(hex, &g->text[i], &g->len[i])) {
			printf("  %s: prompt %zu has no utf8_hex\n", path, i);
			json_decref(root);
			golden_free(g);
			return -1;
		}
		g->n++;
	}
	json_decref(root);
	snprintf(path, sizeof path, "%s/golden/tokenizer.safetensors", fixtures());
	g->st = sd_st_open(path);
	if (!g->st) {
		printf("  %s\n", sd_errmsg());
		golden_free(g);
		return -1;
	}
	const char *names[3] = {"input_ids", "full_ids", "full_offsets"};
	const sd_tensor *t[3];
	for (int k = 0; k < 3; k++) {
		int i = sd_st_find(g->st, names[k]);
		t[k] = i >= 0 ? sd_st_tensor(g->st, i) : NULL;
		if (!t[k] || t[k]->dtype != SD_DTYPE_I64) {
			printf("  %s: no int64 tensor %s\n", path, names[k]);
			golden_free(g);
			return -1;
		}
	}
	if (t[0]->ndim != 2 || t[0]->shape[0] != g->n || t[0]->shape[1] != MAXLEN || t[2]->ndim != 1 ||
	    t[2]->shape[0] != g->n + 1) {
		printf("  %s: unexpected shapes\n", path);
		golden_free(g);
		return -1;
	}
	g->input_ids = t[0]->data;
	g->full_ids = t[1]->data;
	g->full_offsets = t[2]->data;
	g->nfull = t[1]->shape[0];
	return 0;
}

/* Every golden prompt through tok; prints the first difference of each failing prompt. */
static void check_golden(const sd_tokenizer *tok, const char *what)
{
	golden g;
	if (golden_load(&g)) {
		test_failed_++;
		return;
	}
	int bad = 0;
	double t0 = now();
	for (int i = 0; i < g.n; i++) {
		int32_t out[MAXLEN];
		int full = 0;
		if (sd_tokenize_padded(tok, g.text[i], g.len[i], out, MAXLEN, SD_CLIP_EOS, &full)) {
			printf("  %s: prompt %d: %s\n", what, i, sd_errmsg());
			bad++;
			continue;
		}
		for (int j = 0; j < MAXLEN; j++)
			if (out[j] != g.input_ids[i * MAXLEN + j]) {
				printf("  %s: prompt %d (\"%.40s\"): input_ids[%d] = %d, want %lld\n", what, i, g.text[i], j,
				       out[j], (long long)g.input_ids[i * MAXLEN + j]);
				bad++;
				break;
			}
	}
	double per = (now() - t0) / (g.n ? g.n : 1);
	for (int i = 0; i < g.n; i++) {
		int32_t *ids;
		int n;
		if (sd_tokenize(tok, g.text[i], g.len[i], &ids, &n)) {
			printf("  %s: prompt %d: %s\n", what, i, sd_errmsg());
			bad++;
			continue;
		}
		int64_t a = g.full_offsets[i], b = g.full_offsets[i + 1];
		if (a < 0 || b > g.nfull || b < a) {
			printf("  %s: bad full_offsets\n", what);
			bad++;
			free(ids);
			break;
		}
		if (n != b - a)
			printf("  %s: prompt %d (\"%.40s\"): %d ids, want %lld\n", what, i, g.text[i], n,
			       (long long)(b - a)), bad++;
		for (int j = 0; j < n && j < b - a; j++)
			if (ids[j] != g.full_ids[a + j]) {
				printf("  %s: prompt %d (\"%.40s\"): full id %d = %d, want %lld\n", what, i, g.text[i], j,
				       ids[j], (long long)g.full_ids[a + j]);
				bad++;
				break;
			}
		free(ids);
	}
	printf("  %s: %d prompts, %d differences, %.1f us per padded prompt\n", what, g.n, bad, per * 1e6);
	CHECK(bad == 0);
	golden_free(&g);
}

static sd_tokenizer *load_folder(void)
{
	char dir[1024];
	snprintf(dir, sizeof dir, "%s/tiny/tokenizer", fixtures());
	double t0 = now();
	sd_tokenizer *tok = sd_tokenizer_load(dir);
	if (!tok)
		printf("  %s\n", sd_errmsg());
	else
		printf("  loaded %s in %.1f ms\n", dir, (now() - t0) * 1e3);
	return tok;
}

static sd_tokenizer *load_shipped(void)
{
	double t0 = now();
	sd_tokenizer *tok = sd_tokenizer_load(NULL);
	if (!tok)
		printf("  %s\n", sd_errmsg());
	else
		printf("  loaded the shipped merges in %.1f ms\n", (now() - t0) * 1e3);
	return tok;
}

/* ==== cases ==== */

TEST(golden_folder)
{
	sd_tokenizer *tok = load_folder();
	CHECK(tok != NULL);
	if (tok)
		check_golden(tok, "folder");
	sd_tokenizer_free(tok);
}

TEST(golden_shipped)
{
	sd_tokenizer *tok = load_shipped();
	CHECK(tok != NULL);
	if (tok)
		check_golden(tok, "shipped");
	sd_tokenizer_free(tok);
}

/* The vocabulary SimpleTokenizer builds from merges alone equals vocab.json, id for id. */
TEST(vocab_from_merges)
{
	char path[1024];
	snprintf(path, sizeof path, "%s/tiny/tokenizer/vocab.json", fixtures());
	sd_tokenizer *tok = load_shipped();
	json_error_t err;
	json_t *root = json_load_file(path, 0, &err);
	CHECK(tok && root);
	if (tok && root) {
		const char *key;
		json_t *val;
		long diff = 0;
		json_object_foreach(root, key, val) {
			int32_t id = sd_tokenizer_token_id(tok, key);
			if (id != json_integer_value(val) && diff++ < 5)
				printf("  \"%s\": %d from merges, %lld in vocab.json\n", key, id,
				       (long long)json_integer_value(val));
		}
		printf("  %d entries from merges, %zu in vocab.json, %ld differ\n", sd_tokenizer_vocab_size(tok),
		       json_object_size(root), diff);
		CHECK(diff == 0);
		CHECK((size_t)sd_tokenizer_vocab_size(tok) == json_object_size(root));
		CHECK(sd_tokenizer_token_id(tok, "<|startoftext|>") == SD_CLIP_BOS);
		CHECK(sd_tokenizer_token_id(tok, "<|endoftext|>") == SD_CLIP_EOS);
		CHECK(sd_tokenizer_token_id(tok, "no such token") == -1);
	}
	json_decref(root);
	sd_tokenizer_free(tok);
}

TEST(invalid_utf8)
{
	sd_tokenizer *tok = load_folder();
	if (!tok) {
		test_failed_++;
		return;
	}
	static const char *const bad[] = {"abc\xff", "\xc0\xaf", "caf\xc3", "\xed\xa0\x80", "\xf4\x90\x80\x80",
	                                  "\xe2\x28\xa1", "ok \x80 no"};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		int32_t out[MAXLEN];
		int32_t *ids = NULL;
		int n = -1;
		CHECK(sd_tokenize_padded(tok, bad[i], strlen(bad[i]), out, MAXLEN, SD_CLIP_EOS, NULL) == -1);
		CHECK(strstr(sd_errmsg(), "UTF-8") != NULL);
		CHECK(sd_tokenize(tok, bad[i], strlen(bad[i]), &ids, &n) == -1);
		CHECK(ids == NULL);
	}
	printf("  message: %s\n", sd_errmsg());
	sd_tokenizer_free(tok);
}

TEST(empty_prompt)
{
	sd_tokenizer *tok = load_folder();
	if (!tok) {
		test_failed_++;
		return;
	}
	int32_t out[MAXLEN];
	int full = 0;
	CHECK_OK(sd_tokenize_padded(tok, "", 0, out, MAXLEN, SD_CLIP_EOS, &full));
	CHECK(full == 2);
	CHECK(out[0] == SD_CLIP_BOS);
	int ok = 1;
	for (int i = 1; i < MAXLEN; i++)
		ok &= out[i] == SD_CLIP_EOS;
	CHECK(ok);
	/* whitespace only, and SD 2's pad id 0 */
	CHECK_OK(sd_tokenize_padded(tok, " \t\n ", 4, out, MAXLEN, 0, &full));
	CHECK(full == 2 && out[0] == SD_CLIP_BOS && out[1] == SD_CLIP_EOS && out[2] == 0 && out[76] == 0);
	CHECK(sd_tokenize_padded(tok, "x", 1, out, 1, 0, NULL) == -1);
	sd_tokenizer_free(tok);
}

/* A megabyte prompt of words, one megabyte-long word, and a megabyte of non-ASCII text: truncated to 77
 * with a final EOS, in linear-ish time. */
TEST(megabyte_prompt)
{
	sd_tokenizer *tok = load_folder();
	if (!tok) {
		test_failed_++;
		return;
	}
	size_t n = 1 << 20;
	char *text = malloc(n + 8);
	const char *kinds[3] = {"words", "one word", "non-ASCII"};
	for (int kind = 0; kind < 3 && text; kind++) {
		if (kind == 0) {
			const char *w = "a photo of a cat, ";
			for (size_t i = 0; i < n; i++)
				text[i] = w[i % strlen(w)];
		} else if (kind == 1)
			memset(text, 'a', n);
		else
			for (size_t i = 0; i + 1 < n; i += 2)
				text[i] = (char)0xc3, text[i + 1] = (char)0xa9; /* é */
		int32_t out[MAXLEN];
		int full = 0;
		double t0 = now();
		int rc = sd_tokenize_padded(tok, text, n, out, MAXLEN, SD_CLIP_EOS, &full);
		double dt = now() - t0;
		printf("  1 MiB of %s: %d tokens untruncated, %.0f ms\n", kinds[kind], full, dt * 1e3);
		CHECK(rc == 0);
		CHECK(full > MAXLEN);
		CHECK(out[0] == SD_CLIP_BOS && out[MAXLEN - 1] == SD_CLIP_EOS);
		CHECK(dt < 10.0);
	}
	free(text);
	sd_tokenizer_free(tok);
}

/* Tokenises a and b and reports whether the ids agree; prints both when that is not `want`. */
static int same_ids_(const sd_tokenizer *tok, const char *a, const char *b, int want)
{
	int32_t *x = NULL, *y = NULL;
	int nx = 0, ny = 0;
	int ok = !sd_tokenize(tok, a, strlen(a), &x, &nx) && !sd_tokenize(tok, b, strlen(b), &y, &ny) && nx == ny &&
	         memcmp(x, y, nx * sizeof *x) == 0;
	if (ok != want) {
		printf("  \"%s\" ->", a);
		for (int i = 0; i < nx; i++)
			printf(" %d", x[i]);
		printf("\n  \"%s\" ->", b);
		for (int i = 0; i < ny; i++)
			printf(" %d", y[i]);
		printf("\n");
	}
	free(x);
	free(y);
	return ok;
}
#define same_ids(tok, a, b) same_ids_(tok, a, b, 1)
#define differ_ids(tok, a, b) (!same_ids_(tok, a, b, 0))

/* ftfy, NFC, str.lower and the pre-tokeniser on cases the golden prompts do not cover. */
TEST(cleaning)
{
	sd_tokenizer *tok = load_folder();
	if (!tok) {
		test_failed_++;
		return;
	}
	CHECK(same_ids(tok, "caf\xc3\x83\xc2\xa9 na\xc3\x83\xc2\xafve", "caf\xc3\xa9 na\xc3\xafve")); /* mojibake */
	CHECK(same_ids(tok, "\xc3\xa2\xe2\x82\xac\xe2\x80\x9c dash", "\xe2\x80\x93 dash"));          /* â€“ -> – */
	CHECK(same_ids(tok, "e\xcc\x81t\xc3\xa9", "\xc3\xa9t\xc3\xa9"));                               /* NFC */
	CHECK(same_ids(tok, "\xef\xac\x81ne \xef\xac\x82ow", "fine flow"));                            /* ligatures */
	CHECK(same_ids(tok, "\xef\xbc\xa1\xef\xbc\xa2\xef\xbc\xa3\xe3\x80\x80x", "abc x"));            /* width */
	CHECK(same_ids(tok, "\xe2\x80\x9cq\xe2\x80\x9d \xe2\x80\x98it\xe2\x80\x99s", "\"q\" 'it's")); /* quotes */
	CHECK(same_ids(tok, "&amp;amp; &lt;3 &#65;&#x42; &EACUTE;", "& <3 ab \xc3\xa9"));              /* entities */
	CHECK(same_ids(tok, "<b>&amp;</b>", "<b>&amp;</b>"));
	CHECK(differ_ids(tok, "<b> &amp;", "<b> &"));                                                   /* '<': kept */
	CHECK(differ_ids(tok, "fish &amp chips", "fish & chips"));                                   /* no ";" */
	CHECK(same_ids(tok, "\xce\x9f\xce\x94\xce\x9f\xce\xa3", "\xce\xbf\xce\xb4\xce\xbf\xcf\x82"));  /* final sigma */
	CHECK(same_ids(tok, "\xce\xa3\xce\x91", "\xcf\x83\xce\xb1"));
	CHECK(same_ids(tok, "\xc4\xb0stanbul", "i\xcc\x87stanbul"));                                  /* İ */
	CHECK(same_ids(tok, "a\x01\x1b[31mred\x1b[0m\xef\xbb\xbf", "ared"));                          /* controls */
	CHECK(same_ids(tok, "x\xc2\x85y", "x\xe2\x80\xa6y"));                                           /* C1 -> … */
	CHECK(same_ids(tok, "<|ENDOFTEXT|> hi", "<|endoftext|>hi"));
	CHECK(same_ids(tok, "DON'T we'LL", "don't we'll"));
	sd_tokenizer_free(tok);
}

/* A missing folder names the file; $SD_DATADIR comes first when loading the shipped merges. */
TEST(datafile_lookup)
{
	char dir[1024];
	snprintf(dir, sizeof dir, "%s/no-such-tokenizer", fixtures());
	sd_tokenizer *tok = sd_tokenizer_load(dir);
	CHECK(tok == NULL);
	printf("  message: %s\n", sd_errmsg());
	CHECK(strstr(sd_errmsg(), "no-such-tokenizer/vocab.json") != NULL);

	char tmp[] = "/tmp/sdtok.XXXXXX", file[64];
	if (!mkdtemp(tmp))
		SKIP("cannot make a temporary folder");
	snprintf(file, sizeof file, "%s/clip-merges.txt", tmp);
	FILE *f = fopen(file, "w");
	if (f) {
		fputs("#version: 0.2\ni n\nnot three symbols\n", f);
		fclose(f);
	}
	const char *old = getenv("SD_DATADIR");
	char *save = old ? strdup(old) : NULL;
	setenv("SD_DATADIR", tmp, 1);
	tok = sd_tokenizer_load(NULL);
	CHECK(tok == NULL);
	printf("  message: %s\n", sd_errmsg());
	CHECK(strstr(sd_errmsg(), file) != NULL && strstr(sd_errmsg(), ":3:") != NULL);
	sd_tokenizer_free(tok);
	if (save) {
		setenv("SD_DATADIR", save, 1);
		free(save);
	} else
		unsetenv("SD_DATADIR");
	remove(file);
	rmdir(tmp);
}

int main(void)
{
	RUN(golden_folder);
	RUN(golden_shipped);
	RUN(vocab_from_merges);
	RUN(invalid_utf8);
	RUN(empty_prompt);
	RUN(megabyte_prompt);
	RUN(cleaning);
	RUN(datafile_lookup);
	return test_summary();
}
