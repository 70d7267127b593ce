#!/bin/bash
# examples/demo.sh - what `make demo` runs: text to image and a style transfer (image to image) with the
# tiny fixture model (tests/fixtures/tiny, random weights: the pictures are abstract, the pipeline is
# real), or with $SD_MODEL when set.  Pictures go to demo-out/ ($OUT) as PNG files that carry their
# parameters (sd-txt2img, sd-img2img).  SD_MODEL=/path/to/sd15 make demo gives real pictures at
# 512x512 (a few minutes on a CPU).
set -euo pipefail
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

echo "== text to image: $model, ${size}x$size, PNDM $steps steps, guidance 7.5, seed 1234"
t0=$(date +%s)
sd-txt2img -m "$model" -s 1234 --steps "$steps" -W "$size" -H "$size" \
	-p 'a photo of a lighthouse in the style of **' -o "$out/txt2img.png" 2>/dev/null | sed 's/^/  /'

echo "== style transfer: $(basename "$img") squashed to ${size}x$size, strength 0.7 ($((steps * 7 / 10)) of $steps steps)"
sd-img2img -m "$model" -s 1234 --steps "$steps" -W "$size" -H "$size" \
	-i "$img" -p 'a photo in the style of **' -o "$out/img2img.png" 2>/dev/null | sed 's/^/  /'
echo "done in $(( $(date +%s) - t0 )) s; the pictures are in $out (PNG, with their parameters)"
