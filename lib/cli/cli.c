/*
 * cli.c - what every program in cmd/ shares (after sbase's eprintf.c and coreutils' close-stdout):
 * messages "<prog>: …" on stderr, exit statuses 0/1/2, range-checked option parsing, and closing stdout
 * with a check for write errors.  The only part of libsd that prints or exits; tools alone call it.
 */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "sd_cli.h"

const char *sd_prog = "sdpipe";
int sd_verbose;
static int stdout_closed;

static void at_exit(void)
{
	if (!stdout_closed) sd_close_stdout();
}

void sd_cli_init(int argc, char **argv)
{
	(void)argc;
	if (argv && argv[0]) {
		const char *s = strrchr(argv[0], '/');
		sd_prog = s ? s + 1 : argv[0];
	}
	static char buf[1 << 16];
	setvbuf(stdout, buf, _IOFBF, sizeof buf);
	/* SIGPIPE keeps its default action: when the reader of a pipe goes away (`… | head`, or a tool
	 * further down that failed and said why) a tool ends silently, as every Unix filter does; other write
	 * errors (a full disk) are reported by sd_close_stdout / sd_write_frame_or_die. */
	atexit(at_exit);
}

static void vmsg(const char *fmt, va_list ap, const char *tail)
{
	fflush(stdout);
	fprintf(stderr, "%s: ", sd_prog);
	vfprintf(stderr, fmt, ap);
	if (tail) fprintf(stderr, ": %s", tail);
	fputc('\n', stderr);
}

void sd_die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vmsg(fmt, ap, NULL);
	va_end(ap);
	stdout_closed = 1; /* nothing more is written: do not report a second error at exit */
	_exit(1);
}

void sd_die_lib(const char *fmt, ...)
{
	va_list ap;
	char e[1024];
	snprintf(e, sizeof e, "%s", sd_errmsg());
	va_start(ap, fmt);
	vmsg(fmt, ap, e);
	va_end(ap);
	stdout_closed = 1;
	_exit(1);
}

void sd_usage_error(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vmsg(fmt, ap, NULL);
	va_end(ap);
	fprintf(stderr, "Try '%s --help'.\n", sd_prog);
	stdout_closed = 1;
	_exit(2);
}

void sd_warn(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vmsg(fmt, ap, NULL);
	va_end(ap);
}

void sd_info(const char *fmt, ...)
{
	if (!sd_verbose) return;
	va_list ap;
	va_start(ap, fmt);
	vmsg(fmt, ap, NULL);
	va_end(ap);
}

long long sd_parse_int(const char *opt, const char *s, long long lo, long long hi)
{
	char *end;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (!*s || *end || errno || v < lo || v > hi)
		sd_usage_error("%s: '%s' is not an integer in [%lld, %lld]", opt, s, lo, hi);
	return v;
}

double sd_parse_float(const char *opt, const char *s, double lo, double hi)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (!*s || *end || errno || !isfinite(v) || v < lo || v > hi)
		sd_usage_error("%s: '%s' is not a number in [%g, %g]", opt, s, lo, hi);
	return v;
}

void sd_print_version(void)
{
	printf("%s (sdpipe) %s\n", sd_prog, SD_VERSION);
	sd_close_stdout();
	exit(0);
}

FILE *sd_open_in(const char *path)
{
	if (!path || !strcmp(path, "-")) return stdin;
	FILE *f = fopen(path, "rb");
	if (!f) sd_die("%s: %s", path, strerror(errno));
	return f;
}

void sd_write_frame_or_die(const sd_value *frame)
{
	if (sd_frame_write(stdout, frame) < 0) sd_die_lib("stdout");
}

void sd_close_stdout(void)
{
	if (stdout_closed) return;
	stdout_closed = 1;
	int bad = ferror(stdout);
	if (fclose(stdout) != 0 || bad) {
		fprintf(stderr, "%s: write error: %s\n", sd_prog, errno ? strerror(errno) : "I/O error");
		_exit(1);
	}
}

int sd_stderr_tty(void)
{
	return isatty(2);
}

void sd_cli_init_compute(int argc, char **argv)
{
	/* libgomp reads its wait policy before main runs.  Its default spins at every barrier, which costs a
	 * scheduler time slice whenever the cores are shared — and in a pipeline they always are (each tool
	 * of `a | b | c` has its own threads): a tiny-model decode took 2 s with 2 threads and 0.3 s with 1.
	 * So a tool that computes starts itself again once with OMP_WAIT_POLICY=PASSIVE unless the user
	 * chose a policy (the exec costs a few milliseconds; light tools skip it). */
	if (argv && !getenv("OMP_WAIT_POLICY") && !getenv("GOMP_SPINCOUNT")) {
		setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
		execv("/proc/self/exe", argv); /* returns only on failure: then run on as we are */
	}
	sd_cli_init(argc, argv);
}

void sd_bad_option(int c, char **argv)
{
	const char *arg = argv[optind - 1];
	if (c == ':') sd_usage_error("option '%s' requires an argument", arg);
	if (optopt && strncmp(arg, "--", 2) != 0) sd_usage_error("invalid option -- '%c'", optopt);
	sd_usage_error("unrecognized option '%s'", arg);
}

double sd_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

const sd_tensor *sd_frame_f32(const sd_value *frame, const char *key, const char *hint, const char *name,
                              long idx, sd_tensor **conv)
{
	*conv = NULL;
	sd_value *v = sd_map_get(frame, key);
	if (!v) sd_die("%s: frame %ld: no \"%s\" key%s%s", name, idx, key, hint ? " " : "", hint ? hint : "");
	if (v->type != SD_V_TENSOR) sd_die("%s: frame %ld: \"%s\" is not a tensor", name, idx, key);
	const sd_tensor *t = v->u.t;
	if (t->dtype == SD_DTYPE_F32) return t;
	if (!sd_dtype_is_float(t->dtype))
		sd_die("%s: frame %ld: \"%s\" has dtype %s, want a float tensor", name, idx, key, sd_dtype_name(t->dtype));
	if (!(*conv = sd_tensor_convert(t, SD_DTYPE_F32))) sd_die_lib("%s: frame %ld: \"%s\"", name, idx, key);
	return *conv;
}

/* The name a path goes by in a picture's parameters: its last component, without a .safetensors,
 * .ckpt, .pt or .bin extension ("models/sd15/" → "sd15", "style.safetensors" → "style"). */
static char *stem(const char *path)
{
	size_t n = strlen(path);
	while (n > 1 && path[n - 1] == '/') n--;
	size_t b = n;
	while (b > 0 && path[b - 1] != '/') b--;
	static const char *const ext[] = {".safetensors", ".ckpt", ".pt", ".bin"};
	for (size_t k = 0; k < sizeof ext / sizeof *ext; k++) {
		size_t e = strlen(ext[k]);
		if (n - b > e && !strncmp(path + n - e, ext[k], e)) {
			n -= e;
			break;
		}
	}
	return strndup(path + b, n - b);
}

void sd_frame_note_generation(sd_value *frame, const sd_value *cond, const char *model, const char *const *lora,
                              int nlora)
{
	static const char *const text[] = {"prompt", "negative_prompt"};
	for (int k = 0; k < 2 && cond && cond != frame; k++) {
		const char *s = sd_map_str(cond, text[k]);
		if (s && !sd_map_get(frame, text[k]) && sd_map_set_str(frame, text[k], s)) sd_die("out of memory");
	}
	const char *mp = model && *model ? model : getenv("SD_MODEL");
	char *ms = mp && *mp ? stem(mp) : NULL;
	if (ms && sd_map_set_str(frame, "model", ms)) sd_die("out of memory");
	free(ms);
	if (nlora <= 0) return;
	sd_value *arr = sd_value_array();
	for (int i = 0; arr && i < nlora; i++) {
		char *path;
		float scale;
		if (sd_lora_parse_arg(lora[i], &path, &scale)) sd_die("--lora: %s", sd_errmsg());
		char *ls = stem(path);
		sd_value *e = sd_value_map();
		char sb[32];
		snprintf(sb, sizeof sb, "%.7g", scale); /* the scale as typed, not its float's 17 digits */
		if (!ls || !e || sd_map_set_str(e, "name", ls) || sd_map_set_float(e, "scale", strtod(sb, NULL)) ||
		    sd_array_push(arr, e))
			sd_die("out of memory");
		free(ls);
		free(path);
	}
	if (!arr || sd_map_set(frame, "lora", arr)) sd_die("out of memory");
}

int sd_count_pattern(const char *p)
{
	int n = 0;
	for (const char *s = p; *s; s++) {
		if (*s != '%') continue;
		if (s[1] == '%') { s++; continue; }
		s++;
		while (*s >= '0' && *s <= '9') s++;
		if (*s != 'd') sd_usage_error("-o: '%s': only %%d (with a width) and %%%% may follow %%", p);
		n++;
	}
	return n;
}

const sd_tensor *sd_frame_image(const sd_value *frame, const char *key, const char *name, long idx,
                                const char *kinds, sd_tensor **conv)
{
	char s[128];
	*conv = NULL;
	sd_value *v = sd_map_get(frame, key);
	if (!v) sd_die("%s: frame %ld: no \"%s\" key", name, idx, key);
	if (v->type != SD_V_TENSOR) sd_die("%s: frame %ld: \"%s\" is not a tensor", name, idx, key);
	const sd_tensor *t = v->u.t;
	sd_shape_str(t->ndim, t->shape, s, sizeof s);
	if (t->ndim != 3 && t->ndim != 4)
		sd_die("%s: frame %ld: \"%s\" has shape %s, want [N,C,H,W] or [C,H,W]", name, idx, key, s);
	int64_t C = t->shape[t->ndim - 3];
	if (C != 1 && C != 3)
		sd_die("%s: frame %ld: \"%s\" has shape %s: %lld channels, but only %s can be written", name, idx, key, s,
		       (long long)C, kinds);
	if (t->shape[t->ndim - 2] < 1 || t->shape[t->ndim - 1] < 1 || t->shape[t->ndim - 2] > INT32_MAX ||
	    t->shape[t->ndim - 1] > INT32_MAX)
		sd_die("%s: frame %ld: \"%s\" has shape %s: not a writable image size", name, idx, key, s);
	if (t->dtype == SD_DTYPE_F32) return t;
	if (!sd_dtype_is_float(t->dtype))
		sd_die("%s: frame %ld: \"%s\" has dtype %s, want a float tensor (f32, f16, bf16)", name, idx, key,
		       sd_dtype_name(t->dtype));
	*conv = sd_tensor_convert(t, SD_DTYPE_F32);
	if (!*conv) sd_die("%s: frame %ld: \"%s\": %s", name, idx, key, sd_errmsg());
	return *conv;
}

size_t sd_warn_nonfinite(const float *px, size_t n, const char *name, long idx, int64_t img)
{
	size_t nan = 0, inf = 0;
	for (size_t i = 0; i < n; i++) {
		nan += isnan(px[i]) != 0;
		inf += isinf(px[i]) != 0;
	}
	const char *infw = "written as 1 (+Inf) or 0 (-Inf)";
	if (nan && inf)
		sd_warn("%s: frame %ld: image %lld: %zu of %zu values are NaN, written as 0; %zu are Inf, %s", name, idx,
		        (long long)img, nan, n, inf, infw);
	else if (nan || inf)
		sd_warn("%s: frame %ld: image %lld: %zu of %zu values are %s, %s", name, idx, (long long)img,
		        nan ? nan : inf, n, nan ? "NaN" : "Inf", nan ? "written as 0" : infw);
	return nan + inf;
}
