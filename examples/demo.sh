#!/bin/sh
# examples/demo.sh - what `make demo` runs.  For now: a picture goes PNM → tensor stream → PNM with
# sd-info looking at the stream in the middle, and the round trip is checked to be lossless.
# (Later: text-to-image and style transfer with the tiny model.)
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-bin}
PATH="$top/$BIN:$PATH"
out=${OUT:-$top/demo-out}
mkdir -p "$out"
img="$top/tests/fixtures/golden/test_image_64.ppm"

pnmtotensor "$img" > "$out/image.sdt"
echo "== sd-info on the stream =="
sd-info < "$out/image.sdt"
tensortopnm < "$out/image.sdt" > "$out/roundtrip.ppm"
if cmp -s "$img" "$out/roundtrip.ppm"; then
	echo "round trip: $out/roundtrip.ppm is identical to $img"
else
	echo "round trip: images differ" >&2
	exit 1
fi
