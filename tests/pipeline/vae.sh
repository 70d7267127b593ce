#!/bin/sh
# tests/pipeline/vae.sh - sd-vae-encode and sd-vae-decode run the way their man pages show them: the
# tiny model's round trip from a PPM back to a PPM, shapes and pass-through seen by sd-info, posterior
# samples reproducible from --seed and the frame's "generator", tiling, and a table of bad inputs
# (exit status, one "prog:" line on stderr, nothing on stdout).  The numbers themselves (latent =
# 0.18215 × the golden mean, decode = the golden decode) are checked by tests/unit/test_vae.c.
. tests/pipeline/lib.sh

img=$SD_FIXTURES/golden/test_image_64.ppm
tiny=$SD_FIXTURES/tiny
[ -d "$tiny/vae" ] || { skip vae "the tiny model is absent from $SD_FIXTURES"; exit 0; }

# hex STRING: write the bytes spelled in hex (POSIX printf knows only octal escapes).
hex() {
	for h in $(printf '%s' "$1" | sed 's/../& /g'); do printf "\\$(printf %03o "0x$h")"; done
}
# tensor DTYPE SHAPE-HEX DATA-HEX: a msgpack tensor map {"dtype": DTYPE, "shape": […], "data": bin8}.
tensor() {
	d=$(printf '%s' "$1" | od -An -tx1 | tr -d ' \n')
	n=$(printf '%02x' $((${#3} / 2)))
	printf '83a56474797065%02x%sa5736861706594%sa464617461c4%s%s' $((0xa0 + ${#1})) "$d" "${2#94}" "$n" "$3"
}
k_latent=a66c6174656e74 # fixstr "latent"
k_image=a5696d616765    # fixstr "image"
zero=00000000

# ==== help, version, usage errors ====
for p in sd-vae-encode sd-vae-decode; do
	ok "$p-help" "$p --help >'$T/help' && grep -q '^Usage: $p ' '$T/help' && [ \"\$($p -h)\" = \"\$(cat '$T/help')\" ]"
	ok "$p-version" "$p --version | grep -q '^$p (sdpipe) '"
	bad "$p-bad-option" 2 "$p" "$p --no-such-option"
	bad "$p-bad-tile" 2 "$p" "$p -m '$tiny' --tile x"
	bad "$p-tile-not-multiple" 2 "$p" "$p -m '$tiny' --tile 33"
	bad "$p-bad-device" 2 "$p" "$p -m '$tiny' --device tpu"
	bad "$p-no-model" 1 "$p" "SD_MODEL= $p"
	bad "$p-missing-model" 1 "$p" "$p -m '$T/nothing-here'"
	bad "$p-empty-input" 1 "$p" "$p -m '$tiny'"
done
bad encode-seed-without-sample 2 sd-vae-encode "sd-vae-encode -m '$tiny' --seed 1"

# ==== the round trip ====
ok roundtrip "pnmtotensor '$img' | sd-vae-encode -m '$tiny' | sd-vae-decode -m '$tiny' | tensortopnm >'$T/out.ppm'"
ok roundtrip-64x64-ppm "[ \"\$(head -c 2 '$T/out.ppm')\" = P6 ] && pamfile '$T/out.ppm' | grep -q '64 by 64'"
pnmtotensor "$img" | sd-vae-encode -m "$tiny" >"$T/lat.st" 2>/dev/null
ok encode-shape "sd-info '$T/lat.st' | grep -Eq '^  latent +f32 +\\[1,4,32,32\\]'"
ok encode-keeps-image "sd-info '$T/lat.st' | grep -Eq '^  image +f32 +\\[1,3,64,64\\]'"
ok encode-keeps-source "sd-info '$T/lat.st' | grep -Eq '^  source +\"'"
ok encode-mean-no-generator "! sd-info '$T/lat.st' | grep -q generator"
sd-vae-decode -m "$tiny" "$T/lat.st" >"$T/dec.st" 2>/dev/null
ok decode-shape "sd-info '$T/dec.st' | grep -Eq '^  image +f32 +\\[1,3,64,64\\] +min [0-9.e-]+ +max '"
ok decode-keeps-latent "sd-info '$T/dec.st' | grep -Eq '^  latent +f32 +\\[1,4,32,32\\]'"
ok encode-deterministic "pnmtotensor '$img' | sd-vae-encode -m '$tiny' | cmp -s - '$T/lat.st'"
# the model as a .ckpt with its config folder gives the same latent (fp16 weights both)
if [ -f "$SD_FIXTURES/tiny.ldm.ckpt" ]; then
	ok encode-ckpt "pnmtotensor '$img' | sd-vae-encode -m '$SD_FIXTURES/tiny.ldm.ckpt' --config '$tiny' >'$T/lat-ckpt.st'"
	same encode-ckpt-same "$T/lat.st" "$T/lat-ckpt.st"
else
	skip encode-ckpt "tiny.ldm.ckpt is absent"
fi
# two images in one stream, two frames
ok two-frames "cat '$img' '$img' | pnmtotensor | sd-vae-encode -m '$tiny' | sd-vae-decode -m '$tiny' | tensortopnm | pamfile -allimages | grep -c '64 by 64' | grep -qx 2"
# SD_MODEL is the default model
ok sd-model-env "pnmtotensor '$img' | SD_MODEL='$tiny' sd-vae-encode | cmp -s - '$T/lat.st'"

# ==== posterior samples ====
ok sample-seed "pnmtotensor '$img' | sd-vae-encode -m '$tiny' --sample --seed 42 >'$T/s1.st'"
ok sample-seed-again "pnmtotensor '$img' | sd-vae-encode -m '$tiny' --sample --seed 42 >'$T/s2.st'"
same sample-reproducible "$T/s1.st" "$T/s2.st"
ok sample-differs-from-mean "! cmp -s '$T/s1.st' '$T/lat.st'"
ok sample-writes-generator "sd-info '$T/s1.st' | grep -q generator"
# a second --sample continues the frame's generator: a different draw, the stream advanced
ok sample-continue "sd-vae-encode -m '$tiny' --sample '$T/s1.st' >'$T/s3.st' && ! cmp -s '$T/s1.st' '$T/s3.st'"
bad sample-needs-seed 1 sd-vae-encode "pnmtotensor '$img' | sd-vae-encode -m '$tiny' --sample"

# ==== tiling ====
ok tile-encode "pnmtotensor '$img' | sd-vae-encode -m '$tiny' --tile 32 | sd-info | grep -Eq '^  latent +f32 +\\[1,4,32,32\\]'"
ok tile-decode "sd-vae-decode -m '$tiny' --tile 32 '$T/lat.st' | sd-info | grep -Eq '^  image +f32 +\\[1,3,64,64\\]'"
ok tile-whole-is-untiled "sd-vae-decode -m '$tiny' --tile 64 '$T/lat.st' | cmp -s - '$T/dec.st'"
ok tile-0-is-untiled "sd-vae-decode -m '$tiny' --tile 0 '$T/lat.st' | cmp -s - '$T/dec.st'"

# ==== bad input ====
ppmtopgm "$img" >"$T/gray.pgm"
pamcut -width 63 "$img" >"$T/odd.ppm"
hex "81a161$(printf %02x 1)" >"$T/nokeys.st"                                   # {"a": 1}
hex "81$k_latent$(tensor f32 9401030101 $zero$zero$zero)" >"$T/lat3.st"      # latent [1,3,1,1]
hex "81$k_image$(tensor f32 9401030101 $zero$zero$zero)" >"$T/img1px.st"     # image [1,3,1,1]
hex "81$k_latent$(tensor i32 9401040101 $zero$zero$zero$zero)" >"$T/lati32.st" # latent i32
bad encode-no-image 1 sd-vae-encode "sd-vae-encode -m '$tiny' '$T/nokeys.st'"
ok encode-no-image-message "sd-vae-encode -m '$tiny' '$T/nokeys.st' 2>&1 | grep -q 'frame 0: no \"image\" key'"
bad encode-1-pixel 1 sd-vae-encode "sd-vae-encode -m '$tiny' '$T/img1px.st'"
bad encode-gray 1 sd-vae-encode "pnmtotensor '$T/gray.pgm' | sd-vae-encode -m '$tiny'"
ok encode-gray-message "pnmtotensor '$T/gray.pgm' | sd-vae-encode -m '$tiny' 2>&1 >/dev/null | grep -q '1 channel, the model expects 3'"
bad encode-odd-size 1 sd-vae-encode "pnmtotensor '$T/odd.ppm' | sd-vae-encode -m '$tiny'"
ok encode-odd-message "pnmtotensor '$T/odd.ppm' | sd-vae-encode -m '$tiny' 2>&1 >/dev/null | grep -q 'not a multiple of 2'"
bad decode-no-latent 1 sd-vae-decode "pnmtotensor '$img' | sd-vae-decode -m '$tiny'"
ok decode-no-latent-message "pnmtotensor '$img' | sd-vae-decode -m '$tiny' 2>&1 >/dev/null | grep -q 'no \"latent\" key'"
bad decode-wrong-channels 1 sd-vae-decode "sd-vae-decode -m '$tiny' '$T/lat3.st'"
ok decode-wrong-channels-message "sd-vae-decode -m '$tiny' '$T/lat3.st' 2>&1 | grep -q 'latent has 3 channels, the model expects 4'"
bad decode-int-latent 1 sd-vae-decode "sd-vae-decode -m '$tiny' '$T/lati32.st'"
bad decode-latent-from-image 1 sd-vae-decode "sd-vae-decode -m '$tiny' '$T/img1px.st'"
# a bad frame after a good one: exit 1, the good frame is out whole, nothing of the bad one
ok good-then-bad "! cat '$T/lat.st' '$T/lat3.st' | sd-vae-decode -m '$tiny' >'$T/gb.st' 2>/dev/null && sd-info '$T/gb.st' | grep -qx '1 frame'"
bad decode-garbage 1 sd-vae-decode "printf 'not msgpack' | sd-vae-decode -m '$tiny'"
# a model folder without vae/
mkdir -p "$T/novae" && cp -r "$tiny/model_index.json" "$tiny/text_encoder" "$tiny/tokenizer" "$T/novae/" 2>/dev/null
bad decode-model-without-vae 1 sd-vae-decode "sd-vae-decode -m '$T/novae' '$T/lat.st'"
bad encode-model-without-vae 1 sd-vae-encode "pnmtotensor '$img' | sd-vae-encode -m '$T/novae'"
finish
