/*
 * unicode.h - the Unicode text handling behind the CLIP tokenizer (internal to libsd).
 *
 * Mirrors what Hugging Face's CLIPTokenizer gets from Python: UTF-8 decoding as Python's strict codec,
 * character classes as Python's unicodedata / str methods (Unicode UNI_TABLES_UNICODE_VERSION), str.lower
 * and ftfy 6.1's fix_text with its default configuration (see unicode.c for what is covered).  Text is
 * handled as arrays of code points (uint32_t).  Functions that allocate return -1 when out of memory and
 * never set a message; the caller (tokenizer.c) reports.
 */
#ifndef SD_UNICODE_H
#define SD_UNICODE_H

#include <stddef.h>
#include <stdint.h>

/* A growable array of code points; zero-initialise, release with uni_buf_free. */
typedef struct uni_buf {
	uint32_t *p;
	size_t n, cap;
} uni_buf;

int uni_push(uni_buf *b, uint32_t c);
int uni_append(uni_buf *b, const uint32_t *s, size_t n);
void uni_buf_free(uni_buf *b);

/* Decode n bytes of UTF-8 and append the code points to out, strictly as Python's "utf-8" codec does
 * (no overlong forms, no surrogates, nothing above U+10FFFF).  Returns 0, -1 when out of memory, or -2 on
 * invalid UTF-8 with *bad set to the offset of the first offending byte. */
int uni_from_utf8(const char *s, size_t n, uni_buf *out, size_t *bad);
/* Write the UTF-8 form of c (at most 4 bytes) to out; returns the byte count. */
int uni_utf8_put(uint32_t c, unsigned char *out);

/* Character classes.  letter: general category L*; number: N*; space: str.isspace (Python's \s);
 * alnum: str.isalnum. */
int uni_is_letter(uint32_t c);
int uni_is_number(uint32_t c);
int uni_is_space(uint32_t c);
int uni_is_alnum(uint32_t c);

/* Python's str.lower of s[0..n), appended to out (full mappings, Final_Sigma). */
int uni_lower(const uint32_t *s, size_t n, uni_buf *out);
/* Unicode NFC of s[0..n), appended to out. */
int uni_nfc(const uint32_t *s, size_t n, uni_buf *out);
/* ftfy.fix_text(s) with ftfy 6.1's defaults, appended to out. */
int uni_fix_text(const uint32_t *s, size_t n, uni_buf *out);
/* ftfy.badness.is_bad: 1 when s[0..n) looks like it holds mojibake. */
int uni_is_bad(const uint32_t *s, size_t n);

#endif
