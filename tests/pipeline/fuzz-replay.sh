#!/bin/sh
# fuzz-replay.sh - replay every saved fuzz input through its target (tests/fuzz/replay.c linked with
# tests/fuzz/fuzz_<t>.c, built as $B/fuzz/replay-<t> by `make check`): the regression corpus
# tests/fuzz/crashes/<t>/ (inputs that once crashed, leaked or hung, fixed since) and the seed corpus
# tests/fuzz/corpus/<t>/.  One PASS/FAIL per target; under SANITIZE=1 a memory error or UB fails it.
. "$(dirname "$0")/lib.sh"
B=${B:-build}
for t in stream safetensors ckpt config tokenizer pnm; do
	bin="$B/fuzz/replay-$t"
	if [ ! -x "$bin" ]; then skip "$t" "$bin not built"; continue; fi
	set --
	for d in tests/fuzz/crashes/$t tests/fuzz/corpus/$t; do [ -d "$d" ] && set -- "$@" "$d"; done
	if [ $# -eq 0 ]; then skip "$t" "no saved inputs"; continue; fi
	if timeout 600 "$bin" "$@" >"$T/$t.out" 2>&1; then
		pass "$t ($(grep '^replay: [0-9]* inputs' "$T/$t.out" | sed 's/^replay: //'))"
	else
		rc=$?
		last=$(grep '^replay: ' "$T/$t.out" | tail -n 1 | sed 's/^replay: //')
		fail "$t" "exit $rc on $last: $(grep -m 3 -E 'ERROR|runtime error|Assertion|abort|timeout' "$T/$t.out" | tr '\n' ' ' | head -c 300)"
	fi
done
finish
