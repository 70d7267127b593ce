/*
 * fuzz.h - helpers shared by the libFuzzer targets in tests/fuzz/ (each fuzz_<parser>.c defines
 * LLVMFuzzerTestOneInput; tests/fuzz/replay.c runs the same function over saved inputs without libFuzzer).
 *
 * The parsers that take a path (safetensors mmaps its file, libarchive opens the .ckpt by name) get the
 * input through one scratch folder per process, made on first use under $TMPDIR (/dev/shm when there is
 * one: a write per execution) and removed at exit.
 */
#ifndef SD_FUZZ_H
#define SD_FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char fuzz_dir_[4096];

static void fuzz_rmdir_(void)
{
	char cmd[4200];
	if (!fuzz_dir_[0]) return;
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", fuzz_dir_);
	if (system(cmd) != 0) fprintf(stderr, "fuzz: could not remove %s\n", fuzz_dir_);
}

/* The per-process scratch folder (created on the first call; exits when it cannot be made). */
__attribute__((unused)) static const char *fuzz_dir(void)
{
	if (!fuzz_dir_[0]) {
		const char *t = getenv("TMPDIR");
		if (!t || !*t) t = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
		snprintf(fuzz_dir_, sizeof fuzz_dir_, "%s/sdfuzz.XXXXXX", t);
		if (!mkdtemp(fuzz_dir_)) {
			perror(fuzz_dir_);
			exit(1);
		}
		atexit(fuzz_rmdir_);
	}
	return fuzz_dir_;
}

/* "<scratch folder>/<name>" in a static buffer (one of 4, so a few may be live at once). */
__attribute__((unused)) static const char *fuzz_path(const char *name)
{
	static char p[4][4300];
	static int k;
	char *s = p[k++ & 3];
	snprintf(s, sizeof p[0], "%s/%s", fuzz_dir(), name);
	return s;
}

/* Write n bytes to the scratch file `name` (replacing it); its path, or NULL when the write failed. */
__attribute__((unused)) static const char *fuzz_file(const char *name, const void *data, size_t n)
{
	const char *path = fuzz_path(name);
	FILE *f = fopen(path, "wb");
	if (!f) return NULL;
	int ok = (n == 0 || fwrite(data, 1, n, f) == n);
	if (fclose(f) != 0) ok = 0;
	return ok ? path : NULL;
}

/* Read every byte of a tensor's data (so ASan sees a view that points outside its mapping) and fold
 * them into a value the compiler cannot drop. */
__attribute__((unused)) static unsigned fuzz_touch(const void *p, size_t n)
{
	const unsigned char *b = p;
	unsigned h = 0;
	for (size_t i = 0; i < n; i++) h = h * 31 + b[i];
	return h;
}
static volatile unsigned fuzz_sink;

#endif
