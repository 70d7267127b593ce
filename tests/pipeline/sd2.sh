#!/bin/sh
# tests/pipeline/sd2.sh - SD 2.x through the tools against diffusers 0.25.1 (../shared/fixtures-sd2-sdxl,
# golden/sd2-tiny: a v-prediction UNet with upcast attention and per-block head counts, linear
# proj_in/out, a gelu CLIP, a tokenizer that pads with '!'): the tokens and last hidden states, the UNet's
# raw v prediction at integer and float timesteps, the seeded DDIM and Euler txt2img (the generator
# carried through Euler's unused per-step draws) and the seeded img2img at strength 0.7; tensors within
# 1e-4 relative, images within 2 levels.  SKIPs when the shared fixtures are absent.
. tests/pipeline/lib.sh

F=${SD2_SDXL_FIXTURES:-../shared/fixtures-sd2-sdxl}
M=$F/sd2-tiny
G=$F/golden/sd2-tiny
py="python3 tests/pipeline/goldens.py"
[ -d "$M/unet" ] || { skip sd2 "the SD 2.x fixtures are absent from $F"; exit 0; }
command -v python3 >/dev/null 2>&1 || { skip sd2 "no python3 for the numeric checks"; exit 0; }
unset SD_MODEL SD_MODEL_CONFIG
SD_DEVICE=cpu; export SD_DEVICE
astro='a photograph of an astronaut riding a horse'
barn='a watercolor painting of a red barn'

num() {
	n=$1; shift
	if out=$(sh -c "$*" 2>&1); then pass "$n ($(echo "$out" | tail -n 1))"; else fail "$n" "$(echo "$out" | tail -n 3 | head -c 300)"; fi
}

# ==== text: '!' padding, last_hidden_state ====
sd-tokenize -m "$M" "$astro" >"$T/astro.tok" 2>/dev/null
num tokens-pad-bang "$py compare '$T/astro.tok' tokens '$G/text_encoder.safetensors' 'text_encoder.input_ids[0]' 0"
num tokens-empty-negative "$py compare '$T/astro.tok' uncond_tokens '$G/text_encoder.safetensors' 'text_encoder.input_ids[1]' 0"
$py frame "$T/ids.st" tokens="$G/text_encoder.safetensors:text_encoder.input_ids"
ok text-encode-golden-ids "sd-text-encode -m '$M' <'$T/ids.st' >'$T/ids.ctx'"
num text-last-hidden-state "$py compare '$T/ids.ctx' context '$G/text_encoder.safetensors' text_encoder.last_hidden_state 1e-4"
sd-text-encode -m "$M" <"$T/astro.tok" >"$T/astro.st" 2>/dev/null
num text-prompt-embeds "$py compare '$T/astro.st' context '$G/txt2img_seeded_ddim.safetensors' prompt_embeds 1e-4"
num text-negative-embeds "$py compare '$T/astro.st' uncond_context '$G/txt2img_seeded_ddim.safetensors' negative_prompt_embeds 1e-4"

# ==== the UNet's raw v prediction ====
$py frame "$T/u.st" latent="$G/unet.safetensors:latent" context="$G/unet.safetensors:encoder_hidden_states"
k=0
for t in 999 500 1; do
	sd-unet-step -m "$M" --predict "$t" <"$T/u.st" >"$T/p.st" 2>/dev/null
	num "predict-$t" "$py compare '$T/p.st' eps '$G/unet.safetensors' 'noise_pred[$k]' 1e-4"
	k=$((k + 1))
done
sd-unet-step -m "$M" --predict 500.5 <"$T/u.st" >"$T/p.st" 2>/dev/null
num predict-float "$py compare '$T/p.st' eps '$G/unet.safetensors' noise_pred_float_timestep 1e-4"

# the pipelines run on the normal build (the sanitized tools run the same code above and in generate.sh)
case ${B:-build} in *san*|*vg*) skip sd2-pipelines "run on the normal build"; finish;; esac

# ==== seeded txt2img: DDIM and Euler (leading spacing, v-prediction), seed 1, 8 steps, CFG 7.5 ====
for s in ddim euler; do
	g=$G/txt2img_seeded_$s.safetensors
	sd-noise -m "$M" -W 64 -H 64 --seed 1 --sampler $s --steps 8 >"$T/n.st" 2>/dev/null
	# sd-noise writes the draw; the sampler scales it by init_noise_sigma at its first step
	num "$s-latents-drawn" "$py compare '$T/n.st' latent '$g' latents_drawn 0"
	sd-unet-step -m "$M" -c "$T/astro.st" --guidance 7.5 <"$T/n.st" >"$T/$s.st" 2>/dev/null
	num "$s-latents-final" "$py compare '$T/$s.st' latent '$g' 'latents_after_step[7]' 1e-4"
	ok "$s-decode" "sd-vae-decode -m '$M' <'$T/$s.st' | tensortopnm >'$T/$s.ppm'"
	num "$s-image" "$py ppm '$T/$s.ppm' '$g' image_u8 2"
done
# EulerDiscreteScheduler.step draws one unused randn per step: 4096 + 8 x 4096
ok euler-generator-draws "[ \"\$($py get '$T/euler.st' generator.draws)\" = 36864 ]"

# ==== seeded img2img, strength 0.7: the posterior draw, then the noise, from one generator ====
sd-tokenize -m "$M" "$barn" | sd-text-encode -m "$M" >"$T/barn.st" 2>/dev/null
pnmtotensor "$F/golden/test_image_64.ppm" | sd-vae-encode -m "$M" --sample --seed 1 \
	| sd-noise -m "$M" --strength 0.7 --sampler ddim --steps 8 >"$T/i.st" 2>/dev/null
num img2img-noisy-latents "$py compare '$T/i.st' latent '$G/img2img_seeded.safetensors' noisy_latents 1e-4"
sd-unet-step -m "$M" -c "$T/barn.st" --guidance 7.5 <"$T/i.st" >"$T/io.st" 2>/dev/null
num img2img-latents "$py compare '$T/io.st' latent '$G/img2img_seeded.safetensors' 'latents_after_step[4]' 1e-4"
ok img2img-decode "sd-vae-decode -m '$M' <'$T/io.st' | tensortopnm >'$T/io.ppm'"
num img2img-image "$py ppm '$T/io.ppm' '$G/img2img_seeded.safetensors' out_image_u8 2"
finish
