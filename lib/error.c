/*
 * error.c - error messages as return codes (after stb and libarchive's archive_error_string): each
 * thread keeps its last message; functions return -1 (or NULL) and the caller reads sd_errmsg().
 *
 * A message is often made from the one before it (sd_seterr("%s: %s", name, sd_errmsg()), or
 * sd_preerr): so every message is formatted into a local buffer first and copied over the old one
 * afterwards.  Formatting straight into the buffer an argument points at is undefined behaviour (the
 * C standard's snprintf with overlapping objects) and in glibc overwrote the start of the old text
 * before it was read ("a: a: 00x40000 pixels ..." for "a: image of 40000x40000 pixels ...").
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include "sd.h"

static _Thread_local char msg[1024];

const char *sd_errmsg(void)
{
	return msg;
}

/* Copy a formatted text of n characters (vsnprintf's count) into msg; a cut one ends in "...". */
static void set(const char *text, int n)
{
	size_t len = strnlen(text, sizeof msg - 1);
	memcpy(msg, text, len);
	msg[len] = 0;
	if (n >= (int)sizeof msg) strcpy(msg + sizeof msg - 4, "...");
}

int sd_seterr(const char *fmt, ...)
{
	char text[sizeof msg];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(text, sizeof text, fmt, ap);
	va_end(ap);
	set(n < 0 ? "(unprintable message)" : text, n);
	return -1;
}

int sd_preerr(const char *fmt, ...)
{
	char text[sizeof msg], pre[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(pre, sizeof pre, fmt, ap);
	va_end(ap);
	set(text, snprintf(text, sizeof text, "%s: %s", pre, msg));
	return -1;
}
