#!/bin/sh
# examples/train-style.sh - a style LoRA from a folder of pictures, the study's way: the pictures
# (PNG, JPEG, PNM, anything netpbm reads) are converted to PPM, sd-lora-train learns the style with
# the study's recipe, and the adapter is written in both formats; then three preview images (the
# study's prompts, with and without the adapter) and a style transfer of the first picture.
#
# Usage: train-style.sh [OPTION]... DIR CAPTION [OUT]
#   -m, --model PATH      the model (default $SD_MODEL)
#   -s, --seed S          seed of the training and of the images (default $SEED, else 0)
#   -r, --resolution N    training and image size (default $RESOLUTION, else 512)
#       --epochs N        (default $EPOCHS, else 100, the study's)
#       --steps N         inference steps of the previews (default $STEPS, else 50)
#   -v, --verbose         let every tool report its progress
#   -- ARGS               further options for sd-lora-train (e.g. -- --train unet,text --lr 2e-4)
# OUT is the name of the results (default "style"): OUT.safetensors (kohya), OUT/ (PEFT folders),
# OUT-loss.tsv, OUT-doctor.ppm, OUT-car.ppm, OUT-boy.ppm (and OUT-base-*.ppm without the adapter),
# OUT-transfer.ppm.  The style word "**" of the study's caption "A photo of in the style of **" is
# what the prompts use.
set -eu
usage() { sed -n '7,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "train-style.sh: $*" >&2; exit 2; }
model=${SD_MODEL:-} seed=${SEED:-0} res=${RESOLUTION:-512} epochs=${EPOCHS:-100} steps=${STEPS:-50} verbose=''
while [ $# -gt 0 ]; do
	case $1 in
	-m|--model) model=${2?}; shift 2;;
	-s|--seed) seed=${2?}; shift 2;;
	-r|--resolution) res=${2?}; shift 2;;
	--epochs) epochs=${2?}; shift 2;;
	--steps) steps=${2?}; shift 2;;
	-v|--verbose) verbose=-v; shift;;
	-h|--help) usage;;
	--) break;;
	-*) die "unknown option '$1' (see --help)";;
	*) break;;
	esac
done
[ $# -ge 2 ] || usage 2 >&2
dir=$1 caption=$2 out=style
shift 2
if [ $# -gt 0 ] && [ "$1" != -- ]; then out=$1; shift; fi
[ $# -gt 0 ] && [ "$1" = -- ] && shift
[ -n "$model" ] || die "no model: give -m MODEL or set SD_MODEL"
[ -d "$dir" ] || die "$dir: not a folder"
top=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$top/${BIN:-bin}/sd-lora-train" ] && PATH="$top/${BIN:-bin}:$PATH"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/train-style.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

# the pictures as PPM (captions copied along)
first=''
for f in "$dir"/*; do
	[ -f "$f" ] || continue
	b=$(basename "$f"); stem=${b%.*}
	case $b in
	*.txt) cp "$f" "$tmp/";;
	*.png|*.PNG) pngtopam "$f" | pamtopnm > "$tmp/$stem.ppm";;
	*.ppm|*.pgm|*.pnm|*.pam) cp "$f" "$tmp/";;
	*) anytopnm "$f" > "$tmp/$stem.ppm" 2>/dev/null || die "$f: netpbm cannot read it";;
	esac
	[ -n "$first" ] || first=$f
done
[ -n "$first" ] || die "$dir: no pictures"

sd-lora-train -m "$model" --seed "$seed" --resolution "$res" --epochs "$epochs" --caption "$caption" \
	--log "$out-loss.tsv" $verbose "$@" -o "$out.safetensors" -o "$out/" "$tmp"
echo "$out.safetensors $out/"

for what in doctor car boy; do
	"$top/examples/txt2img.sh" -m "$model" -s "$seed" -W "$res" -H "$res" --steps "$steps" $verbose \
		"A photo of a $what in the style of **" "$out-base-$what.ppm"
	"$top/examples/txt2img.sh" -m "$model" -s "$seed" -W "$res" -H "$res" --steps "$steps" --lora "$out" $verbose \
		"A photo of a $what in the style of **" "$out-$what.ppm"
done
"$top/examples/img2img.sh" -m "$model" -s "$seed" -W "$res" -H "$res" --steps "$steps" --strength 0.7 \
	--lora "$out" $verbose "$first" "A photo in the style of **" "$out-transfer.ppm"
