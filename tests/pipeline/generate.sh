#!/bin/sh
# tests/pipeline/generate.sh - sd-noise and sd-unet-step (and the example scripts) on the tiny model,
# against diffusers: the issue's "done when" (sd-txt2img, seed 1234, DDIM 8 steps, guidance 7.5
# = golden/tiny/txt2img_seeded_ddim, ±1 per 8-bit pixel), the Euler-ancestral seeded golden (the
# generator carried from sd-noise through every step), golden/tiny/txt2img from its given latents and
# embeddings (every step and the final latents ≤ 1e-4 relative, image ±1), golden/tiny/img2img from its
# given noisy latents (the arithmetic before that, with the given noise, is test_generate.c's), the
# seeded img2img pipe (determinism, the plan, the generator), a loop of single-step calls byte-equal to
# one call for every sampler, --predict against the UNet golden (with and without LoRA), the plan's
# rules, and a table of bad inputs (exit status, one "prog:" line on stderr, nothing on stdout).
. tests/pipeline/lib.sh

tiny=$SD_FIXTURES/tiny
G=$SD_FIXTURES/golden/tiny
py="python3 tests/pipeline/goldens.py"
[ -d "$tiny/unet" ] || { skip generate "the tiny model is absent from $SD_FIXTURES"; exit 0; }
command -v python3 >/dev/null 2>&1 || { skip generate "no python3 for the numeric checks"; exit 0; }
unset SD_MODEL SD_MODEL_CONFIG SEED SAMPLER STEPS GUIDANCE WIDTH HEIGHT
# the reference (CPU) path: byte-for-byte comparisons stay within one device
SD_DEVICE=cpu; export SD_DEVICE
astro='a photograph of an astronaut riding a horse'
barn='a watercolor painting of a red barn'

# num NAME CMD: a numeric check printing its margin (goldens.py), reported with it
num() {
	n=$1; shift
	if out=$(sh -c "$*" 2>&1); then pass "$n ($(echo "$out" | tail -n 1))"; else fail "$n" "$(echo "$out" | tail -n 3 | head -c 300)"; fi
}

# ==== help, version, usage errors ====
for p in sd-noise sd-unet-step; do
	ok "$p-help" "$p --help >'$T/help' && grep -q '^Usage: $p ' '$T/help' && [ \"\$($p -h)\" = \"\$(cat '$T/help')\" ]"
	ok "$p-version" "$p --version | grep -q '^$p (sdpipe) '"
	bad "$p-bad-option" 2 "$p" "$p --no-such-option"
	bad "$p-no-model" 2 "$p" "$p"
	bad "$p-unknown-sampler" 2 "$p" "$p -m '$tiny' --sampler heun"
	bad "$p-steps-0" 2 "$p" "$p -m '$tiny' --steps 0"
	bad "$p-bad-spacing" 2 "$p" "$p -m '$tiny' --spacing sideways"
	bad "$p-karras-ddim" 2 "$p" "$p -m '$tiny' --sampler ddim --karras"
	bad "$p-missing-model" 1 "$p" "$p -m '$T/nothing-here' --seed 1"
done
bad noise-size-not-multiple 2 sd-noise "sd-noise -m '$tiny' -W 63 --seed 1"
bad noise-size-with-strength 2 sd-noise "sd-noise -m '$tiny' -W 64 --strength 0.5"
bad noise-strength-range 2 sd-noise "sd-noise -m '$tiny' --strength 1.5"
bad unet-guidance-x 2 sd-unet-step "sd-unet-step -m '$tiny' --guidance x"
bad unet-count-0 2 sd-unet-step "sd-unet-step -m '$tiny' --count 0"
bad unet-predict-and-count 2 sd-unet-step "sd-unet-step -m '$tiny' --predict 1 --count 1"

# ==== sd-noise as a source: torch.randn with the seed, one draw for the batch ====
sd-tokenize "$astro" | sd-text-encode -m "$tiny" >"$T/astro.st" 2>/dev/null
ok noise-source "sd-noise -m '$tiny' -W 64 -H 64 --seed 1234 >'$T/noise.st'"
ok noise-shape "sd-info '$T/noise.st' | grep -Eq '^  latent +f32 +\\[1,4,32,32\\]'"
ok noise-generator "[ \"\$($py get '$T/noise.st' generator)\" = '{\"seed\": 1234, \"draws\": 4096, \"cached\": null}' ]"
ok noise-plan-not-started "[ \"\$($py get '$T/noise.st' sampler)\" = '{\"seed\": 1234}' ]"
num noise-is-torch-randn "$py compare '$T/noise.st' latent '$G/txt2img_seeded_ddim.safetensors' latents_drawn 0"
ok noise-default-size "sd-noise -m '$tiny' --seed 1234 | cmp -s - '$T/noise.st'"
ok noise-batch "sd-noise -m '$tiny' --seed 1234 --batch 3 -W 32 -H 16 | sd-info | grep -Eq '^  latent +f32 +\\[3,4,8,16\\]'"
ok noise-batch-one-draw "sd-noise -m '$tiny' --seed 1234 --batch 2 >'$T/noise2.st' && [ \"\$($py get '$T/noise2.st' generator.draws)\" = 8192 ]"
ok noise-random-seed-recorded "sd-noise -m '$tiny' | sd-info | grep -Eq 'generator +\\{seed: [0-9]+'"
ok noise-filter-keeps-keys "sd-noise -m '$tiny' --seed 1234 - <'$T/astro.st' | sd-info | grep -Eq '^  context +f32'"
ok noise-ckpt-same "sd-noise -m '$SD_FIXTURES/tiny.ldm.ckpt' --config '$tiny' --seed 1234 -W 64 -H 64 | cmp -s - '$T/noise.st'"

# ==== the issue's "done when": sd-txt2img, seed 1234, DDIM, 8 steps, guidance 7.5 ====
ok txt2img-script-ddim "sd-txt2img -m '$tiny' --seed 1234 --sampler ddim --steps 8 --guidance 7.5 -p '$astro' -o '$T/ddim.ppm'"
num txt2img-seeded-ddim-image "$py ppm '$T/ddim.ppm' '$G/txt2img_seeded_ddim.safetensors' image_u8 1"
sd-noise -m "$tiny" --seed 1234 --sampler ddim --steps 8 | sd-unet-step -m "$tiny" -c "$T/astro.st" >"$T/ddim.st" 2>/dev/null
for i in 7; do
	num txt2img-seeded-ddim-latents "$py compare '$T/ddim.st' latent '$G/txt2img_seeded_ddim.safetensors' 'latents_after_step[$i]' 1e-4"
done
ok txt2img-plan-finished "[ \"\$($py get '$T/ddim.st' sampler.step) \$($py get '$T/ddim.st' sampler.finished)\" = '8 true' ]"
# Euler ancestral: the golden's scheduler is from_config(SD 1.5's hub config), whose Euler spacing is
# linspace; the tiny folder's saved config says leading, hence --spacing
ok txt2img-script-euler-a "sd-txt2img -m '$tiny' --seed 1234 --sampler euler_a --steps 8 --spacing linspace -p '$astro' -o '$T/ea.ppm'"
num txt2img-seeded-euler-a-image "$py ppm '$T/ea.ppm' '$G/txt2img_seeded_euler_ancestral.safetensors' image_u8 1"
sd-noise -m "$tiny" --seed 1234 --sampler euler_a --steps 8 --spacing linspace >"$T/ea0.st" 2>/dev/null
sd-unet-step -m "$tiny" -c "$T/astro.st" <"$T/ea0.st" >"$T/ea.st" 2>/dev/null
num txt2img-seeded-euler-a-latents "$py compare '$T/ea.st' latent '$G/txt2img_seeded_euler_ancestral.safetensors' 'latents_after_step[7]' 1e-4"
ok txt2img-euler-a-generator "[ \"\$($py get '$T/ea.st' generator.draws)\" = 36864 ]" # 4096 + 8 steps x 4096
ok txt2img-spacing-recorded "[ \"\$($py get '$T/ea.st' sampler.spacing)\" = '\"linspace\"' ]"
ok txt2img-script-png "sd-txt2img -m '$tiny' --seed 1234 --sampler ddim --steps 2 -p '$astro' -o '$T/x.png' && pngtopam '$T/x.png' | pamfile | grep -q '64 by 64'"

# ==== golden/tiny/txt2img: given latents_init and embeddings, every step ====
$py frame "$T/t2i.st" latent="$G/txt2img.safetensors:latents_init" context="$G/txt2img.safetensors:prompt_embeds" \
	uncond_context="$G/txt2img.safetensors:negative_prompt_embeds"
ok txt2img-golden-run "sd-unet-step -m '$tiny' --sampler ddim --steps 8 --guidance 7.5 <'$T/t2i.st' >'$T/t2o.st'"
num txt2img-golden-latents "$py compare '$T/t2o.st' latent '$G/txt2img.safetensors' latents_final 1e-4"
ok txt2img-golden-decode "sd-vae-decode -m '$tiny' '$T/t2o.st' | tensortopnm >'$T/t2o.ppm'"
num txt2img-golden-image "$py ppm '$T/t2o.ppm' '$G/txt2img.safetensors' image_u8 1"
# one step at a time (the flags given once, then carried by the plan), against each golden step
cp "$T/t2i.st" "$T/loop.st"
worst=0
for i in 0 1 2 3 4 5 6 7; do
	if [ "$i" = 0 ]; then flags="--sampler ddim --steps 8 --guidance 7.5"; else flags=""; fi
	sd-unet-step -m "$tiny" -k 1 $flags <"$T/loop.st" >"$T/loop2.st" 2>"$T/loop.err" && mv "$T/loop2.st" "$T/loop.st" || break
	$py compare "$T/loop.st" latent "$G/txt2img.safetensors" "latents_after_step[$i]" 1e-4 >"$T/step.out" || { worst=$i; break; }
done
if [ "$worst" = 0 ] && [ "$i" = 7 ]; then pass "txt2img-golden-each-step (step 8: $(cat "$T/step.out"))"
else fail txt2img-golden-each-step "step $i: $(cat "$T/step.out" "$T/loop.err" 2>/dev/null | head -c 300)"; fi
same txt2img-golden-loop-equals-one-call "$T/loop.st" "$T/t2o.st"

# ==== golden/tiny/img2img: from its noisy latents (begin = t_start = 4 of 10 DDIM steps) ====
sd-tokenize "$barn" | sd-text-encode -m "$tiny" >"$T/barn.st" 2>/dev/null
$py frame "$T/i2i.st" latent="$G/img2img.safetensors:noisy_latents" 'sampler={"name": "ddim", "steps": 10, "begin": 4, "step": 4}'
ok img2img-golden-run "sd-unet-step -m '$tiny' -c '$T/barn.st' --guidance 7.5 <'$T/i2i.st' >'$T/i2o.st'"
num img2img-golden-latents "$py compare '$T/i2o.st' latent '$G/img2img.safetensors' latents_final 1e-4"
ok img2img-golden-decode "sd-vae-decode -m '$tiny' '$T/i2o.st' | tensortopnm >'$T/i2o.ppm'"
num img2img-golden-image "$py ppm '$T/i2o.ppm' '$G/img2img.safetensors' out_image_u8 1"

# ==== the seeded img2img pipe ====
img=$SD_FIXTURES/golden/test_image_64.ppm
pnmtotensor "$img" | sd-vae-encode -m "$tiny" --sample --seed 42 >"$T/enc.st" 2>/dev/null
ok img2img-noise "sd-noise -m '$tiny' --strength 0.6 --sampler ddim --steps 10 '$T/enc.st' >'$T/noisy.st'"
ok img2img-noise-plan "[ \"\$($py get '$T/noisy.st' sampler.begin) \$($py get '$T/noisy.st' sampler.step) \$($py get '$T/noisy.st' sampler.strength)\" = '4 4 0.6' ]"
ok img2img-noise-continues-generator "[ \"\$($py get '$T/noisy.st' generator.seed) \$($py get '$T/noisy.st' generator.draws)\" = '42 8192' ]"
ok img2img-noise-keeps-image "sd-info '$T/noisy.st' | grep -Eq '^  image +f32 +\\[1,3,64,64\\]'"
ok img2img-noise-deterministic "sd-noise -m '$tiny' --strength 0.6 --sampler ddim --steps 10 <'$T/enc.st' | cmp -s - '$T/noisy.st'"
ok img2img-noise-reseed "sd-noise -m '$tiny' --strength 0.6 --sampler ddim --steps 10 --seed 42 <'$T/enc.st' >'$T/re.st' && [ \"\$($py get '$T/re.st' generator.draws)\" = 4096 ]"
ok img2img-run "sd-unet-step -m '$tiny' -c '$T/barn.st' <'$T/noisy.st' >'$T/i2s.st' && [ \"\$($py get '$T/i2s.st' sampler.step)\" = 10 ]"
cp "$T/noisy.st" "$T/l.st"
for i in 1 2 3 4 5 6; do sd-unet-step -m "$tiny" -c "$T/barn.st" -k 1 <"$T/l.st" >"$T/l2.st" 2>/dev/null && mv "$T/l2.st" "$T/l.st"; done
same img2img-loop-equals-one-call "$T/l.st" "$T/i2s.st"
ok img2img-script "sd-img2img -m '$tiny' -s 7 -W 64 -H 64 --steps 10 -i '$img' -p '$barn' -o '$T/a.ppm' && sd-img2img -m '$tiny' -s 7 -W 64 -H 64 --steps 10 -i '$img' -p '$barn' -o '$T/b.ppm'"
same img2img-script-deterministic "$T/a.ppm" "$T/b.ppm"
ok img2img-script-png-in "pnmtopng '$img' >'$T/in.png' && sd-img2img -m '$tiny' -s 7 -W 64 -H 64 --steps 10 -i '$T/in.png' -p '$barn' -o '$T/c.ppm'"
same img2img-script-png-same "$T/a.ppm" "$T/c.ppm"

# ==== a loop of single steps equals one call, byte for byte, for every sampler ====
for s in pndm ddim ddpm euler euler_a dpmpp_2m lms; do
	sd-noise -m "$tiny" --seed 5 --sampler "$s" --steps 3 >"$T/s0.st" 2>/dev/null
	sd-unet-step -m "$tiny" -c "$T/astro.st" <"$T/s0.st" >"$T/one.st" 2>/dev/null
	cp "$T/s0.st" "$T/s.st"; n=0
	while [ $n -lt 6 ] && [ "$($py get "$T/s.st" sampler.finished 2>/dev/null)" != true ]; do
		sd-unet-step -m "$tiny" -c "$T/astro.st" -k 1 <"$T/s.st" >"$T/s2.st" 2>/dev/null && mv "$T/s2.st" "$T/s.st"; n=$((n + 1))
	done
	same "loop-equals-one-call-$s ($n calls)" "$T/s.st" "$T/one.st"
done
sd-noise -m "$tiny" --seed 5 --sampler ddim --steps 4 --eta 0.5 >"$T/s0.st" 2>/dev/null
sd-unet-step -m "$tiny" -c "$T/astro.st" <"$T/s0.st" >"$T/one.st" 2>/dev/null
sd-unet-step -m "$tiny" -c "$T/astro.st" -k 3 <"$T/s0.st" 2>/dev/null | sd-unet-step -m "$tiny" -c "$T/astro.st" >"$T/s.st" 2>/dev/null
same loop-equals-one-call-ddim-eta "$T/s.st" "$T/one.st"
ok count-stops "sd-unet-step -m '$tiny' -c '$T/astro.st' -k 2 <'$T/s0.st' >'$T/k2.st' && [ \"\$($py get '$T/k2.st' sampler.step) \$($py get '$T/k2.st' sampler.finished)\" = '2 false' ]"

# ==== conditioning: -c with one frame for all or one each, or the frame's own ====
ok context-in-frame "sd-noise -m '$tiny' --seed 1234 --sampler ddim --steps 8 - <'$T/astro.st' | sd-unet-step -m '$tiny' >'$T/own.st'"
num context-in-frame-same "$py compare '$T/own.st' latent '$G/txt2img_seeded_ddim.safetensors' 'latents_after_step[7]' 1e-4"
ok cond-one-for-all "cat '$T/noise.st' '$T/noise.st' | sd-unet-step -m '$tiny' -c '$T/astro.st' --sampler ddim --steps 2 | sd-info | grep -qx '2 frames'"
ok cond-pairs "cat '$T/astro.st' '$T/barn.st' >'$T/two.st' && cat '$T/noise.st' '$T/noise.st' | sd-unet-step -m '$tiny' -c '$T/two.st' --sampler ddim --steps 2 >'$T/pairs.st'"
ok cond-batch-repeat "sd-unet-step -m '$tiny' -c '$T/astro.st' --sampler ddim --steps 2 '$T/noise2.st' | sd-info | grep -Eq '^  latent +f32 +\\[2,4,32,32\\]'"
ok guidance-1-no-uncond "sd-unet-step -m '$tiny' -c '$T/astro.st' --sampler ddim --steps 2 --guidance 1 '$T/noise.st' >'$T/g1.st'"
ok guidance-recorded "[ \"\$($py get '$T/g1.st' sampler.guidance)\" = 1.0 ]"

# ==== --predict: the UNet's raw output (golden/tiny/unet.safetensors) ====
$py frame "$T/u.st" latent="$G/unet.safetensors:latent" context="$G/unet.safetensors:encoder_hidden_states"
k=0
for t in 999 500 1; do
	sd-unet-step -m "$tiny" --predict "$t" <"$T/u.st" >"$T/p.st" 2>/dev/null
	num "predict-$t" "$py compare '$T/p.st' eps '$G/unet.safetensors' 'noise_pred[$k]' 1e-4"
	k=$((k + 1))
done
sd-unet-step -m "$tiny" --predict 500.5 <"$T/u.st" >"$T/p.st" 2>/dev/null
num predict-float "$py compare '$T/p.st' eps '$G/unet.safetensors' noise_pred_float_timestep 1e-4"
ok predict-keeps-latent "sd-info '$T/p.st' | grep -Eq '^  latent +f32 +\\[2,4,32,32\\]' && ! sd-info '$T/p.st' | grep -q '^  sampler'"
ok predict-uncond "sd-unet-step -m '$tiny' -c '$T/astro.st' --predict 999 '$T/noise.st' | sd-info | grep -Eq '^  uncond_eps +f32 +\\[1,4,32,32\\]'"
if [ -d "$SD_FIXTURES/tiny-lora/peft/unet" ] && [ -f "$G/lora_outputs.safetensors" ]; then
	k=0
	for t in 999 500 1; do
		sd-unet-step -m "$tiny" --lora "$SD_FIXTURES/tiny-lora/peft" --predict "$t" <"$T/u.st" >"$T/p.st" 2>"$T/lora.err"
		num "predict-lora-$t" "$py compare '$T/p.st' eps '$G/lora_outputs.safetensors' 'unet_noise_pred[$k]' 1e-4"
		k=$((k + 1))
	done
	bad lora-missing 1 sd-unet-step "sd-unet-step -m '$tiny' --lora '$T/nothing' --predict 1 '$T/u.st'"
else
	skip predict-lora "no tiny-lora fixture"
fi

# ==== the plan's rules and bad input ====
bad finished-plan 1 sd-unet-step "sd-unet-step -m '$tiny' -c '$T/astro.st' '$T/ddim.st'"
ok finished-plan-message "sd-unet-step -m '$tiny' -c '$T/astro.st' '$T/ddim.st' 2>&1 | grep -q 'the plan is finished (ddim, 8 of 8 steps done)'"
sd-unet-step -m "$tiny" -c "$T/astro.st" --sampler ddim --steps 8 -k 1 <"$T/noise.st" >"$T/started.st" 2>/dev/null
bad started-plan-other-sampler 1 sd-unet-step "sd-unet-step -m '$tiny' -c '$T/astro.st' --sampler euler '$T/started.st'"
bad started-plan-other-steps 1 sd-unet-step "sd-unet-step -m '$tiny' -c '$T/astro.st' --steps 9 '$T/started.st'"
ok started-plan-same-flags "sd-unet-step -m '$tiny' -c '$T/astro.st' --sampler ddim --steps 8 -k 1 '$T/started.st' >/dev/null"
bad missing-context 1 sd-unet-step "sd-unet-step -m '$tiny' '$T/noise.st'"
ok missing-context-message "sd-unet-step -m '$tiny' '$T/noise.st' 2>&1 | grep -q 'no \"context\" key'"
bad cond-without-context 1 sd-unet-step "sd-unet-step -m '$tiny' -c '$T/noise.st' '$T/noise.st'"
$py frame "$T/lat3.st" latent="$G/unet.safetensors:latent" context="$G/unet.safetensors:encoder_hidden_states"
python3 - "$T/lat3.st" <<'EOF'
import struct, sys
sys.path.insert(0, 'tests/pipeline')
import goldens
f = list(goldens.frames(sys.argv[1]))[0]
f['latent'] = {'dtype': 'f32', 'shape': [1, 3, 4, 4], 'data': struct.pack('<48f', *([0.5] * 48))}
open(sys.argv[1], 'wb').write(goldens.pack(f))
EOF
bad latent-channels 1 sd-unet-step "sd-unet-step -m '$tiny' --sampler ddim --steps 2 '$T/lat3.st'"
ok latent-channels-message "sd-unet-step -m '$tiny' '$T/lat3.st' 2>&1 | grep -q 'the latent has 3 channels, the model expects 4'"
bad no-latent 1 sd-unet-step "sd-unet-step -m '$tiny' '$T/astro.st'"
$py frame "$T/badplan.st" latent="$G/txt2img.safetensors:latents_init" 'sampler={"name": "heun", "steps": 8}'
bad plan-unknown-sampler 1 sd-unet-step "sd-unet-step -m '$tiny' -c '$T/astro.st' '$T/badplan.st'"
bad euler-a-without-generator 1 sd-unet-step "sd-unet-step -m '$tiny' -c '$T/astro.st' --sampler euler_a --steps 2 '$T/t2i.st'"
ok euler-a-with-seed "sd-unet-step -m '$tiny' -c '$T/astro.st' --sampler euler_a --steps 2 --seed 3 '$T/t2i.st' >'$T/ea3.st' && [ \"\$($py get '$T/ea3.st' generator.seed) \$($py get '$T/ea3.st' generator.draws)\" = '3 8192' ]"
ok cond-too-few "! cat '$T/noise.st' '$T/noise.st' '$T/noise.st' | sd-unet-step -m '$tiny' -c '$T/two.st' --sampler ddim --steps 1 >'$T/few.st' 2>'$T/few.err' && sd-info '$T/few.st' | grep -qx '2 frames' && grep -q 'holds 2 conditioning frames, fewer than the input' '$T/few.err'"
bad empty-input 1 sd-unet-step "sd-unet-step -m '$tiny' -c '$T/astro.st'"
bad garbage 1 sd-unet-step "printf 'not msgpack' | sd-unet-step -m '$tiny' -c '$T/astro.st'"
bad noise-strength-no-latent 1 sd-noise "sd-noise -m '$tiny' --strength 0.5 '$T/astro.st'"
bad noise-strength-no-step 1 sd-noise "sd-noise -m '$tiny' --strength 0 --sampler ddim --steps 10 '$T/enc.st'"
bad noise-strength-started 1 sd-noise "sd-noise -m '$tiny' --strength 0.5 '$T/started.st'"
bad noise-latent-present 1 sd-noise "sd-noise -m '$tiny' --seed 1 - <'$T/noise.st'"
bad noise-empty-input 1 sd-noise "sd-noise -m '$tiny' --strength 0.5"
# a bad frame after a good one: the good frame is out whole, nothing of the bad one
ok good-then-bad "! cat '$T/noise.st' '$T/lat3.st' | sd-unet-step -m '$tiny' -c '$T/astro.st' --sampler ddim --steps 1 >'$T/gb.st' 2>/dev/null && sd-info '$T/gb.st' | grep -qx '1 frame'"
finish
