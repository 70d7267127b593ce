/*
 * tokenizer.c - the CLIP tokenizer of Stable Diffusion 1.x/2.x, exactly as Hugging Face's CLIPTokenizer
 * (transformers/models/clip/tokenization_clip.py) with ftfy installed, which is also openai CLIP's
 * SimpleTokenizer on ordinary prompts.
 *
 *   1. the text is split at the literal special tokens "<|startoftext|>" and "<|endoftext|>" (the added-
 *      token trie of PreTrainedTokenizer.tokenize); each of them becomes its id;
 *   2. every other piece: ftfy.fix_text, whitespace runs -> one space, strip, str.lower (unicode.c);
 *   3. pre-tokenisation with  <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|
 *      [^\s\p{L}\p{N}]+  (case-insensitive);
 *   4. each piece -> UTF-8 bytes -> GPT-2's byte-to-unicode symbols, "</w>" appended to the last one ->
 *      byte-pair merges by merges.txt rank (all occurrences of the best pair per round) -> vocab ids;
 *   5. BOS (49406) + ids + EOS (49407); the padded form truncates keeping a final EOS.
 *
 * Where openai's SimpleTokenizer differs (it agrees on all the golden prompts), this follows Hugging Face:
 * no html.unescape after ftfy (ftfy itself decodes entities unless the text holds '<'), and the special
 * tokens are split off the raw text before cleaning.  BPE runs with a heap over a linked list of symbols,
 * O(n log n) per word, so even a megabyte-long word is quick.
 */
#include "sd.h"

#include <jansson.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "unicode.h"

#define MERGES_FILE "clip-merges.txt"
/* CLIPTokenizer and SimpleTokenizer read at most this many merges (49152 - 256 - 2). */
#define MAX_MERGES (49152 - 256 - 2)

typedef struct {
	uint32_t off;          /* in tok->str */
	unsigned len : 31;
	unsigned extra : 1;    /* not in the vocabulary: a merge part or result it lacks (id = unk) */
	int32_t id;            /* the vocabulary id */
} symbol;

typedef struct {
	uint64_t key; /* left << 32 | right (symbol indices); 0 marks an empty slot (index pairs start at 1) */
	int32_t rank, merged;
} pair_slot;

struct sd_tokenizer {
	char *str;            /* every symbol's bytes, one after another */
	size_t nstr, capstr;
	symbol *sym;
	int32_t nsym, capsym;
	int32_t *slot;        /* open-addressing hash: symbol index + 1, 0 = empty */
	uint32_t nslot;
	pair_slot *pairs;     /* merge ranks */
	uint32_t npairs;
	int32_t nvocab;       /* symbols that are vocabulary entries */
	int32_t byte_sym[256], byte_end_sym[256]; /* the symbol of byte b, and of b + "</w>" */
	int32_t bos, eos, unk;
};

/* ==== symbol table ==== */

static uint64_t hash_bytes(const char *s, size_t n)
{
	uint64_t h = 1469598103934665603ull;
	for (size_t i = 0; i < n; i++)
		h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
	return h;
}

/* Index of the symbol with bytes s[0..n), or -1. */
static int32_t sym_find(const sd_tokenizer *t, const char *s, size_t n)
{
	uint32_t mask = t->nslot - 1;
	for (uint32_t h = (uint32_t)hash_bytes(s, n) & mask;; h = (h + 1) & mask) {
		int32_t k = t->slot[h];
		if (!k)
			return -1;
		const symbol *y = &t->sym[k - 1];
		if (y->len == n && memcmp(t->str + y->off, s, n) == 0)
			return k - 1;
	}
}

static int grow_slots(sd_tokenizer *t)
{
	uint32_t n = t->nslot ? t->nslot * 2 : 1u << 17;
	int32_t *s = calloc(n, sizeof *s);
	if (!s)
		return -1;
	for (int32_t i = 0; i < t->nsym; i++) {
		const symbol *y = &t->sym[i];
		uint32_t h = (uint32_t)hash_bytes(t->str + y->off, y->len) & (n - 1);
		while (s[h])
			h = (h + 1) & (n - 1);
		s[h] = i + 1;
	}
	free(t->slot);
	t->slot = s;
	t->nslot = n;
	return 0;
}

/* Add a symbol (which must be absent) with vocabulary id `id`; its index, or -1 when out of memory. */
static int32_t sym_add(sd_tokenizer *t, const char *s, size_t n, int32_t id)
{
	if ((uint64_t)(t->nsym + 1) * 2 > t->nslot && grow_slots(t))
		return -1;
	if (t->nsym == t->capsym) {
		int32_t cap = t->capsym ? t->capsym * 2 : 65536;
		symbol *p = realloc(t->sym, (size_t)cap * sizeof *p);
		if (!p)
			return -1;
		t->sym = p;
		t->capsym = cap;
	}
	/* !t->str: allocate on the first symbol even when it is empty ("" in a hostile vocab.json), so that
	 * t->str + off below and in sym_find never offsets a null pointer (found by fuzz_tokenizer) */
	if (!t->str || t->capstr - t->nstr < n) {
		size_t cap = t->capstr ? t->capstr : 1 << 20;
		while (cap - t->nstr < n)
			cap *= 2;
		char *p = realloc(t->str, cap);
		if (!p)
			return -1;
		t->str = p;
		t->capstr = cap;
	}
	memcpy(t->str + t->nstr, s, n);
	symbol *y = &t->sym[t->nsym];
	y->off = (uint32_t)t->nstr;
	y->len = (uint32_t)n;
	y->extra = 0;
	y->id = id;
	t->nvocab++;
	t->nstr += n;
	uint32_t mask = t->nslot - 1, h = (uint32_t)hash_bytes(s, n) & mask;
	while (t->slot[h])
		h = (h + 1) & mask;
	t->slot[h] = t->nsym + 1;
	return t->nsym++;
}

/* The symbol of s[0..n), added with the unknown id when the vocabulary lacks it; -1 when out of memory. */
static int32_t sym_get(sd_tokenizer *t, const char *s, size_t n)
{
	int32_t k = sym_find(t, s, n);
	if (k >= 0)
		return k;
	if ((k = sym_add(t, s, n, t->unk)) >= 0) {
		t->sym[k].extra = 1;
		t->nvocab--;
	}
	return k;
}

/* Give s[0..n) the vocabulary id `id`, adding it or overwriting an earlier one (a Python dict built from
 * a list keeps the last index of a repeated key).  0, or -1 when out of memory. */
static int set_id(sd_tokenizer *t, const char *s, size_t n, int32_t id)
{
	int32_t k = sym_find(t, s, n);
	if (k >= 0) {
		if (t->sym[k].extra)
			t->nvocab++;
		t->sym[k].extra = 0;
		t->sym[k].id = id;
		return 0;
	}
	return sym_add(t, s, n, id) < 0 ? -1 : 0;
}

/* ==== merge ranks ==== */

static pair_slot *pair_find(const sd_tokenizer *t, uint64_t key)
{
	uint32_t mask = t->npairs - 1;
	for (uint32_t h = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & mask;; h = (h + 1) & mask) {
		pair_slot *p = &t->pairs[h];
		if (p->key == key || p->key == 0)
			return p;
	}
}

static uint64_t pair_key(int32_t a, int32_t b)
{
	return (uint64_t)(uint32_t)(a + 1) << 32 | (uint32_t)(b + 1);
}

/* ==== GPT-2 byte-to-unicode ==== */

/* The code points GPT-2's bytes_to_unicode gives the bytes, and the bytes in its listing order. */
static void byte_unicode(uint32_t cp[256], int order[256])
{
	int k = 0, extra = 0;
	for (int b = 0; b < 256; b++)
		if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) {
			cp[b] = b;
			order[k++] = b;
		}
	for (int b = 0; b < 256; b++)
		if (!((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))) {
			cp[b] = 256 + extra++;
			order[k++] = b;
		}
}

/* ==== loading ==== */

void sd_tokenizer_free(sd_tokenizer *t)
{
	if (!t)
		return;
	free(t->str);
	free(t->sym);
	free(t->slot);
	free(t->pairs);
	free(t);
}

static sd_tokenizer *tok_new(void)
{
	sd_tokenizer *t = calloc(1, sizeof *t);
	if (!t || grow_slots(t)) {
		sd_tokenizer_free(t);
		sd_seterr("cannot load the CLIP tokenizer: out of memory");
		return NULL;
	}
	t->unk = SD_CLIP_EOS;
	return t;
}

/* Fill in byte symbols and special-token ids once the vocabulary is known. */
static int finish_symbols(sd_tokenizer *t)
{
	uint32_t cp[256];
	int order[256];
	byte_unicode(cp, order);
	for (int b = 0; b < 256; b++) {
		unsigned char u[8];
		int n = uni_utf8_put(cp[b], u);
		memcpy(u + n, "</w>", 4);
		if ((t->byte_sym[b] = sym_get(t, (char *)u, n)) < 0 ||
		    (t->byte_end_sym[b] = sym_get(t, (char *)u, n + 4)) < 0)
			return sd_seterr("out of memory");
	}
	int32_t k = sym_find(t, "<|startoftext|>", 15);
	t->bos = k >= 0 ? t->sym[k].id : SD_CLIP_BOS;
	k = sym_find(t, "<|endoftext|>", 13);
	t->eos = k >= 0 ? t->sym[k].id : SD_CLIP_EOS;
	return 0;
}

/*
 * Read merges.txt (text of n bytes) the way CLIPTokenizer does: skip the first line ("#version: 0.2"),
 * take at most MAX_MERGES lines of two symbols each; rank = line order (a repeated pair keeps the later
 * rank).  With add_vocab (no vocab.json), the vocabulary is built as SimpleTokenizer does: the 256 byte
 * symbols in bytes_to_unicode order, the same with "</w>", every merge joined, the two special tokens.
 */
static int load_merges(sd_tokenizer *t, const char *path, char *text, size_t n, int add_vocab)
{
	uint32_t cp[256];
	int order[256];
	int32_t next_id = 0;
	if (add_vocab) {
		byte_unicode(cp, order);
		for (int pass = 0; pass < 2; pass++)
			for (int i = 0; i < 256; i++) {
				unsigned char u[8];
				int len = uni_utf8_put(cp[order[i]], u);
				if (pass)
					memcpy(u + len, "</w>", 4), len += 4;
				if (set_id(t, (char *)u, len, next_id++))
					return sd_seterr("out of memory");
			}
	}
	/* count lines for the pair table */
	size_t lines = 0;
	for (size_t i = 0; i < n; i++)
		lines += text[i] == '\n';
	uint32_t np = 1024;
	while (np < 2 * (lines + 1))
		np *= 2;
	t->pairs = calloc(np, sizeof *t->pairs);
	if (!t->pairs)
		return sd_seterr("out of memory");
	t->npairs = np;

	/* Python: text.strip().split("\n")[1 : MAX_MERGES + 1], each line .split() */
	size_t b = 0, e = n;
	while (b < e && (text[b] == ' ' || (text[b] >= '\t' && text[b] <= '\r')))
		b++;
	while (e > b && (text[e - 1] == ' ' || (text[e - 1] >= '\t' && text[e - 1] <= '\r')))
		e--;
	size_t pos = b;
	long lineno = 0;
	int32_t rank = 0;
	char *join = NULL;
	size_t joincap = 0;
	while (pos < e && rank < MAX_MERGES) {
		size_t end = pos;
		while (end < e && text[end] != '\n')
			end++;
		lineno++;
		if (lineno > 1) {
			const char *w[3];
			size_t wl[3];
			int nw = 0;
			for (size_t i = pos; i < end;) {
				while (i < end && (text[i] == ' ' || (text[i] >= '\t' && text[i] <= '\r')))
					i++;
				if (i >= end)
					break;
				size_t j = i;
				while (j < end && !(text[j] == ' ' || (text[j] >= '\t' && text[j] <= '\r')))
					j++;
				if (nw < 3) {
					w[nw] = text + i;
					wl[nw] = j - i;
				}
				nw++;
				i = j;
			}
			if (nw != 2) {
				free(join);
				return sd_seterr("%s:%ld: expected two symbols separated by a space", path, lineno);
			}
			if (joincap < wl[0] + wl[1]) {
				joincap = 2 * (wl[0] + wl[1]);
				char *p = realloc(join, joincap);
				if (!p) {
					free(join);
					return sd_seterr("out of memory");
				}
				join = p;
			}
			memcpy(join, w[0], wl[0]);
			memcpy(join + wl[0], w[1], wl[1]);
			int32_t m;
			if (add_vocab && set_id(t, join, wl[0] + wl[1], next_id++))
				m = -1;
			else
				m = sym_get(t, join, wl[0] + wl[1]);
			int32_t a = sym_get(t, w[0], wl[0]), c = sym_get(t, w[1], wl[1]);
			if (a < 0 || c < 0 || m < 0) {
				free(join);
				return sd_seterr("out of memory");
			}
			pair_slot *p = pair_find(t, pair_key(a, c));
			p->key = pair_key(a, c);
			p->rank = rank++;
			p->merged = m;
		}
		pos = end + 1;
	}
	free(join);
	if (add_vocab) {
		if (set_id(t, "<|startoftext|>", 15, next_id) || set_id(t, "<|endoftext|>", 13, next_id + 1))
			return sd_seterr("out of memory");
	}
	return 0;
}

/* Load vocab.json (an object of token -> id) into the symbol table. */
static int load_vocab(sd_tokenizer *t, const char *path)
{
	json_error_t err;
	json_t *root = json_load_file(path, 0, &err);
	if (!root && err.line > 0)
		return sd_seterr("%s:%d: %s", path, err.line, err.text);
	if (!root)
		return sd_seterr("%s", err.text);
	if (!json_is_object(root)) {
		json_decref(root);
		return sd_seterr("%s: not a JSON object of token -> id", path);
	}
	const char *key;
	json_t *val;
	json_object_foreach(root, key, val) {
		if (!json_is_integer(val) || json_integer_value(val) < 0 || json_integer_value(val) > INT32_MAX) {
			/* the message first: key belongs to root (found by fuzz_tokenizer: a use after free) */
			sd_seterr("%s: the id of \"%s\" is not a non-negative integer", path, key);
			json_decref(root);
			return -1;
		}
		size_t len = strlen(key);
		if (sym_find(t, key, len) >= 0)
			continue;
		if (sym_add(t, key, len, (int32_t)json_integer_value(val)) < 0) {
			json_decref(root);
			return sd_seterr("out of memory");
		}
	}
	json_decref(root);
	if (t->nsym == 0)
		return sd_seterr("%s: empty vocabulary", path);
	return 0;
}

static int file_exists(const char *p)
{
	return access(p, R_OK) == 0;
}

/* out = a + b + c when it fits in cap bytes (0), else -1. */
static int join3(char *out, size_t cap, const char *a, const char *b, const char *c)
{
	size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
	if (la + lb + lc >= cap)
		return -1;
	memcpy(out, a, la);
	memcpy(out + la, b, lb);
	memcpy(out + la + lb, c, lc + 1);
	return 0;
}

/*
 * Find the shipped clip-merges.txt: $SD_DATADIR, the compile-time SD_DATADIR (the install's
 * share/sdpipe), then next to the executable (../lib/models/data, ../share/sdpipe, ../../lib/models/data
 * for build/tests/).  The path goes to out (cap bytes); on failure the message lists every place tried.
 */
static int find_datafile(char *out, size_t cap)
{
	static const char *const rel[] = {"/../lib/models/data", "/../share/sdpipe", "/../../lib/models/data"};
	char dirs[5][PATH_MAX], tried[4 * PATH_MAX] = "";
	int nd = 0;
	const char *env = getenv("SD_DATADIR");
	if (env && *env && !join3(dirs[nd], PATH_MAX, env, "", ""))
		nd++;
#ifdef SD_DATADIR
	if (!join3(dirs[nd], PATH_MAX, SD_DATADIR, "", ""))
		nd++;
#endif
	char exe[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	char *slash = n > 0 ? (exe[n] = 0, strrchr(exe, '/')) : NULL;
	if (slash) {
		*slash = 0;
		for (int i = 0; i < 3; i++)
			if (!join3(dirs[nd], PATH_MAX, exe, rel[i], ""))
				nd++;
	}
	for (int i = 0; i < nd; i++) {
		if (!join3(out, cap, dirs[i], "/", MERGES_FILE) && file_exists(out))
			return 0;
		size_t used = strlen(tried);
		join3(tried + used, sizeof tried - used, used ? ", " : "", dirs[i], "");
	}
	return sd_seterr("%s not found (looked in %s); set SD_DATADIR to the folder that holds it",
	                 MERGES_FILE, nd ? tried : "no folder");
}

sd_tokenizer *sd_tokenizer_load(const char *dir)
{
	char path[PATH_MAX];
	sd_tokenizer *t = tok_new();
	if (!t)
		return NULL;
	if (dir) {
		if (join3(path, sizeof path, dir, "/", "vocab.json")) {
			sd_seterr("%s: folder name too long", dir);
			goto fail;
		}
		if (load_vocab(t, path))
			goto fail;
		join3(path, sizeof path, dir, "/", "merges.txt");
	} else if (find_datafile(path, sizeof path))
		goto fail;
	size_t n;
	char *text = sd_read_file(path, 64u << 20, &n);
	if (!text)
		goto fail;
	int rc = load_merges(t, path, text, n, dir == NULL);
	free(text);
	if (rc || finish_symbols(t))
		goto fail;
	return t;
fail:
	sd_preerr("cannot load the CLIP tokenizer");
	sd_tokenizer_free(t);
	return NULL;
}

int sd_tokenizer_vocab_size(const sd_tokenizer *t)
{
	return t ? t->nvocab : 0;
}

int32_t sd_tokenizer_token_id(const sd_tokenizer *t, const char *token)
{
	if (!t || !token)
		return -1;
	int32_t k = sym_find(t, token, strlen(token));
	return k >= 0 && !t->sym[k].extra ? t->sym[k].id : -1;
}

/* ==== BPE ==== */

typedef struct {
	int32_t rank, pos, left, rpos, right;
} heap_ent;

typedef struct {
	int32_t *sym, *next, *prev;
	heap_ent *heap, *pend;
	size_t nheap, npend, cap;
	int32_t *ids; /* output */
	size_t nids, capids;
} scratch;

static int heap_less(const heap_ent *a, const heap_ent *b)
{
	return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(scratch *s, heap_ent e)
{
	size_t i = s->nheap++;
	while (i > 0) {
		size_t p = (i - 1) / 2;
		if (!heap_less(&e, &s->heap[p]))
			break;
		s->heap[i] = s->heap[p];
		i = p;
	}
	s->heap[i] = e;
}

static heap_ent heap_pop(scratch *s)
{
	heap_ent top = s->heap[0], last = s->heap[--s->nheap];
	size_t i = 0, n = s->nheap;
	for (;;) {
		size_t l = 2 * i + 1, m = i;
		const heap_ent *best = &last;
		if (l < n && heap_less(&s->heap[l], best))
			m = l, best = &s->heap[l];
		if (l + 1 < n && heap_less(&s->heap[l + 1], best))
			m = l + 1;
		if (m == i)
			break;
		s->heap[i] = s->heap[m];
		i = m;
	}
	if (n)
		s->heap[i] = last;
	return top;
}

static int scratch_reserve(scratch *s, size_t n)
{
	if (n <= s->cap)
		return 0;
	size_t cap = s->cap ? s->cap : 64;
	while (cap < n)
		cap *= 2;
	int32_t *a = realloc(s->sym, cap * sizeof *a);
	if (a)
		s->sym = a;
	int32_t *b = realloc(s->next, cap * sizeof *b);
	if (b)
		s->next = b;
	int32_t *c = realloc(s->prev, cap * sizeof *c);
	if (c)
		s->prev = c;
	/* each merge adds at most two pairs, plus the n - 1 initial ones */
	heap_ent *h = realloc(s->heap, 3 * cap * sizeof *h);
	if (h)
		s->heap = h;
	heap_ent *p = realloc(s->pend, 3 * cap * sizeof *p);
	if (p)
		s->pend = p;
	if (!a || !b || !c || !h || !p)
		return -1;
	s->cap = cap;
	return 0;
}

static int push_id(scratch *s, int32_t id)
{
	if (s->nids == s->capids) {
		size_t cap = s->capids ? s->capids * 2 : 256;
		int32_t *p = realloc(s->ids, cap * sizeof *p);
		if (!p)
			return -1;
		s->ids = p;
		s->capids = cap;
	}
	s->ids[s->nids++] = id;
	return 0;
}

/* The heap entry for the pair starting at node p (with next[p] >= 0) when the pair has a rank. */
static int make_pair(const sd_tokenizer *t, const scratch *s, int32_t p, heap_ent *e)
{
	int32_t q = s->next[p];
	const pair_slot *ps = pair_find(t, pair_key(s->sym[p], s->sym[q]));
	if (!ps->key)
		return 0;
	*e = (heap_ent){ps->rank, p, s->sym[p], q, s->sym[q]};
	return 1;
}

static int valid(const scratch *s, const heap_ent *e)
{
	return s->sym[e->pos] == e->left && s->next[e->pos] == e->rpos && e->rpos >= 0 &&
	       s->sym[e->rpos] == e->right;
}

/*
 * BPE of one pre-token (its UTF-8 bytes): the ids are appended to s->ids.  Each round merges every
 * occurrence (left to right, not overlapping) of the lowest-ranked adjacent pair, as CLIPTokenizer.bpe;
 * pairs created during a round wait for the next one.
 */
static int bpe(const sd_tokenizer *t, scratch *s, const unsigned char *bytes, size_t n)
{
	if (scratch_reserve(s, n))
		return -1;
	for (size_t i = 0; i < n; i++) {
		s->sym[i] = i + 1 < n ? t->byte_sym[bytes[i]] : t->byte_end_sym[bytes[i]];
		s->next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
		s->prev[i] = (int32_t)i - 1;
	}
	s->nheap = 0;
	for (size_t i = 0; i + 1 < n; i++) {
		heap_ent e;
		if (make_pair(t, s, (int32_t)i, &e))
			heap_push(s, e);
	}
	while (s->nheap) {
		heap_ent e = heap_pop(s);
		if (!valid(s, &e))
			continue;
		int32_t rank = e.rank;
		s->npend = 0;
		for (;;) {
			const pair_slot *ps = pair_find(t, pair_key(e.left, e.right));
			int32_t p = e.pos, q = e.rpos;
			s->sym[p] = ps->merged;
			s->next[p] = s->next[q];
			if (s->next[q] >= 0)
				s->prev[s->next[q]] = p;
			s->sym[q] = -1;
			s->next[q] = -1;
			heap_ent x;
			if (s->prev[p] >= 0 && make_pair(t, s, s->prev[p], &x))
				s->pend[s->npend++] = x;
			if (s->next[p] >= 0 && make_pair(t, s, p, &x))
				s->pend[s->npend++] = x;
			/* the rest of this round: the same pair further right */
			int found = 0;
			while (s->nheap && s->heap[0].rank == rank) {
				e = heap_pop(s);
				if (valid(s, &e)) {
					found = 1;
					break;
				}
			}
			if (!found)
				break;
		}
		for (size_t i = 0; i < s->npend; i++)
			heap_push(s, s->pend[i]);
	}
	for (int32_t p = 0; p >= 0; p = s->next[p])
		if (push_id(s, t->sym[s->sym[p]].id))
			return -1;
	return 0;
}

/* ==== pre-tokenisation ==== */

/* Simple case folding of what can reach the case-insensitive literals (the text is already lower-case). */
static uint32_t fold(uint32_t c)
{
	return c == 0x17F ? 's' : c; /* LATIN SMALL LETTER LONG S folds to s */
}

static int match_lit(const uint32_t *s, size_t n, size_t i, const char *lit)
{
	size_t k = strlen(lit);
	if (n - i < k)
		return 0;
	for (size_t j = 0; j < k; j++)
		if (fold(s[i + j]) != (uint32_t)lit[j])
			return 0;
	return 1;
}

/* Emit the BPE ids of s[a..b) (code points). */
static int emit_piece(const sd_tokenizer *t, scratch *s, const uint32_t *cp, size_t a, size_t b,
                      unsigned char **buf, size_t *cap)
{
	size_t need = 4 * (b - a);
	if (need > *cap) {
		unsigned char *p = realloc(*buf, need);
		if (!p)
			return -1;
		*buf = p;
		*cap = need;
	}
	size_t n = 0;
	for (size_t i = a; i < b; i++)
		n += uni_utf8_put(cp[i], *buf + n);
	return bpe(t, s, *buf, n);
}

/* Steps 3-4 on cleaned, lower-cased text. */
static int encode_clean(const sd_tokenizer *t, scratch *s, const uint32_t *c, size_t n)
{
	static const char *const contractions[] = {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
	unsigned char *buf = NULL;
	size_t cap = 0;
	int rc = -1;
	for (size_t i = 0; i < n;) {
		if (c[i] == '<' && match_lit(c, n, i, "<|startoftext|>")) {
			if (push_id(s, t->bos))
				goto done;
			i += 15;
			continue;
		}
		if (c[i] == '<' && match_lit(c, n, i, "<|endoftext|>")) {
			if (push_id(s, t->eos))
				goto done;
			i += 13;
			continue;
		}
		size_t j = i;
		if (c[i] == '\'') {
			for (int k = 0; k < 7 && j == i; k++)
				if (match_lit(c, n, i, contractions[k]))
					j = i + strlen(contractions[k]);
		}
		if (j == i) {
			if (uni_is_letter(c[i])) {
				while (j < n && uni_is_letter(c[j]))
					j++;
			} else if (uni_is_number(c[i]))
				j = i + 1;
			else if (uni_is_space(c[i])) {
				i++;
				continue;
			} else {
				while (j < n && !uni_is_space(c[j]) && !uni_is_letter(c[j]) && !uni_is_number(c[j]))
					j++;
			}
		}
		if (emit_piece(t, s, c, i, j, &buf, &cap))
			goto done;
		i = j;
	}
	rc = 0;
done:
	free(buf);
	return rc;
}

/* Step 2 on one piece of raw text, then steps 3-4. */
static int encode_chunk(const sd_tokenizer *t, scratch *s, const uint32_t *raw, size_t n)
{
	uni_buf fixed = {0}, ws = {0}, low = {0};
	int rc = -1;
	if (uni_fix_text(raw, n, &fixed))
		goto done;
	/* whitespace_clean: re.sub(r"\s+", " ", text).strip() */
	for (size_t i = 0; i < fixed.n;) {
		if (uni_is_space(fixed.p[i])) {
			while (i < fixed.n && uni_is_space(fixed.p[i]))
				i++;
			if (ws.n && i < fixed.n && uni_push(&ws, ' '))
				goto done;
		} else if (uni_push(&ws, fixed.p[i++]))
			goto done;
	}
	if (uni_lower(ws.p, ws.n, &low))
		goto done;
	rc = encode_clean(t, s, low.p, low.n);
done:
	uni_buf_free(&fixed);
	uni_buf_free(&ws);
	uni_buf_free(&low);
	return rc;
}

/* 1 when s[i..] starts with the ASCII literal lit (exactly). */
static int raw_lit(const uint32_t *s, size_t n, size_t i, const char *lit)
{
	size_t k = strlen(lit);
	if (n - i < k)
		return 0;
	for (size_t j = 0; j < k; j++)
		if (s[i + j] != (uint32_t)lit[j])
			return 0;
	return 1;
}

static void scratch_free(scratch *s)
{
	free(s->sym);
	free(s->next);
	free(s->prev);
	free(s->heap);
	free(s->pend);
	free(s->ids);
}

int sd_tokenize(const sd_tokenizer *t, const char *text, size_t len, int32_t **ids, int *n)
{
	uni_buf cp = {0};
	scratch s = {0};
	size_t bad = 0;
	*ids = NULL;
	*n = 0;
	if (!t)
		return sd_seterr("tokenize: no tokenizer");
	if (!text && len)
		return sd_seterr("tokenize: no text");
	int r = uni_from_utf8(text, len, &cp, &bad);
	if (r == -2) {
		uni_buf_free(&cp);
		return sd_seterr("tokenize: the prompt is not valid UTF-8 (byte %zu of %zu: 0x%02x)", bad, len,
		                 (unsigned char)text[bad]);
	}
	if (r || push_id(&s, t->bos))
		goto oom;
	/* step 1: the added-token split on the raw text (case-sensitive, as the added-token trie) */
	size_t start = 0;
	for (size_t i = 0; i <= cp.n;) {
		size_t L = 0;
		int32_t id = 0;
		if (i < cp.n && cp.p[i] == '<') {
			if (raw_lit(cp.p, cp.n, i, "<|startoftext|>"))
				L = 15, id = t->bos;
			else if (raw_lit(cp.p, cp.n, i, "<|endoftext|>"))
				L = 13, id = t->eos;
		}
		if (i < cp.n && !L) {
			i++;
			continue;
		}
		if (i > start && encode_chunk(t, &s, cp.p + start, i - start))
			goto oom;
		if (i == cp.n)
			break;
		if (push_id(&s, id))
			goto oom;
		i += L;
		start = i;
	}
	if (push_id(&s, t->eos))
		goto oom;
	if (s.nids > INT_MAX)
		goto oom;
	uni_buf_free(&cp);
	*ids = s.ids;
	*n = (int)s.nids;
	s.ids = NULL;
	scratch_free(&s);
	return 0;
oom:
	uni_buf_free(&cp);
	scratch_free(&s);
	return sd_seterr("tokenize: out of memory");
}

int sd_tokenize_padded(const sd_tokenizer *t, const char *text, size_t len, int32_t *out, int max_len,
                       int32_t pad_id, int *untruncated)
{
	if (max_len < 2)
		return sd_seterr("tokenize: max_len must be at least 2 (BOS and EOS), got %d", max_len);
	int32_t *ids;
	int n;
	if (sd_tokenize(t, text, len, &ids, &n))
		return -1;
	if (untruncated)
		*untruncated = n;
	if (n > max_len) {
		memcpy(out, ids, (size_t)(max_len - 1) * sizeof *out);
		out[max_len - 1] = t->eos;
	} else {
		memcpy(out, ids, (size_t)n * sizeof *out);
		for (int i = n; i < max_len; i++)
			out[i] = pad_id;
	}
	free(ids);
	return 0;
}
