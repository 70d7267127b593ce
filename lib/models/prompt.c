/*
 * Prompt weighting and long prompts, as AUTOMATIC1111's web UI defines them (modules/prompt_parser.py
 * parse_prompt_attention, modules/sd_hijack_clip.py tokenize_line and process_tokens).
 *
 * Parsing: "(text)" multiplies the weight of text by 1.1, "[text]" divides it by 1.1, "(text:1.3)" sets
 * the factor to 1.3; brackets nest (multiplying); "\(" "\)" "\[" "\]" "\\" are the literal characters;
 * brackets left open apply to the end of the prompt, a closing bracket without its opener is text.
 * Neighbouring pieces of equal weight are merged.  (A1111's BREAK keyword is not implemented.)
 *
 * Chunking: each piece is tokenized on its own; the tokens are cut into chunks of 75, each chunk written
 * BOS, its tokens, EOS, padded with the pad id to 77.  When a chunk is full and a comma is among its
 * last 20 tokens, the chunk ends after that comma and the tokens past it move to the next chunk.
 *
 * Encoding: each chunk is encoded on its own and the hidden states concatenated (N, 77k, D); then per
 * chunk and row, z is multiplied by the token weights and scaled so its mean is what it was before.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sd.h"

#define CHUNK 75     /* tokens of text per chunk (77 with BOS and EOS) */
#define BACKTRACK 20 /* A1111's comma_padding_backtrack */

/* ==== parsing ==== */

struct builder {
	sd_prompt_span *s;
	int n, cap;
};

static int push(struct builder *b, const char *text, size_t len)
{
	if (b->n == b->cap) {
		int cap = b->cap ? 2 * b->cap : 8;
		sd_prompt_span *s = realloc(b->s, cap * sizeof *s);
		if (!s) return sd_seterr("out of memory");
		b->s = s;
		b->cap = cap;
	}
	char *t = malloc(len + 1);
	if (!t) return sd_seterr("out of memory");
	memcpy(t, text, len);
	t[len] = 0;
	b->s[b->n].text = t;
	b->s[b->n].len = len;
	b->s[b->n].weight = 1.0f;
	b->n++;
	return 0;
}

static void multiply(struct builder *b, int from, double f)
{
	for (int i = from; i < b->n; i++) b->s[i].weight = (float)(b->s[i].weight * f);
}

/* ":" spaces number spaces ")" at s (s[0] == ':'): the number's value and the match length, else 0. */
static size_t weight_close(const char *s, size_t n, double *w)
{
	size_t i = 1;
	while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r' || s[i] == '\f' || s[i] == '\v')) i++;
	size_t a = i;
	if (i < n && (s[i] == '+' || s[i] == '-')) i++;
	size_t d = i;
	while (i < n && (s[i] == '.' || (s[i] >= '0' && s[i] <= '9'))) i++;
	if (i == d) return 0;
	char num[64];
	if (i - a >= sizeof num) return 0;
	memcpy(num, s + a, i - a);
	num[i - a] = 0;
	while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r' || s[i] == '\f' || s[i] == '\v')) i++;
	if (i >= n || s[i] != ')') return 0;
	char *end;
	double v = strtod(num, &end);
	if (*end || !isfinite(v)) return 0; /* "1.2.3": Python's float() fails too; taken as text here */
	*w = v;
	return i + 1;
}

int sd_prompt_parse(const char *text, size_t len, sd_prompt_span **spans, int *n)
{
	struct builder b = {0};
	int round[256], square[256], nr = 0, ns = 0;
	size_t i = 0;
	*spans = NULL;
	*n = 0;
	while (i < len) {
		char c = text[i];
		double w;
		size_t m;
		if (c == '\\') {
			/* an escape: the next character when it is one of \()[], else a lone backslash */
			if (i + 1 < len && strchr("()[]\\", text[i + 1]) && text[i + 1]) {
				if (push(&b, text + i + 1, 1)) goto fail;
				i += 2;
			} else {
				i++; /* A1111 keeps text[1:] of a lone "\": nothing */
			}
		} else if (c == '(' || c == '[') {
			int *st = c == '(' ? round : square, *k = c == '(' ? &nr : &ns;
			if (*k == 256) {
				sd_seterr("prompt: brackets nested more than 256 deep");
				goto fail;
			}
			st[(*k)++] = b.n;
			i++;
		} else if (c == ':' && nr > 0 && (m = weight_close(text + i, len - i, &w))) {
			multiply(&b, round[--nr], w);
			i += m;
		} else if (c == ')' && nr > 0) {
			multiply(&b, round[--nr], 1.1);
			i++;
		} else if (c == ']' && ns > 0) {
			multiply(&b, square[--ns], 1 / 1.1);
			i++;
		} else {
			/* a run of text: up to the next special character (a ':' or an unmatched bracket is text) */
			size_t j = i + 1;
			if (c != ':' && c != ')' && c != ']')
				while (j < len && !strchr("\\()[]:", text[j])) j++;
			if (push(&b, text + i, j - i)) goto fail;
			i = j;
		}
	}
	for (int k = 0; k < nr; k++) multiply(&b, round[k], 1.1);
	for (int k = 0; k < ns; k++) multiply(&b, square[k], 1 / 1.1);
	if (b.n == 0 && push(&b, "", 0)) goto fail;
	/* merge neighbours of equal weight */
	int o = 0;
	for (int k = 1; k < b.n; k++) {
		if (b.s[k].weight == b.s[o].weight) {
			char *t = realloc(b.s[o].text, b.s[o].len + b.s[k].len + 1);
			if (!t) {
				sd_seterr("out of memory");
				goto fail;
			}
			memcpy(t + b.s[o].len, b.s[k].text, b.s[k].len + 1);
			b.s[o].text = t;
			b.s[o].len += b.s[k].len;
			free(b.s[k].text);
			b.s[k].text = NULL;
		} else {
			b.s[++o] = b.s[k];
			if (o != k) b.s[k].text = NULL;
		}
	}
	*spans = b.s;
	*n = o + 1;
	return 0;
fail:
	sd_prompt_spans_free(b.s, b.n);
	return -1;
}

void sd_prompt_spans_free(sd_prompt_span *s, int n)
{
	if (!s) return;
	for (int i = 0; i < n; i++) free(s[i].text);
	free(s);
}

/* ==== chunking ==== */

struct chunks {
	int32_t *ids;
	float *w;
	int n;              /* chunks finished */
	int32_t cur[CHUNK]; /* the chunk being filled */
	float curw[CHUNK];
	int len, last_comma;
	int32_t pad;
};

static int finish(struct chunks *c)
{
	int32_t *ids = realloc(c->ids, (size_t)(c->n + 1) * SD_CLIP_MAX_LEN * sizeof *ids);
	if (!ids) return sd_seterr("out of memory");
	c->ids = ids;
	float *w = realloc(c->w, (size_t)(c->n + 1) * SD_CLIP_MAX_LEN * sizeof *w);
	if (!w) return sd_seterr("out of memory");
	c->w = w;
	int32_t *o = ids + (size_t)c->n * SD_CLIP_MAX_LEN;
	float *ow = w + (size_t)c->n * SD_CLIP_MAX_LEN;
	o[0] = SD_CLIP_BOS;
	ow[0] = 1;
	for (int i = 0; i < CHUNK; i++) {
		o[1 + i] = i < c->len ? c->cur[i] : SD_CLIP_EOS;
		ow[1 + i] = i < c->len ? c->curw[i] : 1;
	}
	o[CHUNK + 1] = SD_CLIP_EOS;
	ow[CHUNK + 1] = 1;
	/* A1111 pads the 75 with the end id and then appends EOS; diffusers' tokenizer pads after EOS with
	 * pad_token: the same for SD 1.x.  With another pad id, the diffusers form (EOS right after the text). */
	if (c->pad != SD_CLIP_EOS && c->len < CHUNK) {
		o[1 + c->len] = SD_CLIP_EOS;
		for (int i = c->len + 2; i < SD_CLIP_MAX_LEN; i++) o[i] = c->pad;
	}
	c->n++;
	c->len = 0;
	c->last_comma = -1;
	return 0;
}

int sd_prompt_tokenize(const sd_tokenizer *tok, const char *text, size_t len, int weighting, int32_t pad_id,
                       int32_t **ids, float **weights, int *nchunks)
{
	sd_prompt_span *s = NULL, plain = {(char *)text, len, 1.0f};
	int ns = 1;
	*ids = NULL;
	*weights = NULL;
	*nchunks = 0;
	if (weighting && sd_prompt_parse(text, len, &s, &ns)) return -1;
	const sd_prompt_span *sp = weighting ? s : &plain;
	const int32_t comma = sd_tokenizer_token_id(tok, ",</w>");
	struct chunks c = {.last_comma = -1, .pad = pad_id};
	for (int k = 0; k < ns; k++) {
		int32_t *t;
		int nt;
		if (sd_tokenize(tok, sp[k].text, sp[k].len, &t, &nt)) goto fail;
		for (int p = 1; p < nt - 1; p++) { /* without BOS and EOS */
			if (t[p] == comma && comma >= 0) {
				c.last_comma = c.len;
			} else if (c.len == CHUNK && c.last_comma != -1 && c.len - c.last_comma <= BACKTRACK) {
				int at = c.last_comma + 1, nmove = c.len - at;
				int32_t mv[CHUNK];
				float mw[CHUNK];
				memcpy(mv, c.cur + at, nmove * sizeof *mv);
				memcpy(mw, c.curw + at, nmove * sizeof *mw);
				c.len = at;
				if (finish(&c)) { free(t); goto fail; }
				memcpy(c.cur, mv, nmove * sizeof *mv);
				memcpy(c.curw, mw, nmove * sizeof *mw);
				c.len = nmove;
			}
			if (c.len == CHUNK && finish(&c)) { free(t); goto fail; }
			c.cur[c.len] = t[p];
			c.curw[c.len] = sp[k].weight;
			c.len++;
		}
		free(t);
	}
	if ((c.len > 0 || c.n == 0) && finish(&c)) goto fail;
	sd_prompt_spans_free(s, ns);
	*ids = c.ids;
	*weights = c.w;
	*nchunks = c.n;
	return 0;
fail:
	sd_prompt_spans_free(s, ns);
	free(c.ids);
	free(c.w);
	return -1;
}

int sd_prompt_pad_chunks(int32_t **ids, float **weights, int *nchunks, int want, int32_t pad_id)
{
	if (*nchunks >= want) return 0;
	struct chunks c = {.ids = *ids, .w = *weights, .n = *nchunks, .last_comma = -1, .pad = pad_id};
	while (c.n < want)
		if (finish(&c)) break;
	*ids = c.ids;
	*weights = c.w;
	*nchunks = c.n;
	return c.n < want ? -1 : 0;
}

/* ==== encoding ==== */

int sd_prompt_encode(sd_clip *c, sd_tensor *out, const sd_tensor *tokens, const sd_tensor *weights, int clip_skip)
{
	const int64_t N = tokens->shape[0], L = tokens->shape[1], D = out->shape[2];
	if (L <= SD_CLIP_MAX_LEN && !weights) return sd_clip_encode(c, out, tokens, clip_skip, NULL);
	if (L % SD_CLIP_MAX_LEN)
		return sd_seterr("%lld tokens: a long prompt comes in chunks of %d (sd-tokenize makes them)",
		                 (long long)L, SD_CLIP_MAX_LEN);
	if (weights && (weights->ndim != 2 || weights->shape[0] != N || weights->shape[1] != L ||
	                weights->dtype != SD_DTYPE_F32))
		return sd_seterr("the weights must be f32 [%lld,%lld] like the tokens", (long long)N, (long long)L);
	const int64_t k = L / SD_CLIP_MAX_LEN;
	sd_tensor *ids = sd_tensor_newv(SD_DTYPE_I32, 2, N, (int64_t)SD_CLIP_MAX_LEN);
	sd_tensor *z = sd_tensor_newv(SD_DTYPE_F32, 3, N, (int64_t)SD_CLIP_MAX_LEN, D);
	sd_tensor *t32 = sd_tensor_convert(tokens, SD_DTYPE_I32);
	int rc = -1;
	if (!ids || !z || !t32) goto done;
	for (int64_t j = 0; j < k; j++) {
		for (int64_t n = 0; n < N; n++)
			memcpy((int32_t *)ids->data + n * SD_CLIP_MAX_LEN,
			       (const int32_t *)t32->data + n * L + j * SD_CLIP_MAX_LEN, SD_CLIP_MAX_LEN * sizeof(int32_t));
		if (sd_clip_encode(c, z, ids, clip_skip, NULL)) goto done;
		for (int64_t n = 0; n < N; n++) {
			float *zr = (float *)z->data + n * SD_CLIP_MAX_LEN * D;
			if (weights) {
				/* A1111's original emphasis: z *= w; z *= old mean / new mean */
				const float *wr = (const float *)weights->data + n * L + j * SD_CLIP_MAX_LEN;
				double m0 = 0, m1 = 0;
				for (int64_t i = 0; i < SD_CLIP_MAX_LEN * D; i++) m0 += zr[i];
				for (int64_t t = 0; t < SD_CLIP_MAX_LEN; t++)
					for (int64_t d = 0; d < D; d++) {
						zr[t * D + d] *= wr[t];
						m1 += zr[t * D + d];
					}
				if (m1 != 0) {
					float f = (float)(m0 / m1);
					for (int64_t i = 0; i < SD_CLIP_MAX_LEN * D; i++) zr[i] *= f;
				}
			}
			memcpy((float *)out->data + (n * L + j * SD_CLIP_MAX_LEN) * D, zr,
			       SD_CLIP_MAX_LEN * D * sizeof(float));
		}
	}
	rc = 0;
done:
	if (rc && !t32) sd_seterr("out of memory");
	sd_tensor_free(ids);
	sd_tensor_free(z);
	sd_tensor_free(t32);
	return rc;
}
