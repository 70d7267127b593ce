#!/bin/bash
# examples/train-style.sh - a style LoRA from a folder of pictures, the study's way: sd-lora-train
# learns the style of the pictures (PNG, JPEG, PNM, with same-name .txt captions or not) with the
# study's recipe, and the adapter is written in both formats; then three preview images (the study's
# prompts, with and without the adapter) and a style transfer of the first picture.
#
# Usage: train-style.sh [OPTION]... DIR CAPTION [OUT]
#   -m, --model PATH      the model (default $SD_MODEL)
#   -s, --seed S          seed of the training and of the images (default $SEED, else 0)
#   -r, --resolution N    training and image size (default $RESOLUTION, else the model's own)
#       --epochs N        (default $EPOCHS, else 100, the study's)
#       --steps N         inference steps of the previews (default $STEPS, else 50)
#   -v, --verbose         let every tool report its progress
#   -- ARGS               further options for sd-lora-train (e.g. -- --train unet,text --lr 2e-4)
# OUT is the name of the results (default "style"): OUT.safetensors (kohya), OUT/ (PEFT folders),
# OUT-loss.tsv, OUT-doctor.png, OUT-car.png, OUT-boy.png (and OUT-base-*.png without the adapter),
# OUT-transfer.png.  The style word "**" of the study's caption "A photo of in the style of **" is
# what the prompts use.
set -euo pipefail
usage() { sed -n '7,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "train-style.sh: $*" >&2; exit 2; }
model=${SD_MODEL:-} seed=${SEED:-0} res=${RESOLUTION:-} epochs=${EPOCHS:-100} steps=${STEPS:-50} verbose=''
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
# the tools of this checkout's bin/ (or the installed ones on PATH)
top=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$top/${BIN:-bin}/sd-lora-train" ] && PATH="$top/${BIN:-bin}:$PATH"
first=''
for f in "$dir"/*; do
	case $f in *.png|*.PNG|*.jpg|*.jpeg|*.JPG|*.ppm|*.pgm|*.pnm|*.pam) first=$f; break;; esac
done
[ -n "$first" ] || die "$dir: no pictures"

sd-lora-train -m "$model" --seed "$seed" ${res:+--resolution "$res"} --epochs "$epochs" --caption "$caption" \
	--log "$out-loss.tsv" $verbose "$@" -o "$out.safetensors" -o "$out/" "$dir"
echo "$out.safetensors $out/"

size=(${res:+-W "$res" -H "$res"})
for what in doctor car boy; do
	sd-txt2img -m "$model" -s "$seed" "${size[@]}" --steps "$steps" $verbose \
		-p "A photo of a $what in the style of **" -o "$out-base-$what.png" 2>/dev/null
	sd-txt2img -m "$model" -s "$seed" "${size[@]}" --steps "$steps" --lora "$out" $verbose \
		-p "A photo of a $what in the style of **" -o "$out-$what.png" 2>/dev/null
done
sd-img2img -m "$model" -s "$seed" "${size[@]}" --steps "$steps" --strength 0.7 --lora "$out" $verbose \
	-i "$first" -p "A photo in the style of **" -o "$out-transfer.png" 2>/dev/null
