#!/bin/sh
# hostile.sh - resource limits through the real tools (issue 9): inputs that declare far more than they
# hold are refused with one "tool: ..." line, exit 1 and nothing on stdout, and the tool's peak RSS stays
# under 200 MB (measured with /usr/bin/time when it is installed).  The library-level table is
# tests/unit/test_hostile.c.
. "$(dirname "$0")/lib.sh"

# rss CMD: the peak RSS in KiB of CMD (its largest process).
rss() {
	/usr/bin/time -f %M -o "$T/rss" sh -c "$*" >/dev/null 2>&1 </dev/null
	tail -n 1 "$T/rss"
}
# small NAME BASE CMD: CMD's peak RSS may exceed that of BASE (the same tool on a tiny valid input:
# the libraries alone, OpenBLAS and CUDA among them, take a few hundred MB) by at most 64 MB.
small() {
	n=$1
	if [ ! -x /usr/bin/time ]; then skip "$n" "no /usr/bin/time"; return; fi
	# AddressSanitizer writes shadow memory for every allocation, touched or not: RSS says nothing there
	case ${BIN:-bin} in *-san) skip "$n" "RSS is not meaningful under AddressSanitizer"; return;; esac
	base=$(rss "$2"); kb=$(rss "$3")
	case $base$kb in ''|*[!0-9]*) fail "$n" "no RSS measured: $(head -c 200 "$T/rss")"; return;; esac
	if [ $((kb - base)) -lt 65536 ]; then pass "$n"; else fail "$n" "peak RSS $kb KiB, $base KiB on a tiny input"; fi
}

printf 'P6\n2 1\n255\nabcdef' >"$T/tiny.ppm"
printf '\201\241x\300' >"$T/tiny.st"  # {"x": nil}
# -- images: headers that declare 100000x100000 pixels, from a file and from a pipe
printf 'P6\n100000 100000\n255\n' >"$T/huge.ppm"
bad huge-ppm-file 1 pnmtotensor "pnmtotensor $T/huge.ppm"
bad huge-ppm-pipe 1 pnmtotensor "cat $T/huge.ppm | pnmtotensor"
small huge-ppm-rss "pnmtotensor $T/tiny.ppm" "pnmtotensor $T/huge.ppm; cat $T/huge.ppm | pnmtotensor"
if grep -q 'larger than the limit of 268435456 pixels' "$T/bad.err"; then pass huge-ppm-message
else fail huge-ppm-message "$(cat "$T/bad.err")"; fi
# under the cap but short: refused from the header for a file, row by row from a pipe
printf 'P6\n8000 8000\n255\nabc' >"$T/short.ppm"
bad short-ppm-file 1 pnmtotensor "pnmtotensor $T/short.ppm"
bad short-ppm-pipe 1 pnmtotensor "cat $T/short.ppm | pnmtotensor"
small short-ppm-rss "pnmtotensor $T/tiny.ppm" "pnmtotensor $T/short.ppm; cat $T/short.ppm | pnmtotensor"
printf 'P5\n64 64\n255\n' >"$T/g.pgm"
head -c 4096 /dev/zero >>"$T/g.pgm"
bad max-pixels 1 pnmtotensor "SD_MAX_PIXELS=1000 pnmtotensor $T/g.pgm"
ok max-pixels-default "pnmtotensor $T/g.pgm >/dev/null"

# -- streams: counts and lengths that announce more than arrives, and the frame cap
printf '\337\377\377\377\377' >"$T/map.st"                    # a map of 2^32-1 pairs
printf '\201\241x\306\377\377\377\360abc' >"$T/bin.st"         # a bin of ~4 GiB, 3 bytes there
printf '\201\241x\306\177\377\377\360abc' >"$T/bin2.st"        # a bin of ~2 GiB, 3 bytes there
# {"x": {"dtype": "f32", "shape": [2^62, 4], "data": <0 bytes>}}: the shape's product overflows
printf '\201\241x\203\245dtype\243f32\245shape\222\317\100\000\000\000\000\000\000\000\004\244data\304\000' >"$T/ovf.st"
for s in map bin bin2 ovf; do bad "stream-$s" 1 sd-info "sd-info <$T/$s.st"; done
grep -q 'product overflows' "$T/bad.err" && pass stream-ovf-message || fail stream-ovf-message "$(cat "$T/bad.err")"
small stream-rss "sd-info <$T/tiny.st" "for s in map bin bin2 ovf; do sd-info <$T/\$s.st; done"
{ printf '\201\241x\306\000\040\000\000'; head -c 2097152 /dev/zero; } >"$T/2mb.st"  # one 2 MiB frame
bad frame-cap 1 sd-info "SD_MAX_FRAME_MB=1 sd-info <$T/2mb.st"
grep -q 'larger than the 1 MiB frame limit' "$T/bad.err" && pass frame-cap-message || fail frame-cap-message "$(cat "$T/bad.err")"
ok frame-cap-default "sd-info <$T/2mb.st >/dev/null"

# -- safetensors: a header that claims more than the file, shapes whose product overflows
st() { # FILE JSON: write a safetensors file with that header and no data
	n=$(printf '%s' "$2" | wc -c)
	printf "$(printf '\\%03o\\%03o\\000\\000\\000\\000\\000\\000' $((n % 256)) $((n / 256)))" >"$1"
	printf '%s' "$2" >>"$1"
}
st "$T/past.safetensors" '{"w":{"dtype":"F32","shape":[1000000000],"data_offsets":[0,4000000000]}}'
st "$T/ovf.safetensors" '{"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}'
printf '\377\377\377\377\377\377\377\177{}' >"$T/hlen.safetensors"
for s in past ovf hlen; do bad "safetensors-$s" 1 sd-info "sd-info $T/$s.safetensors"; done
small safetensors-rss "sd-info <$T/tiny.st" "for s in past ovf hlen; do sd-info $T/\$s.safetensors; done"

# -- prompts: a 2 MB line is refused at once; a 100 KB argument is tokenized and truncated to 77
head -c 2000000 /dev/zero | tr '\0' a >"$T/long.txt"
bad prompt-2mb-line 1 sd-tokenize "sd-tokenize <$T/long.txt"
small prompt-2mb-rss "sd-tokenize a" "sd-tokenize <$T/long.txt"
long=$(head -c 100000 /dev/zero | tr '\0' a)
ok prompt-100k-arg "sd-tokenize '$long' | sd-info >/dev/null"
small prompt-100k-rss "sd-tokenize a" "sd-tokenize '$long'"

finish
