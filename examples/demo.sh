#!/bin/sh
# examples/demo.sh - what `make demo` runs: text to image and a style transfer (image to image) with the
# tiny fixture model (tests/fixtures/tiny, random weights: the pictures are abstract, the pipeline is
# real), or with $SD_MODEL when set.  Pictures go to demo-out/ ($OUT) as PPM, and PNG when pnmtopng is
# there.  SD_MODEL=/path/to/sd15 make demo gives real pictures at 512x512 (a few minutes on a CPU).
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-bin}
PATH="$top/$BIN:$PATH"; export PATH BIN
out=${OUT:-$top/demo-out}
mkdir -p "$out"
if [ -n "${SD_MODEL:-}" ]; then
	model=$SD_MODEL size=512 steps=${STEPS:-50}
else
	model=$top/tests/fixtures/tiny size=64 steps=${STEPS:-25}
fi
[ -e "$model" ] || { echo "demo: no model at $model" >&2; exit 1; }
img=$top/tests/fixtures/golden/test_image_128.ppm
[ -f "$img" ] || img=$top/tests/fixtures/golden/test_image_64.ppm
png() { if command -v pnmtopng >/dev/null 2>&1; then pnmtopng "$1" > "${1%.ppm}.png" && echo "  ${1%.ppm}.png"; fi; }

echo "== text to image: $model, ${size}x$size, PNDM $steps steps, guidance 7.5, seed 1234"
t0=$(date +%s)
sh "$top/examples/txt2img.sh" -m "$model" -s 1234 --steps "$steps" -W "$size" -H "$size" \
	'a photo of a lighthouse in the style of **' "$out/txt2img.ppm" >/dev/null
echo "  $out/txt2img.ppm"; png "$out/txt2img.ppm"

echo "== style transfer: $(basename "$img") squashed to ${size}x$size, strength 0.7 ($((steps * 7 / 10)) of $steps steps)"
sh "$top/examples/img2img.sh" -m "$model" -s 1234 --steps "$steps" -W "$size" -H "$size" \
	"$img" 'a photo in the style of **' "$out/img2img.ppm" >/dev/null
echo "  $out/img2img.ppm"; png "$out/img2img.ppm"
echo "done in $(( $(date +%s) - t0 )) s; the pictures are in $out"
