# tests/pipeline/lib.sh - sourced by every pipeline test.  The tools are on PATH (tests/run.sh puts
# $BIN first); $SD_FIXTURES is tests/fixtures; $T is a fresh temporary folder removed at exit.
# Each check prints one "PASS: <script>:<name>" / "FAIL: …" / "SKIP: … (why)" line.
script=$(basename "$0" .sh)
T=$(mktemp -d "${TMPDIR:-/tmp}/sdpipe-test.XXXXXX") || exit 1
trap 'rm -rf "$T"' EXIT
nfail=0
pass() { echo "PASS: $script:$1"; }
fail() { echo "FAIL: $script:$1${2:+ ($2)}"; nfail=$((nfail + 1)); }
skip() { echo "SKIP: $script:$1 (${2:-skipped})"; }
# ok NAME CMD...: the command (a string for sh -c) must exit 0.
ok() {
	n=$1; shift
	if sh -c "$*" >"$T/ok.out" 2>"$T/ok.err"; then pass "$n"; else fail "$n" "exit $?: $(head -c 300 "$T/ok.err")"; fi
}
# same NAME FILE1 FILE2: the two files must be byte-identical.
same() {
	if cmp -s "$2" "$3"; then pass "$1"; else fail "$1" "$2 and $3 differ"; fi
}
# bad NAME STATUS PROG CMD...: CMD (for sh -c, stdin from /dev/null unless redirected) must exit with
# STATUS, print exactly one line on stderr starting "PROG: ", and nothing on stdout.
bad() {
	n=$1; want=$2; prog=$3; shift 3
	sh -c "$*" >"$T/bad.out" 2>"$T/bad.err" </dev/null
	rc=$?
	lines=$(wc -l <"$T/bad.err")
	if [ "$rc" -ne "$want" ]; then fail "$n" "exit $rc, wanted $want: $(head -c 300 "$T/bad.err")"
	elif [ -s "$T/bad.out" ]; then fail "$n" "stdout not empty ($(wc -c <"$T/bad.out") bytes)"
	elif [ "$lines" -ne 1 ] && ! { [ "$want" -eq 2 ] && [ "$lines" -eq 2 ]; }; then fail "$n" "$lines lines on stderr: $(head -c 300 "$T/bad.err")"
	elif ! head -n 1 "$T/bad.err" | grep -q "^$prog: "; then fail "$n" "message does not start with '$prog: ': $(head -c 300 "$T/bad.err")"
	else pass "$n"; fi
}
# py_with MODULES: a python3 that imports them (the one on PATH, else Debian's), or nothing (status 1)
py_with() {
	for p in python3 /usr/bin/python3; do
		command -v "$p" >/dev/null 2>&1 && "$p" -c "import $1" 2>/dev/null && { echo "$p"; return 0; }
	done
	return 1
}
finish() { [ "$nfail" -eq 0 ]; exit $?; }
