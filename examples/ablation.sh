#!/bin/bash
# examples/ablation.sh - the study's four settings on one style: LoRA on all three components; without
# the text encoder; without the VAE; without the UNet.  Each trains an adapter (PEFT folders, since
# three of them hold a VAE adapter), draws the study's prompts "A photo of a doctor/car/boy in the
# style of **", and transfers the style of a content picture (img2img, strength 0.7, "A photo in the
# style of **").  A contact sheet puts one setting per row (the base model first), one image per
# column, made with netpbm's pnmcat.
#
# Usage: ablation.sh [OPTION]... DIR CAPTION CONTENT [OUTDIR]
#   -m, --model PATH      the model (default $SD_MODEL)
#   -s, --seed S          seed of everything (default $SEED, else 0)
#   -r, --resolution N    training and image size (default $RESOLUTION, else the model's own)
#       --epochs N        (default $EPOCHS, else 100)
#       --steps N         inference steps (default $STEPS, else 50)
#   -v, --verbose         let every tool report its progress
# DIR holds the pictures of the style (PNG, JPEG or PNM); CONTENT is the picture to transfer.
# OUTDIR (default ablation) receives <setting>/ adapters, <setting>-*.ppm and
# sheet.ppm; settings: all, no-text, no-vae, no-unet.
set -euo pipefail
usage() { sed -n '9,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "ablation.sh: $*" >&2; exit 2; }
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
	-*) die "unknown option '$1' (see --help)";;
	*) break;;
	esac
done
[ $# -ge 3 ] && [ $# -le 4 ] || usage 2 >&2
dir=$1 caption=$2 content=$3 outdir=${4:-ablation}
[ -n "$model" ] || die "no model: give -m MODEL or set SD_MODEL"
top=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$top/${BIN:-bin}/sd-lora-train" ] && PATH="$top/${BIN:-bin}:$PATH"
mkdir -p "$outdir"

images() { # NAME [LORA]
	n=$1 l=${2:+--lora $2}
	for what in doctor car boy; do
		sd-txt2img -m "$model" -s "$seed" ${res:+-W "$res" -H "$res"} --steps "$steps" $l $verbose \
			-p "A photo of a $what in the style of **" -o "$outdir/$n-$what.ppm" --force >/dev/null 2>&1
	done
	sd-img2img -m "$model" -s "$seed" ${res:+-W "$res" -H "$res"} --steps "$steps" --strength 0.7 $l \
		$verbose -i "$content" -p "A photo in the style of **" -o "$outdir/$n-transfer.ppm" --force >/dev/null 2>&1
	pnmcat -lr "$outdir/$n-doctor.ppm" "$outdir/$n-car.ppm" "$outdir/$n-boy.ppm" "$outdir/$n-transfer.ppm" \
		> "$outdir/$n-row.ppm"
}

images base
rows="$outdir/base-row.ppm"
for setting in all:unet,text,vae no-text:unet,vae no-vae:unet,text no-unet:text,vae; do
	n=${setting%%:*} train=${setting#*:}
	echo "ablation.sh: $n (--train $train)" >&2
	sd-lora-train -m "$model" --seed "$seed" ${res:+--resolution "$res"} --epochs "$epochs" --caption "$caption" \
		--train "$train" --log "$outdir/$n-loss.tsv" $verbose -o "$outdir/$n/" "$dir"
	images "$n" "$outdir/$n"
	rows="$rows $outdir/$n-row.ppm"
done
pnmcat -tb $rows > "$outdir/sheet.ppm"
rm -f $rows
echo "$outdir/sheet.ppm"
