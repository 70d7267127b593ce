/*
 * sd-tokenize - prompts to CLIP token ids, one frame per prompt (see sd-tokenize(1)).
 *
 *   sd-tokenize "a photo in the style of **" | sd-text-encode -m model | sd-info
 *
 * A source in sd-tensor(5) terms: each prompt (the PROMPT arguments, then the lines of each -f FILE)
 * becomes {"prompt": text, "tokens": i32 [1,77k], "negative_prompt": text, "uncond_tokens": i32 [1,77k]}
 * (k chunks of 77, both padded to the same k; "weights" f32 [1,77k] when brackets weight the prompt),
 * as diffusers' StableDiffusionPipeline tokenizes them (the negative prompt is "" without --negative:
 * the unconditional half of classifier-free guidance); an SDXL model's second tokenizer adds "tokens_2"
 * and "uncond_tokens_2" (its own padding).  All input is read and checked before the
 * first frame is written, so bad input leaves stdout empty.
 */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "sd.h"
#include "sd_cli.h"

/* The longest line -f accepts, in bytes (without its newline).  CLIP keeps 77 tokens, a few hundred
 * bytes of English; a longer line is taken to be a binary file or a missing newline. */
#define MAX_LINE 65536

struct prompt {
	char *text;
	size_t len;
	int owned;      /* text is malloc'd (a file line), not argv */
	char where[96]; /* "argument 2", "prompts.txt: line 7" */
};

struct opts {
	const char *model, *config, *vocab, *negative;
	const char **files;
	int nfiles, no_weighting;
};

static void usage(void)
{
	printf("Usage: %s [OPTION]... [PROMPT]...\n"
	       "Tokenize prompts for the CLIP text encoder: one frame per prompt with \"prompt\",\n"
	       "\"tokens\" (i32 [1,77k]), \"negative_prompt\" and \"uncond_tokens\" (i32 [1,77k]),\n"
	       "in chunks of 77 (A1111's long prompts), and \"weights\"/\"uncond_weights\" (f32 [1,77k])\n"
	       "when the prompt has (word:1.2), (word) or [word] weights; with an SDXL model also\n"
	       "\"tokens_2\" and \"uncond_tokens_2\" from its second tokenizer.\n"
	       "Prompts are the PROMPT arguments, then the lines of each -f FILE; with neither,\n"
	       "the lines of standard input.\n"
	       "\n"
	       "  -f, --file FILE        read one prompt per line (- is standard input; repeatable;\n"
	       "                         empty lines are skipped, lines are at most %d bytes)\n"
	       "  -n, --negative TEXT    the negative prompt of every frame (default: empty)\n"
	       "  -m, --model PATH       take the tokenizer of this model (default: $SD_MODEL)\n"
	       "      --config DIR       diffusers folder for a single-file model (its tokenizer/)\n"
	       "      --vocab DIR        a folder with vocab.json and merges.txt (overrides -m)\n"
	       "      --no-weighting     take brackets as text (no A1111 (word:1.2) weights)\n"
	       "  -v, --verbose          report the chunk count of each prompt\n"
	       "  -h, --help             display this help and exit\n"
	       "      --version          output version information and exit\n"
	       "\n"
	       "Without --vocab or a model, the CLIP vocabulary that ships with sdpipe is used.\n"
	       "Example: %s \"a photo in the style of **\" | sd-text-encode -m model | sd-info\n",
	       sd_prog, MAX_LINE, sd_prog);
	exit(0);
}

static void check_text(const struct prompt *p)
{
	long at = sd_utf8_invalid_at(p->text, p->len);
	if (at >= 0)
		sd_die("%s: not valid UTF-8 text (byte 0x%02X at offset %ld)", p->where,
		       (unsigned char)p->text[at], at);
	if (memchr(p->text, 0, p->len)) sd_die("%s: contains a NUL byte", p->where);
}

static struct prompt *prompts;
static size_t nprompts, cap;

static void add(char *text, size_t len, int owned, const char *where)
{
	if (nprompts == cap) {
		cap = cap ? 2 * cap : 16;
		if (!(prompts = realloc(prompts, cap * sizeof *prompts))) sd_die("out of memory");
	}
	struct prompt *p = &prompts[nprompts++];
	p->text = text;
	p->len = len;
	p->owned = owned;
	snprintf(p->where, sizeof p->where, "%s", where);
	check_text(p);
}

/* Every non-empty line of one file ("\n" or "\r\n" endings; a last line without one counts). */
static void read_file(const char *path)
{
	int is_stdin = !path || !strcmp(path, "-");
	const char *name = is_stdin ? "stdin" : path;
	FILE *f = sd_open_in(path);
	char *buf = malloc(MAX_LINE + 2);
	if (!buf) sd_die("out of memory");
	long line = 0;
	for (;;) {
		size_t n = 0;
		int c = EOF;
		while (n <= MAX_LINE && (c = getc(f)) != EOF && c != '\n') buf[n++] = (char)c;
		if (ferror(f)) sd_die("%s: read error", name);
		if (c == EOF && n == 0) break;
		line++;
		if (n > MAX_LINE) sd_die("%s: line %ld is longer than %d bytes", name, line, MAX_LINE);
		if (n && buf[n - 1] == '\r') n--;
		if (n) {
			char where[96], *t = malloc(n + 1);
			if (!t) sd_die("out of memory");
			memcpy(t, buf, n);
			t[n] = 0;
			snprintf(where, sizeof where, "%.60s: line %ld", name, line);
			add(t, n, 1, where);
		}
		if (c == EOF) break;
	}
	free(buf);
	if (!is_stdin) fclose(f);
}

/* The pad token of a diffusers tokenizer folder (tokenizer_config.json's pad_token, a string or
 * {"content": …}); <|endoftext|> (SD 1.x) when the folder does not say. */
static int32_t pad_id(const sd_tokenizer *tok, const char *dir)
{
	int32_t id = SD_CLIP_EOS;
	if (!dir) return id;
	char path[4096];
	snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
	json_t *root = json_load_file(path, 0, NULL);
	json_t *pad = root ? json_object_get(root, "pad_token") : NULL;
	if (json_is_object(pad)) pad = json_object_get(pad, "content");
	if (json_is_string(pad)) {
		int32_t k = sd_tokenizer_token_id(tok, json_string_value(pad));
		if (k < 0) sd_die("%s: pad_token '%s' is not in the vocabulary", path, json_string_value(pad));
		id = k;
	}
	json_decref(root);
	return id;
}

/* The tokens of p in 77-token chunks (lib/models/prompt.c), padded with empty chunks to `want`. */
struct toks {
	int32_t *ids;
	float *w;
	int k;
};

static struct toks tokenize(const sd_tokenizer *tok, const struct prompt *p, int32_t pad, int weighting)
{
	struct toks t;
	if (sd_prompt_tokenize(tok, p->text, p->len, weighting, pad, &t.ids, &t.w, &t.k) < 0)
		sd_die("%s: %s", p->where, sd_errmsg());
	sd_info("%s: %d chunk%s of 77 tokens", p->where, t.k, t.k == 1 ? "" : "s");
	return t;
}

/* frame[key] = ids as i32 [1,77k] and, when wkey is given and a weight is not 1, frame[wkey] = f32 [1,77k]. */
static void put(sd_value *f, const char *key, const char *wkey, struct toks t, int want, int32_t pad,
                const char *where)
{
	int32_t *ids = malloc((size_t)t.k * SD_CLIP_MAX_LEN * sizeof *ids);
	float *w = malloc((size_t)t.k * SD_CLIP_MAX_LEN * sizeof *w);
	int k = t.k;
	if (!ids || !w) sd_die("out of memory");
	memcpy(ids, t.ids, (size_t)k * SD_CLIP_MAX_LEN * sizeof *ids);
	memcpy(w, t.w, (size_t)k * SD_CLIP_MAX_LEN * sizeof *w);
	if (sd_prompt_pad_chunks(&ids, &w, &k, want, pad) < 0) sd_die("%s: %s", where, sd_errmsg());
	const int64_t L = (int64_t)k * SD_CLIP_MAX_LEN;
	int weighted = 0;
	for (int64_t i = 0; wkey && i < L; i++) weighted |= w[i] != 1.0f;
	sd_tensor *ti = sd_tensor_newv(SD_DTYPE_I32, 2, (int64_t)1, L);
	sd_tensor *tw = weighted ? sd_tensor_newv(SD_DTYPE_F32, 2, (int64_t)1, L) : NULL;
	if (!ti || (weighted && !tw)) sd_die("out of memory");
	memcpy(ti->data, ids, L * sizeof *ids);
	if (tw) memcpy(tw->data, w, L * sizeof *w);
	if (sd_map_set_tensor(f, key, ti) < 0 || (tw && sd_map_set_tensor(f, wkey, tw) < 0))
		sd_die("%s: %s", where, sd_errmsg());
	free(ids), free(w);
}

int main(int argc, char **argv)
{
	enum { OPT_VOCAB = 256, OPT_CONFIG, OPT_VERSION, OPT_NO_WEIGHTING };
	static const struct option longopts[] = {
		{"file", required_argument, NULL, 'f'},
		{"negative", required_argument, NULL, 'n'},
		{"model", required_argument, NULL, 'm'},
		{"config", required_argument, NULL, OPT_CONFIG},
		{"vocab", required_argument, NULL, OPT_VOCAB},
		{"no-weighting", no_argument, NULL, OPT_NO_WEIGHTING},
		{"verbose", no_argument, NULL, 'v'},
		{"help", no_argument, NULL, 'h'},
		{"version", no_argument, NULL, OPT_VERSION},
		{NULL, 0, NULL, 0},
	};
	struct opts o = {0};
	int c;

	sd_cli_init(argc, argv);
	if (!(o.files = calloc(argc, sizeof *o.files))) sd_die("out of memory");
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":f:n:m:vh", longopts, NULL)) != -1) {
		switch (c) {
		case 'f': o.files[o.nfiles++] = optarg; break;
		case 'n': o.negative = optarg; break;
		case 'm': o.model = optarg; break;
		case OPT_CONFIG: o.config = optarg; break;
		case OPT_VOCAB: o.vocab = optarg; break;
		case OPT_NO_WEIGHTING: o.no_weighting = 1; break;
		case 'v': sd_verbose = 1; break;
		case 'h': usage(); break;
		case OPT_VERSION: sd_print_version(); break;
		default: sd_bad_option(c, argv);
		}
	}
	if (o.model && !*o.model) sd_usage_error("--model: the path is empty");

	/* 1. every prompt, checked */
	for (int i = optind; i < argc; i++) {
		char where[32];
		snprintf(where, sizeof where, "argument %d", i - optind + 1);
		add(argv[i], strlen(argv[i]), 0, where);
	}
	for (int i = 0; i < o.nfiles; i++) read_file(o.files[i]);
	if (optind == argc && o.nfiles == 0) read_file(NULL);
	if (nprompts == 0) sd_die("no prompt given (empty input)");
	struct prompt neg = {.text = (char *)(o.negative ? o.negative : ""), .where = "--negative"};
	neg.len = strlen(neg.text);
	check_text(&neg);

	/* 2. the tokenizer: --vocab, else the model's tokenizer/, else the shipped vocabulary */
	const char *dir = o.vocab;
	sd_model *m = NULL;
	const char *env = getenv("SD_MODEL");
	if (!dir && (o.model || (env && *env))) {
		if (!(m = sd_model_open(o.model, o.config))) sd_die("%s", sd_errmsg());
		dir = sd_model_tokenizer_dir(m);
	}
	sd_tokenizer *tok = sd_tokenizer_load(dir);
	if (!tok) sd_die("%s", sd_errmsg());
	sd_info("tokenizer: %s (%d entries)", dir ? dir : "the shipped CLIP vocabulary", sd_tokenizer_vocab_size(tok));
	int32_t pad = pad_id(tok, dir);
	/* SDXL: the second tokenizer (its own padding) gives "tokens_2" / "uncond_tokens_2" */
	const char *dir2 = !o.vocab && m ? sd_model_tokenizer_2_dir(m) : NULL;
	sd_tokenizer *tok2 = dir2 ? sd_tokenizer_load(dir2) : NULL;
	if (dir2 && !tok2) sd_die("%s", sd_errmsg());
	int32_t pad2 = tok2 ? pad_id(tok2, dir2) : 0;

	/* 3. all frames built, then written */
	struct toks uncond = tokenize(tok, &neg, pad, !o.no_weighting);
	struct toks uncond2 = tok2 ? tokenize(tok2, &neg, pad2, 0) : (struct toks){0};
	sd_value **frames = calloc(nprompts, sizeof *frames);
	if (!frames) sd_die("out of memory");
	for (size_t i = 0; i < nprompts; i++) {
		sd_value *f = frames[i] = sd_value_map();
		struct toks t = tokenize(tok, &prompts[i], pad, !o.no_weighting);
		int want = t.k > uncond.k ? t.k : uncond.k;
		if (!f || sd_map_set_str(f, "prompt", prompts[i].text) < 0) sd_die("%s", sd_errmsg());
		put(f, "tokens", "weights", t, want, pad, prompts[i].where);
		if (sd_map_set_str(f, "negative_prompt", neg.text) < 0) sd_die("%s", sd_errmsg());
		put(f, "uncond_tokens", "uncond_weights", uncond, want, pad, prompts[i].where);
		if (tok2) {
			struct toks t2 = tokenize(tok2, &prompts[i], pad2, 0);
			put(f, "tokens_2", NULL, t2, want, pad2, prompts[i].where);
			put(f, "uncond_tokens_2", NULL, uncond2, want, pad2, prompts[i].where);
			free(t2.ids), free(t2.w);
		}
		free(t.ids);
		free(t.w);
	}
	for (size_t i = 0; i < nprompts; i++) {
		sd_write_frame_or_die(frames[i]);
		sd_value_free(frames[i]);
	}
	sd_info("%zu prompt%s", nprompts, nprompts == 1 ? "" : "s");
	free(frames);
	for (size_t i = 0; i < nprompts; i++)
		if (prompts[i].owned) free(prompts[i].text);
	free(prompts);
	free(o.files);
	free(uncond.ids);
	free(uncond.w);
	free(uncond2.ids);
	free(uncond2.w);
	sd_tokenizer_free(tok);
	sd_tokenizer_free(tok2);
	sd_model_close(m);
	sd_close_stdout();
	return 0;
}
