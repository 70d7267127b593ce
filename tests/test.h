/*
 * test.h - the unit-test harness (after llm.c's test_gpt2.c): TEST cases that print one line each,
 * "PASS: <file>:<name>", "FAIL: <file>:<name>" or "SKIP: <file>:<name> (why)", which tests/run.sh counts.
 * CHECK(cond) and CHECK_CLOSE(got, want, n, rtol) print file:line and, for arrays, the largest difference.
 *
 *   TEST(roundtrip) { CHECK(1 + 1 == 2); }
 *   int main(void) { RUN(roundtrip); return test_summary(); }
 */
#ifndef SD_TEST_H
#define SD_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int test_failed_;      /* failures in the running case */
static int test_skipped_;
static char test_skip_why_[256];
static int test_total_fail_;

#define TEST(name) static void test_##name(void)

#define RUN(name) do {                                                                  \
	test_failed_ = 0; test_skipped_ = 0;                                                \
	test_##name();                                                                      \
	if (test_skipped_) printf("SKIP: %s:%s (%s)\n", test_file_(), #name, test_skip_why_); \
	else if (test_failed_) { printf("FAIL: %s:%s\n", test_file_(), #name); test_total_fail_++; } \
	else printf("PASS: %s:%s\n", test_file_(), #name);                                  \
	fflush(stdout);                                                                     \
} while (0)

#define SKIP(...) do { snprintf(test_skip_why_, sizeof test_skip_why_, __VA_ARGS__); test_skipped_ = 1; return; } while (0)

#define CHECK(cond) do { if (!(cond)) {                                                 \
	printf("  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); test_failed_++; } } while (0)

/* CHECK that a libsd call returned 0; prints sd_errmsg() otherwise. */
#define CHECK_OK(call) do { if ((call) != 0) {                                          \
	printf("  %s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, sd_errmsg()); test_failed_++; } } while (0)

/* Relative comparison of n floats: |got-want| <= rtol * max(1, max|want|) element-wise scale. */
#define CHECK_CLOSE(got, want, n, rtol) test_close_(__FILE__, __LINE__, #got, (got), (want), (n), (rtol))

#ifndef TEST_NAME
#define TEST_NAME __FILE__
#endif
static inline const char *test_file_(void) { return TEST_NAME; }

/*
 * Compare two float arrays with a relative tolerance: the error is max|got-want| / max(max|want|, 1e-12)
 * (relative to the largest reference magnitude, the way a tensor's closeness is usually judged), and
 * NaN anywhere in got fails.  Always prints the largest difference, so a passing run shows its margin.
 */
static inline int test_close_(const char *file, int line, const char *what, const float *got,
                              const float *want, long n, double rtol)
{
	double maxdiff = 0, maxref = 0;
	long at = 0, nan = 0;
	for (long i = 0; i < n; i++) {
		double d = fabs((double)got[i] - (double)want[i]);
		if (isnan(got[i]) != isnan(want[i])) { if (!nan++) at = i; continue; }
		if (d > maxdiff) { maxdiff = d; if (!nan) at = i; }
		if (fabs(want[i]) > maxref) maxref = fabs(want[i]);
	}
	double rel = maxdiff / (maxref > 1e-12 ? maxref : 1e-12);
	int ok = rel <= rtol && !nan;
	printf("  %s:%d: %s: n=%ld max|diff|=%.3g at %ld (rel %.3g, tol %.1g)", file, line, what, n, maxdiff, at, rel,
	       rtol);
	if (nan) printf(", %ld NaN mismatches (first at %ld)", nan, at);
	printf("%s\n", ok ? "" : " FAILED");
	if (!ok) test_failed_++;
	return ok;
}

static inline int test_summary(void)
{
	return test_total_fail_ ? 1 : 0;
}

#endif
