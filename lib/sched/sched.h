/*
 * sched/sched.h - what the files of lib/sched share (internal; the API is in sd.h).
 */
#ifndef SD_SCHED_H
#define SD_SCHED_H

#include <stdarg.h>
#include <stdio.h>
#include "sd.h"

/* A -v remark through the caller's callback (none: nothing), formatted here. */
static inline void sd_sched_note(sd_note_fn *fn, void *user, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static inline void sd_sched_note(sd_note_fn *fn, void *user, const char *fmt, ...)
{
	if (!fn) return;
	char msg[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	fn(user, msg);
}

#endif
