/*
 * error.c - error messages as return codes (after stb and libarchive's archive_error_string): each
 * thread keeps its last message; functions return -1 (or NULL) and the caller reads sd_errmsg().
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

int sd_seterr(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	return -1;
}

int sd_preerr(const char *fmt, ...)
{
	char old[sizeof msg], pre[512];
	va_list ap;
	memcpy(old, msg, sizeof msg);
	va_start(ap, fmt);
	vsnprintf(pre, sizeof pre, fmt, ap);
	va_end(ap);
	if (snprintf(msg, sizeof msg, "%s: %s", pre, old) >= (int)sizeof msg)
		strcpy(msg + sizeof msg - 4, "..."); /* cut: say so */
	return -1;
}
