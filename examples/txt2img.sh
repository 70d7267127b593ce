#!/bin/sh
# examples/txt2img.sh - text to image with the sdpipe tools, as diffusers' StableDiffusionPipeline does it:
#
#   sd-tokenize PROMPT | sd-text-encode | sd-noise - | sd-unet-step | sd-vae-decode | tensortopnm
#
# Usage: txt2img.sh [OPTION]... PROMPT [OUT]
#   -m, --model PATH      the model (default $SD_MODEL)
#   -s, --seed S          seed of torch's generator (default $SEED, else a random one, printed)
#       --sampler NAME    pndm, ddim, ddpm, euler, euler_a, dpmpp_2m, lms (default $SAMPLER, else pndm)
#       --steps N         inference steps (default $STEPS, else 50)
#   -g, --guidance G      classifier-free guidance scale (default $GUIDANCE, else 7.5)
#   -W, --width N         image width (default $WIDTH, else the model's: 512 for SD 1.x)
#   -H, --height N        image height (default $HEIGHT, else the model's)
#   -n, --negative TEXT   negative prompt (default empty)
#       --spacing S       timestep spacing leading, trailing or linspace (default: the model's config)
#       --lora PATH[:W]   a LoRA adapter for the text encoder and the UNet (repeatable)
#   -v, --verbose         let every tool report its progress
# OUT is a .ppm (default txt2img.ppm), a .png (through pnmtopng) or - for standard output.
# The defaults are diffusers' (and the study's): PNDM, 50 steps, guidance 7.5, 512x512 for SD 1.x.
set -eu
usage() { sed -n '4,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "txt2img.sh: $*" >&2; exit 2; }
model=${SD_MODEL:-} seed=${SEED:-} sampler=${SAMPLER:-pndm} steps=${STEPS:-50} guidance=${GUIDANCE:-7.5}
width=${WIDTH:-} height=${HEIGHT:-} negative='' spacing='' lora='' verbose=''
while [ $# -gt 0 ]; do
	case $1 in
	-m|--model) model=${2?}; shift 2;;
	-s|--seed) seed=${2?}; shift 2;;
	--sampler) sampler=${2?}; shift 2;;
	--steps) steps=${2?}; shift 2;;
	-g|--guidance) guidance=${2?}; shift 2;;
	-W|--width) width=${2?}; shift 2;;
	-H|--height) height=${2?}; shift 2;;
	-n|--negative) negative=${2?}; shift 2;;
	--spacing) spacing=${2?}; shift 2;;
	--lora) lora="$lora --lora $2"; shift 2;;
	-v|--verbose) verbose=-v; shift;;
	-h|--help) usage;;
	--) shift; break;;
	-*) die "unknown option '$1' (see --help)";;
	*) break;;
	esac
done
[ $# -ge 1 ] && [ $# -le 2 ] || usage 2 >&2
prompt=$1 out=${2:-txt2img.ppm}
[ -n "$model" ] || die "no model: give -m MODEL or set SD_MODEL"
top=$(cd "$(dirname "$0")/.." && pwd)
[ -x "$top/${BIN:-bin}/sd-unet-step" ] && PATH="$top/${BIN:-bin}:$PATH"
[ -n "$seed" ] || seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
[ -n "$verbose" ] && echo "txt2img.sh: seed $seed" >&2

# the size and spacing flags only when given; word splitting of $size, $sp and $lora is intended
size="${width:+-W $width} ${height:+-H $height}"
sp=${spacing:+--spacing $spacing}
case $out in
-) sink() { cat; };;
*.png) sink() { pnmtopng > "$out.tmp" && mv "$out.tmp" "$out"; };;
*) sink() { cat > "$out.tmp" && mv "$out.tmp" "$out"; };;
esac
# shellcheck disable=SC2086
sd-tokenize -m "$model" --negative "$negative" -- "$prompt" |
	sd-text-encode -m "$model" $lora $verbose |
	sd-noise -m "$model" $size --seed "$seed" --sampler "$sampler" --steps "$steps" $sp $verbose - |
	sd-unet-step -m "$model" --guidance "$guidance" $lora $verbose |
	sd-vae-decode -m "$model" $verbose |
	tensortopnm | sink || { rm -f "$out.tmp"; exit 1; }
[ "$out" = - ] || echo "$out"
