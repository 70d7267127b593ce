/*
 * test_prompt.c - prompt weighting and long prompts (lib/models/prompt.c) against A1111's rules
 * (prompt_parser.py parse_prompt_attention, sd_hijack_clip.py): a table of prompts and the spans A1111
 * gives them (written from its rules), plain prompts equal to sd_tokenize_padded, chunking at 75 tokens
 * and at a late comma, a chunked context equal to the chunks encoded one by one and concatenated, and
 * a weighted context equal to z * w rescaled to the former mean (the tiny text encoder).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "sd.h"
#include "test.h"

static const char *fixtures(void)
{
	const char *f = getenv("SD_FIXTURES");
	return f && *f ? f : "tests/fixtures";
}

/* prompt, then its spans as "text", weight pairs (NULL ends) */
struct row {
	const char *prompt;
	struct { const char *text; double w; } s[6];
};

static const struct row table[] = {
	{"a cat", {{"a cat", 1}}},
	{"", {{"", 1}}},
	{"(red)", {{"red", 1.1}}},
	{"((red))", {{"red", 1.21}}},
	{"(red:1.3) car", {{"red", 1.3}, {" car", 1}}},
	{"[blurry]", {{"blurry", 1 / 1.1}}},
	{"[[blurry]]", {{"blurry", 1 / 1.21}}},
	{"a (b [c] d:1.5) e", {{"a ", 1}, {"b ", 1.5}, {"c", 1.5 / 1.1}, {" d", 1.5}, {" e", 1}}},
	{"\\(literal\\) x", {{"(literal) x", 1}}},
	{"a \\\\ b", {{"a \\ b", 1}}},
	{"(unclosed", {{"unclosed", 1.1}}},
	{"stray) and]", {{"stray) and]", 1}}},
	{"time: 5", {{"time: 5", 1}}},
	{"(x: 0.5 )", {{"x", 0.5}}},
	{"(a:1.2.3)", {{"a:1.2.3", 1.1}}},
	{"(a)(b)", {{"ab", 1.1}}},
	{"((a)b)", {{"a", 1.21}, {"b", 1.1}}},
};

TEST(parse_table)
{
	for (size_t r = 0; r < sizeof table / sizeof *table; r++) {
		sd_prompt_span *s;
		int n;
		CHECK_OK(sd_prompt_parse(table[r].prompt, strlen(table[r].prompt), &s, &n));
		int want = 0;
		while (want < 6 && table[r].s[want].text) want++;
		int bad = n != want;
		for (int i = 0; !bad && i < n; i++)
			bad = strcmp(s[i].text, table[r].s[i].text) || fabs(s[i].weight - table[r].s[i].w) > 1e-6;
		if (bad) {
			printf("  \"%s\": got", table[r].prompt);
			for (int i = 0; i < n; i++) printf(" [\"%s\" %g]", s[i].text, s[i].weight);
			printf("\n");
			test_failed_++;
		}
		sd_prompt_spans_free(s, n);
	}
}

static sd_tokenizer *tok;

TEST(plain_equals_padded)
{
	const char *p[] = {"a photo of a cat", "", "a, b, c, d"};
	for (int i = 0; i < 3; i++) {
		int32_t want[77], *ids;
		float *w;
		int k, full;
		CHECK_OK(sd_tokenize_padded(tok, p[i], strlen(p[i]), want, 77, SD_CLIP_EOS, &full));
		CHECK_OK(sd_prompt_tokenize(tok, p[i], strlen(p[i]), 1, SD_CLIP_EOS, &ids, &w, &k));
		CHECK(k == 1 && !memcmp(ids, want, sizeof want));
		for (int j = 0; j < 77; j++) CHECK(w[j] == 1);
		free(ids), free(w);
	}
}

/* n words "wN" joined by sep; each "w<digit>" is one token of the shipped vocabulary or more, so the
 * test counts tokens itself. */
TEST(chunks)
{
	/* 100 tokens of "cat": 75 + 25 */
	char buf[4096] = "";
	for (int i = 0; i < 100; i++) strcat(buf, "cat ");
	int32_t *ids, *one;
	float *w;
	int k, n;
	CHECK_OK(sd_prompt_tokenize(tok, buf, strlen(buf), 1, SD_CLIP_EOS, &ids, &w, &k));
	CHECK_OK(sd_tokenize(tok, "cat", 3, &one, &n));
	CHECK(k == 2 && n == 3);
	if (k == 2 && n == 3) {
		CHECK(ids[0] == SD_CLIP_BOS && ids[1] == one[1] && ids[75] == one[1] && ids[76] == SD_CLIP_EOS);
		CHECK(ids[77] == SD_CLIP_BOS && ids[77 + 25] == one[1] && ids[77 + 26] == SD_CLIP_EOS);
		CHECK(ids[153] == SD_CLIP_EOS);
	}
	free(ids), free(w);
	/* 70 cats, a comma, 10 cats: the first chunk ends after the comma (72 tokens), the rest moves on */
	strcpy(buf, "");
	for (int i = 0; i < 70; i++) strcat(buf, "cat ");
	strcat(buf, "(dog:1.5), ");
	for (int i = 0; i < 10; i++) strcat(buf, "cat ");
	CHECK_OK(sd_prompt_tokenize(tok, buf, strlen(buf), 1, SD_CLIP_EOS, &ids, &w, &k));
	int32_t comma = sd_tokenizer_token_id(tok, ",</w>");
	CHECK(k == 2);
	if (k == 2) {
		CHECK(ids[72] == comma && ids[73] == SD_CLIP_EOS && w[71] == 1.5f && w[72] == 1);
		CHECK(ids[78] == one[1] && ids[88] == SD_CLIP_EOS);
	}
	CHECK_OK(sd_prompt_pad_chunks(&ids, &w, &k, 3, SD_CLIP_EOS));
	CHECK(k == 3 && ids[154] == SD_CLIP_BOS && ids[155] == SD_CLIP_EOS && ids[230] == SD_CLIP_EOS);
	free(ids), free(w), free(one);
	/* --no-weighting: brackets are tokens */
	CHECK_OK(sd_prompt_tokenize(tok, "(red:1.3)", 9, 0, SD_CLIP_EOS, &ids, &w, &k));
	CHECK(k == 1 && w[2] == 1 && ids[3] != SD_CLIP_EOS);
	free(ids), free(w);
}

TEST(encode)
{
	const char *dir = getenv("TEST_TINY");
	char path[4096];
	snprintf(path, sizeof path, "%s/tiny", dir ? dir : fixtures());
	sd_model *m = sd_model_open(path, NULL);
	if (!m) SKIP("%.120s: %.120s", path, sd_errmsg());
	sd_weights *w = sd_weights_load(m, SD_TEXT_ENCODER, SD_DEVICE_CPU);
	sd_model_close(m);
	sd_clip *c = w ? sd_clip_new(w) : NULL;
	CHECK(c != NULL);
	if (!c) { sd_weights_free(w); return; }
	const int64_t D = sd_clip_get_config(c)->hidden;
	char buf[4096] = "";
	for (int i = 0; i < 90; i++) strcat(buf, i == 80 ? "(dog:1.4) " : "cat ");
	int32_t *ids;
	float *wt;
	int k;
	CHECK_OK(sd_prompt_tokenize(tok, buf, strlen(buf), 1, SD_CLIP_EOS, &ids, &wt, &k));
	CHECK(k == 2);
	sd_tensor *t = sd_tensor_newv(SD_DTYPE_I32, 2, (int64_t)1, (int64_t)77 * k);
	sd_tensor *tw = sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)1, (int64_t)77 * k);
	memcpy(t->data, ids, 77 * k * sizeof *ids);
	memcpy(tw->data, wt, 77 * k * sizeof *wt);
	sd_tensor *plain = sd_tensor_newv(SD_DTYPE_F32, 3, (int64_t)1, (int64_t)77 * k, D);
	sd_tensor *weighted = sd_tensor_newv(SD_DTYPE_F32, 3, (int64_t)1, (int64_t)77 * k, D);
	sd_tensor *want = sd_tensor_newv(SD_DTYPE_F32, 3, (int64_t)1, (int64_t)77 * k, D);
	CHECK_OK(sd_prompt_encode(c, plain, t, NULL, 0));
	CHECK_OK(sd_prompt_encode(c, weighted, t, tw, 0));
	/* the reference: chunk by chunk through sd_clip_encode, then the rule in double precision */
	sd_tensor *ci = sd_tensor_newv(SD_DTYPE_I32, 2, (int64_t)1, (int64_t)77);
	sd_tensor *cz = sd_tensor_newv(SD_DTYPE_F32, 3, (int64_t)1, (int64_t)77, D);
	for (int j = 0; j < k; j++) {
		memcpy(ci->data, ids + 77 * j, 77 * sizeof *ids);
		CHECK_OK(sd_clip_encode(c, cz, ci, 0, NULL));
		memcpy((float *)want->data + 77 * D * j, cz->data, 77 * D * sizeof(float));
	}
	CHECK_CLOSE((float *)plain->data, (float *)want->data, 77 * D * k, 0);
	for (int j = 0; j < k; j++) {
		float *z = (float *)want->data + 77 * D * j;
		double m0 = 0, m1 = 0;
		for (int64_t i = 0; i < 77 * D; i++) m0 += z[i], m1 += z[i] * wt[77 * j + i / D];
		for (int64_t i = 0; i < 77 * D; i++) z[i] = (float)(z[i] * wt[77 * j + i / D] * (m0 / m1));
	}
	CHECK_CLOSE((float *)weighted->data, (float *)want->data, 77 * D * k, 1e-5);
	CHECK(wt[77 + 6] > 1.39f && wt[77 + 6] < 1.41f); /* "dog" is token 81 → chunk 2, position 6 */
	sd_tensor_free(t), sd_tensor_free(tw), sd_tensor_free(plain), sd_tensor_free(weighted);
	sd_tensor_free(want), sd_tensor_free(ci), sd_tensor_free(cz);
	free(ids), free(wt);
	sd_clip_free(c);
	sd_weights_free(w);
}

int main(void)
{
	RUN(parse_table);
	tok = sd_tokenizer_load(NULL);
	if (!tok) {
		printf("  sd_tokenizer_load: %s\n", sd_errmsg());
		return 1;
	}
	RUN(plain_equals_padded);
	RUN(chunks);
	RUN(encode);
	sd_tokenizer_free(tok);
	return test_summary();
}
