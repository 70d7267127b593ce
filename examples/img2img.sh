#!/bin/sh
# examples/img2img.sh - style transfer (image to image) with the sdpipe tools, as diffusers'
# StableDiffusionImg2ImgPipeline does it: the picture is squashed to the size, encoded by the VAE (a
# posterior sample), noised to the start step, denoised with the prompt, and decoded:
#
#   pnmtotensor | sd-vae-encode --sample | sd-noise --strength | sd-unet-step -c COND | sd-vae-decode | tensortopnm
#
# Usage: img2img.sh [OPTION]... IN PROMPT [OUT]
#   -m, --model PATH      the model (default $SD_MODEL)
#   -s, --seed S          seed of torch's generator (default $SEED, else a random one, printed)
#       --strength S      how much of the schedule runs, in [0, 1] (default $STRENGTH, else 0.7)
#       --sampler NAME    pndm, ddim, ddpm, euler, euler_a, dpmpp_2m, lms (default $SAMPLER, else pndm)
#       --steps N         inference steps of the whole schedule (default $STEPS, else 50)
#   -g, --guidance G      classifier-free guidance scale (default $GUIDANCE, else 7.5)
#   -W, --width N         the size the picture is squashed to (default $WIDTH, else 512)
#   -H, --height N        (default $HEIGHT, else 512)
#   -n, --negative TEXT   negative prompt (default empty)
#       --lora PATH[:W]   a LoRA adapter for every model part (repeatable)
#   -v, --verbose         let every tool report its progress
# IN is any picture netpbm reads (PPM, PNG, JPEG, ...); OUT a .ppm (default img2img.ppm), a .png or -.
# The defaults are the study's style transfer: PNDM, 50 steps (35 run), guidance 7.5, strength 0.7, 512x512.
set -eu
usage() { sed -n '8,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "img2img.sh: $*" >&2; exit 2; }
model=${SD_MODEL:-} seed=${SEED:-} strength=${STRENGTH:-0.7} sampler=${SAMPLER:-pndm} steps=${STEPS:-50}
guidance=${GUIDANCE:-7.5} width=${WIDTH:-512} height=${HEIGHT:-512} negative='' lora='' verbose=''
while [ $# -gt 0 ]; do
	case $1 in
	-m|--model) model=${2?}; shift 2;;
	-s|--seed) seed=${2?}; shift 2;;
	--strength) strength=${2?}; shift 2;;
	--sampler) sampler=${2?}; shift 2;;
	--steps) steps=${2?}; shift 2;;
	-g|--guidance) guidance=${2?}; shift 2;;
	-W|--width) width=${2?}; shift 2;;
	-H|--height) height=${2?}; shift 2;;
	-n|--negative) negative=${2?}; shift 2;;
	--lora) lora="$lora --lora $2"; shift 2;;
	-v|--verbose) verbose=-v; shift;;
	-h|--help) usage;;
	--) shift; break;;
	-*) die "unknown option '$1' (see --help)";;
	*) break;;
	esac
done
[ $# -ge 2 ] && [ $# -le 3 ] || usage 2 >&2
in=$1 prompt=$2 out=${3:-img2img.ppm}
[ -n "$model" ] || die "no model: give -m MODEL or set SD_MODEL"
[ -r "$in" ] || die "$in: cannot read the picture"
top=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$top/${BIN:-bin}/sd-unet-step" ] && PATH="$top/${BIN:-bin}:$PATH"
[ -n "$seed" ] || seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
[ -n "$verbose" ] && echo "img2img.sh: seed $seed" >&2
tmp=$(mktemp -d "${TMPDIR:-/tmp}/img2img.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

case $in in
*.png|*.PNG) pngtopam "$in";;
*.ppm|*.pgm|*.pnm|*.pam) cat "$in";;
*) anytopnm "$in" 2>/dev/null;;
esac | pamscale -xsize "$width" -ysize "$height" > "$tmp/in.pnm" || die "$in: cannot read the picture"

# shellcheck disable=SC2086
sd-tokenize -m "$model" --negative "$negative" -- "$prompt" | sd-text-encode -m "$model" $lora $verbose > "$tmp/cond.st"
case $out in
-) sink() { cat; };;
*.png) sink() { pnmtopng > "$out.tmp" && mv "$out.tmp" "$out"; };;
*) sink() { cat > "$out.tmp" && mv "$out.tmp" "$out"; };;
esac
# shellcheck disable=SC2086
pnmtotensor "$tmp/in.pnm" |
	sd-vae-encode -m "$model" --sample --seed "$seed" $lora $verbose |
	sd-noise -m "$model" --strength "$strength" --sampler "$sampler" --steps "$steps" $verbose |
	sd-unet-step -m "$model" -c "$tmp/cond.st" --guidance "$guidance" $lora $verbose |
	sd-vae-decode -m "$model" $lora $verbose |
	tensortopnm | sink || { rm -f "$out.tmp"; exit 1; }
[ "$out" = - ] || echo "$out"
