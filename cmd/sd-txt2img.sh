#!/bin/bash
# sd-txt2img, sd-img2img - one command from a prompt (and a picture) to PNG files (see sd-txt2img(1) and
# sd-img2img(1)).  One script, installed under both names; what it does follows the name it is called by.
# The sdpipe tools run in the order of diffusers' StableDiffusionPipeline and StableDiffusionImg2ImgPipeline:
#
#   sd-tokenize | sd-text-encode > COND
#   sd-noise | sd-unet-step -c COND | sd-vae-decode | tensortopng                       (txt2img)
#   pnmtotensor | sd-vae-encode --sample | sd-noise --strength | sd-unet-step -c COND | ... (img2img)
#
# Every --lora is given once and applied to each model part the adapter holds.  The PNGs carry the
# generation's parameters as AUTOMATIC1111 writes them.  Any failure exits non-zero and leaves no file.
set -euo pipefail
prog=$(basename "$0")
case $prog in *img2img*) mode=img2img;; *) mode=txt2img;; esac

usage() {
	if [ $mode = txt2img ]; then
		echo "Usage: $prog -m MODEL -p PROMPT [OPTION]..."
		echo "Generate images from a text prompt with a Stable Diffusion model."
	else
		echo "Usage: $prog -m MODEL -i IMAGE -p PROMPT [OPTION]..."
		echo "Redraw a picture (PNG, JPEG or PNM) after a text prompt with a Stable Diffusion model (style"
		echo "transfer): its latent is noised to --strength of the schedule and denoised with the prompt."
	fi
	cat <<EOF
The images are PNG files that carry their parameters (prompt, sampler, steps, CFG scale, seed,
size, model, LoRA weights) as AUTOMATIC1111 writes them.

  -m, --model PATH        diffusers folder, single-file .safetensors or .ckpt (default \$SD_MODEL)
  -p, --prompt TEXT       the prompt
  -N, --negative TEXT     the negative prompt (default empty)
EOF
	[ $mode = img2img ] && cat <<EOF
  -i, --image FILE        the picture to start from (PNG, JPEG, PNM)
      --strength S        how much of the schedule runs, in (0, 1] (default 0.7)
EOF
	cat <<EOF
  -W, --width N           image width (default: $([ $mode = txt2img ] && echo "the model's own size, 512 for SD 1.x" || echo "the picture's, rounded down to a multiple of 8"))
  -H, --height N          image height (default: likewise)
      --steps N           inference steps (default 50)
      --sampler NAME      pndm, ddim, ddpm, euler, euler_a, dpmpp_2m, lms (default pndm)
      --karras            Karras sigmas (euler, euler_a, dpmpp_2m, lms)
      --spacing S         leading, trailing or linspace (default: the model's scheduler config)
  -g, --guidance G        classifier-free guidance scale (default 7.5)
  -n, --images N          images, drawn as one batch (default 1)
  -s, --seed S            seed of torch's generator (default: a random one; always printed)
      --lora PATH[:SCALE] a LoRA adapter (kohya/A1111 file, diffusers file or PEFT folder), applied to
                          the text encoder, the UNet and the VAE as far as it holds them; repeatable
  -o, --output FILE       FILE.png (default $mode.png; with -n N > 1: FILE-1.png ... FILE-N.png), or
                          FILE.ppm for one image without parameters
  -f, --force             replace existing files that sdpipe did not write
  -v, --verbose           let every tool report its progress
  -h, --help              display this help and exit
      --version           output version information and exit

The seed goes to standard error ("$prog: seed S"), the names of the files written to standard output.
EOF
	if [ $mode = txt2img ]; then
		echo "Example: $prog -m sd15 -p 'a photo of a lighthouse' --seed 1234 -o lighthouse.png"
	else
		echo "Example: $prog -m sd15 -i table.png -p 'a photo in the style of **' --lora sketch.safetensors -o out.png"
	fi
	exit 0
}
usage_error() { printf '%s: %s\nTry '\''%s --help'\''.\n' "$prog" "$1" "$prog" >&2; exit 2; }
die() { printf '%s: %s\n' "$prog" "$1" >&2; exit 1; }
need() { [ $# -ge 2 ] || usage_error "option '$1' requires an argument"; }
uint() { [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] || usage_error "$1: '$2' is not an integer >= $3"; }

model=${SD_MODEL:-} prompt='' prompt_set='' negative='' image='' strength=0.7 width='' height=''
steps=50 sampler=pndm karras='' spacing='' guidance=7.5 images=1 seed='' out='' force='' verbose=''
lora=()
while [ $# -gt 0 ]; do
	case $1 in
	-m|--model) need "$@"; model=$2; shift 2;;
	-p|--prompt) need "$@"; prompt=$2; prompt_set=1; shift 2;;
	-N|--negative) need "$@"; negative=$2; shift 2;;
	-i|--image) [ $mode = img2img ] || usage_error "unrecognized option '$1' (sd-img2img takes a picture)"
		need "$@"; image=$2; shift 2;;
	--strength) [ $mode = img2img ] || usage_error "unrecognized option '$1' (sd-img2img takes a strength)"
		need "$@"; strength=$2; shift 2;;
	-W|--width) need "$@"; uint "$1" "$2" 8; width=$2; shift 2;;
	-H|--height) need "$@"; uint "$1" "$2" 8; height=$2; shift 2;;
	--steps) need "$@"; uint "$1" "$2" 1; steps=$2; shift 2;;
	--sampler) need "$@"; sampler=$2; shift 2;;
	--karras) karras=--karras; shift;;
	--spacing) need "$@"; spacing=$2; shift 2;;
	-g|--guidance) need "$@"; guidance=$2; shift 2;;
	-n|--images) need "$@"; uint "$1" "$2" 1; images=$2; shift 2;;
	-s|--seed) need "$@"; uint "$1" "$2" 0; seed=$2; shift 2;;
	--lora) need "$@"; lora+=(--lora "$2"); shift 2;;
	-o|--output) need "$@"; out=$2; shift 2;;
	-f|--force) force=--force; shift;;
	-v|--verbose) verbose=-v; shift;;
	-h|--help) usage;;
	--version) echo "$prog (sdpipe) @VERSION@"; exit 0;;
	--) shift; break;;
	-*) usage_error "unrecognized option '$1'";;
	*) break;;
	esac
done
[ $# -eq 0 ] || usage_error "unexpected operand '$1' (the prompt goes after -p)"
[ -n "$prompt_set" ] || usage_error "no prompt: give -p PROMPT"
[ -n "$model" ] || usage_error "no model: give -m MODEL or set SD_MODEL"
[ $mode = txt2img ] || [ -n "$image" ] || usage_error "no picture: give -i IMAGE"
out=${out:-$mode.png}
case $out in
*.png|*.PNG) kind=png;;
*.ppm|*.pnm) kind=ppm; [ "$images" -eq 1 ] || usage_error "-o $out: a PPM holds one image; use FILE.png with -n $images";;
*) usage_error "-o $out: the output is FILE.png (or FILE.ppm)";;
esac

# the tools next to this script come first (bin/ of a build, or the installed prefix)
here=$(dirname "$(readlink -f "$0")")
[ -x "$here/sd-unet-step" ] && PATH="$here:$PATH"

# the names the images will have: FILE.png, or FILE-1.png … FILE-N.png (as tensortopng numbers them);
# one in the way fails now, before any work (tensortopng checks again when it writes)
names=()
if [ "$images" -eq 1 ]; then names=("$out"); else
	for i in $(seq 1 "$images"); do names+=("${out%.*}-$i.${out##*.}"); done
fi
for f in "${names[@]}"; do
	[ -e "$f" ] || [ -L "$f" ] || continue
	[ -n "$force" ] && continue
	[ $kind = png ] && head -c 65536 "$f" | grep -aq 'Software.sdpipe' && continue
	die "$f: exists and was not written by sdpipe; refusing to replace it (use --force)"
done
[ -n "$seed" ] || seed=$(( $(od -An -N4 -tu4 /dev/urandom | tr -d ' ') % 4294967296 ))
echo "$prog: seed $seed" >&2

tmp=$(mktemp -d "${TMPDIR:-/tmp}/$prog.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

sched=(--sampler "$sampler" --steps "$steps")
[ -n "$karras" ] && sched+=("$karras")
[ -n "$spacing" ] && sched+=(--spacing "$spacing")
size=()
[ -n "$width" ] && size+=(-W "$width")
[ -n "$height" ] && size+=(-H "$height")

sd-tokenize -m "$model" --negative "$negative" -- "$prompt" |
	sd-text-encode -m "$model" "${lora[@]}" $verbose > "$tmp/cond.sdt"

if [ $kind = png ]; then
	sink() { tensortopng $force -o "$1"; }
else
	sink() { tensortopnm > "$tmp/out.ppm" && mv -f "$tmp/out.ppm" "$1"; }
fi
denoise() {
	sd-unet-step -m "$model" -c "$tmp/cond.sdt" --guidance "$guidance" "${lora[@]}" $verbose |
		sd-vae-decode -m "$model" "${lora[@]}" $verbose
}

if [ $mode = txt2img ]; then
	# -n images are one batch drawn from one generator (diffusers' num_images_per_prompt)
	sd-noise -m "$model" "${size[@]}" -b "$images" --seed "$seed" "${sched[@]}" $verbose |
		denoise | sink "$out" || exit 1
else
	[ -r "$image" ] || die "$image: cannot read the picture"
	# the picture at the size asked, else its own rounded down to a multiple of 8 (as diffusers'
	# VaeImageProcessor does), squashed with netpbm's pamscale only when the size changes
	pnmtotensor "$image" > "$tmp/in.sdt"
	dims=$(sd-info "$tmp/in.sdt" | sed -n 's/^  image  *f32  *\[1,[0-9]*,\([0-9]*\),\([0-9]*\)\].*/\2 \1/p')
	read -r iw ih <<<"$dims" || die "$image: holds no picture"
	w=${width:-$(( iw / 8 * 8 ))} h=${height:-$(( ih / 8 * 8 ))}
	[ "$w" -ge 8 ] && [ "$h" -ge 8 ] || die "$image: ${iw}x$ih is too small (at least 8x8)"
	if [ "$w" != "$iw" ] || [ "$h" != "$ih" ]; then
		tensortopnm "$tmp/in.sdt" | pamscale -xsize "$w" -ysize "$h" | pnmtotensor > "$tmp/scaled.sdt"
		mv "$tmp/scaled.sdt" "$tmp/in.sdt"
	fi
	# -n images: seeds S, S+1, ... one after another (as AUTOMATIC1111 numbers a batch's seeds)
	for i in $(seq 1 "$images"); do
		sd-vae-encode -m "$model" --sample --seed $(( seed + i - 1 )) "${lora[@]}" $verbose "$tmp/in.sdt" |
			sd-noise -m "$model" --strength "$strength" "${sched[@]}" $verbose |
			denoise | sink "${names[$((i - 1))]}" || exit 1
	done
fi
printf '%s\n' "${names[@]}"
