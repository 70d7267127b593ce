#!/bin/sh
# tests/run.sh - the one test runner behind `make check`.  Runs every C unit test ($B/tests/test_*) and
# every shell pipeline test (tests/pipeline/*.sh); each prints "PASS: name", "FAIL: name" or
# "SKIP: name (why)" per case.  A program that dies without printing FAIL counts as one failure.
# Ends with "N passed, N failed, N skipped" and exits 1 on any failure.
B=${B:-build}
BIN=${BIN:-bin}
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1
base_path=$PATH
PATH="$top/$BIN:$PATH"; export PATH BIN B
SD_FIXTURES="$top/tests/fixtures"; export SD_FIXTURES
SHARED="$top/../shared/fixtures"; export SHARED
# OpenMP threads sleep at barriers instead of spinning: the tests share two cores with each other's
# processes (the tools set this themselves; unit tests do not)
OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}; export OMP_WAIT_POLICY
log=$(mktemp -d "${TMPDIR:-/tmp}/sdcheck.XXXXXX") || exit 1
trap 'rm -rf "$log"' EXIT INT TERM
pass=0; fail=0; skip=0
run_one() { # name, command...
	name=$1; shift
	out="$log/out"
	"$@" >"$out" 2>&1
	rc=$?
	cat "$out"
	p=$(grep -c '^PASS: ' "$out"); f=$(grep -c '^FAIL: ' "$out"); s=$(grep -c '^SKIP: ' "$out")
	if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
		echo "FAIL: $name (exit status $rc)"; f=1
	fi
	if [ "$p" -eq 0 ] && [ "$f" -eq 0 ] && [ "$s" -eq 0 ]; then
		echo "FAIL: $name (ran no test case)"; f=1
	fi
	pass=$((pass + p)); fail=$((fail + f)); skip=$((skip + s))
}
# BUILDS: "builddir:bindir …" — `make check` runs the suite on the normal build and again on the
# ASan + UBSan build; each pair's tools come first on PATH for its pipeline tests.
for pair in ${BUILDS:-"$B:$BIN"}; do
	B=${pair%%:*}; BIN=${pair#*:}
	PATH="$top/$BIN:$base_path"; export PATH BIN B
	[ "${BUILDS:-}" ] && echo "== $B"
	for t in "$B"/tests/test_*; do
		[ -x "$t" ] || continue
		case "$t" in *.d|*.o) continue;; esac
		run_one "$(basename "$t")" "$t"
	done
	for t in tests/pipeline/*.sh; do
		[ -f "$t" ] || continue
		[ "$(basename "$t")" = lib.sh ] && continue
		run_one "$(basename "$t" .sh)" sh "$t"
	done
done
echo "$pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
