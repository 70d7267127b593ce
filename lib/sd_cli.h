/*
 * sd_cli.h - helpers for the programs in cmd/ (after sbase's libutil/eprintf.c and coreutils): the one
 * part of libsd that prints and exits, and it is only ever called from a tool's main().  Messages go to
 * stderr as "<prog>: <what went wrong>".  Exit status: 0 ok, 1 bad input or run-time failure, 2 bad usage.
 */
#ifndef SD_CLI_H
#define SD_CLI_H

#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include "sd.h"

extern const char *sd_prog; /* set by sd_cli_init from argv[0]'s base name */

/* Record the program name, set stdout to full buffering and register the stdout close check. */
void sd_cli_init(int argc, char **argv);
/* The same for a tool that runs a model: first re-executes itself once with OMP_WAIT_POLICY=PASSIVE
 * unless the environment sets a wait policy (OpenMP threads then sleep at barriers instead of spinning,
 * which is what a pipeline of tools sharing the cores needs). */
void sd_cli_init_compute(int argc, char **argv);

/* "<prog>: <message>\n" to stderr, then exit(1). */
void sd_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
/* Same, followed by ": <sd_errmsg()>". */
void sd_die_lib(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
/* "<prog>: <message>\nTry '<prog> --help'.\n" to stderr, then exit(2). */
void sd_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
/* "<prog>: <message>\n" to stderr (no exit). */
void sd_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Count the NaN and ±Inf among the n pixels of image img (from 1) of a frame and warn once when there are
 * any ("<name>: frame F: image I: 3 of 6 values are NaN, written as 0; 2 are Inf, …"); the count of
 * values that are not finite. */
size_t sd_warn_nonfinite(const float *px, size_t n, const char *name, long idx, int64_t img);
/* Progress lines with -v: "<prog>: <message>\n" to stderr when sd_verbose is set. */
extern int sd_verbose;
void sd_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Range-checked number parsing for option values (never atoi): a bad value is a usage error naming
 * the option, e.g. "--steps: '0x' is not an integer in [1, 1000]". */
long long sd_parse_int(const char *opt, const char *s, long long lo, long long hi);
double sd_parse_float(const char *opt, const char *s, double lo, double hi);

/* For getopt_long's '?' or ':' (with opterr = 0): "unrecognized option '--x'", "invalid option -- 'x'"
 * or "option '--m' requires an argument", then the usage error exit (2). */
void sd_bad_option(int c, char **argv) __attribute__((noreturn));

/* The tensor under `key` of frame number idx of stream `name`, as f32: *conv is set when it had to be
 * converted (the caller frees it).  A missing key (with `hint` appended when not NULL), a value that is
 * not a tensor or an integer dtype is "name: frame idx: …" and exit 1. */
const sd_tensor *sd_frame_f32(const sd_value *frame, const char *key, const char *hint, const char *name,
                              long idx, sd_tensor **conv);

/* Monotonic seconds, for -v timings. */
double sd_now(void);

/* "--version" output: "<prog> (sdpipe) 0.1.0" to stdout, exit 0. */
void sd_print_version(void) __attribute__((noreturn));

/* Open a file for reading; "-" or NULL means stdin.  Exits 1 with a clear message on failure. */
FILE *sd_open_in(const char *path);

/* Write one frame to stdout or exit 1 ("write error: …"). */
void sd_write_frame_or_die(const sd_value *frame);

/* Flush and close stdout; on failure (disk full) print "<prog>: write error: …" and exit 1.
 * Called automatically at exit by sd_cli_init's atexit handler; call it explicitly before return 0. */
void sd_close_stdout(void);

/* What a picture's parameters are made of (tensortopng writes them in A1111's form): the "prompt" and
 * "negative_prompt" of the conditioning frame `cond` copied into `frame` when it has none, "model" (the
 * model path's name, from $SD_MODEL when model is NULL) and "lora" ([{"name", "scale"}] for the
 * --lora arguments given; the key is replaced). */
void sd_frame_note_generation(sd_value *frame, const sd_value *cond, const char *model, const char *const *lora,
                              int nlora);

/* The sinks' -o PATTERN: the number of integer conversions (%d, %05d, ...) in p, %% being a literal %;
 * any other conversion is a usage error. */
int sd_count_pattern(const char *p);
/* The image a sink writes: frame[key] checked to be a float [N,C,H,W] or [C,H,W] with C = 1 or 3 (kinds
 * names them in the message, e.g. "1 (PGM) or 3 (PPM)") and a writable size, as f32 (*conv set when
 * converted: the caller frees it).  Bad input exits 1 with "<name>: frame <idx>: ...". */
const sd_tensor *sd_frame_image(const sd_value *frame, const char *key, const char *name, long idx,
                                const char *kinds, sd_tensor **conv);

/* 1 when stderr is a terminal (progress bars). */
int sd_stderr_tty(void);

#endif
