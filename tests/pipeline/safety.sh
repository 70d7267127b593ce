#!/bin/sh
# tests/pipeline/safety.sh - nothing the user had is ever deleted or replaced, every writer writes
# whole files or none, and the workflow a new user follows works: PNG pictures in, sd-lora-train,
# sd-txt2img with the adapter, a PNG whose "parameters" PIL reads back; make install gives working
# sd-txt2img/sd-img2img; the trainer's defaults follow the model; messages name what is wrong.
. tests/pipeline/lib.sh

tiny=$SD_FIXTURES/tiny
[ -d "$tiny/unet" ] || { skip safety "the tiny model is absent from $SD_FIXTURES"; exit 0; }
img=$SD_FIXTURES/golden/test_image_64.ppm
TR="sd-lora-train -m '$tiny' --max-steps 1 --batch 1 --caption 'a photo in the style of **'"
py=$(py_with PIL) || py=''

# ==== sd-lora-train -o DIR/ with the images in DIR (the data-loss case of sd-lora-train(1)) ====
mkdir -p "$T/style"
pnmtopng "$img" >"$T/style/a.png"; cp "$img" "$T/style/b.ppm"; echo 'my notes' >"$T/style/notes.txt"
cp -r "$T/style" "$T/style.orig"
ok train-into-image-folder "$TR -o '$T/style/' '$T/style/'"
for f in a.png b.ppm notes.txt; do same "images-kept-$f" "$T/style/$f" "$T/style.orig/$f"; done
ok peft-written "[ -s '$T/style/unet/adapter_model.safetensors' ] && [ -s '$T/style/text_encoder/adapter_config.json' ]"
ok train-again-replaces-own "$TR --seed 3 -o '$T/style/' '$T/style/'"
# a later run that does not train the text encoder or the VAE removes their (own) adapters, nothing else
ok train-unet-only "$TR --train unet -o '$T/style/' '$T/style/' && [ ! -e '$T/style/text_encoder' ] && [ ! -e '$T/style/vae' ] && [ -d '$T/style/unet' ]"
same images-kept-after-rerun "$T/style/a.png" "$T/style.orig/a.png"
echo mine >"$T/style/unet/mine.txt"
bad refuses-foreign-file-in-unet 1 sd-lora-train "$TR -o '$T/style/' '$T/style/'"
ok foreign-file-kept "[ \"\$(cat '$T/style/unet/mine.txt')\" = mine ]"
echo 'not an adapter' >"$T/user.safetensors"; cp "$T/user.safetensors" "$T/user.orig"
bad refuses-foreign-kohya-file 1 sd-lora-train "$TR -o '$T/user.safetensors' '$T/style.orig'"
same foreign-kohya-file-kept "$T/user.safetensors" "$T/user.orig"
ok kohya-written "$TR -o '$T/k.safetensors' '$T/style.orig'"
ok kohya-rewritten "$TR --seed 9 -o '$T/k.safetensors' '$T/style.orig'"
echo 'my state' >"$T/s.state"
bad refuses-foreign-state 1 sd-lora-train "$TR --state '$T/s.state' -o '$T/k2.safetensors' '$T/style.orig'"
ok foreign-state-kept "[ \"\$(cat '$T/s.state')\" = 'my state' ] && [ ! -e '$T/k2.safetensors' ]"
echo 'my log' >"$T/my.log"
bad refuses-foreign-log 1 sd-lora-train "$TR --log '$T/my.log' -o '$T/k3.safetensors' '$T/style.orig'"
ok foreign-log-kept "[ \"\$(cat '$T/my.log')\" = 'my log' ]"
ok own-log-rewritten "$TR --log '$T/own.tsv' -o '$T/k4.safetensors' '$T/style.orig' && $TR --log '$T/own.tsv' -o '$T/k4.safetensors' '$T/style.orig'"

# ==== --save-every writes the adapter too, and the state at the end ====
ok save-every-adapter "sd-lora-train -m '$tiny' --batch 1 --caption x --max-steps 2 --save-every 1 -o '$T/se.safetensors' '$T/style.orig' && [ -s '$T/se.safetensors.state' ]"
ok save-every-loads "sd-tokenize x | sd-text-encode -m '$tiny' --lora '$T/se.safetensors' >/dev/null"

# ==== defaults from the model; the caption in the hash ====
ok default-resolution "$TR -o '$T/res.safetensors' '$T/style.orig' && sd-info '$T/res.safetensors' | grep -q 'ss_resolution.*(64, 64)'"
echo 'a caption of its own' >"$T/style.orig/b.txt"
sd-lora-train -m "$tiny" --batch 1 --caption 'one caption' --max-steps 2 --save-every 1 -o "$T/cap.safetensors" "$T/style.orig" \
	>/dev/null 2>"$T/cap.err"
ok caption-over-txt-warns "grep -q '^sd-lora-train: --caption replaces the captions of 1 of the 2 images' '$T/cap.err'"
ok resume-other-caption-refused "sd-lora-train -m '$tiny' --batch 1 --caption 'another caption' --max-steps 2 --resume '$T/cap.safetensors.state' -o '$T/cap.safetensors' '$T/style.orig' 2>'$T/rc.err'; [ \$? -eq 1 ] && grep -q 'saved for another data set' '$T/rc.err'"
ok resume-same-caption "sd-lora-train -m '$tiny' --batch 1 --caption 'one caption' --max-steps 2 --resume '$T/cap.safetensors.state' -o '$T/cap.safetensors' '$T/style.orig'"
rm "$T/style.orig/b.txt"
case $B in
*san*) skip out-of-memory-says-what-to-lower "a 48 GB allocation under ASan aborts by design";;
*) sd-lora-train -m "$tiny" --caption x --resolution 512 --max-steps 1 -o "$T/oom.safetensors" "$T/style.orig" >/dev/null 2>"$T/oom.err"
   ok out-of-memory-says-what-to-lower "grep -q 'out of memory.*; lower --resolution (now 512) or --batch' '$T/oom.err' && [ ! -e '$T/oom.safetensors' ]";;
esac

# ==== the other writers ====
cp "$T/user.orig" "$T/m.safetensors"
bad merge-refuses-existing-file 1 sd-merge "sd-merge -m '$tiny' -o '$T/m.safetensors'"
same merge-file-kept "$T/m.safetensors" "$T/user.orig"
mkdir "$T/mdir"
bad merge-refuses-existing-folder 1 sd-merge "sd-merge -m '$tiny' -o '$T/mdir'"
echo x >"$T/initdir"
bad init-refuses-existing 1 sd-init "sd-init --config tiny -o '$T/initdir'"
cp "$img" "$T/img0.ppm"; echo mine >"$T/img1.ppm"
pnmtotensor "$img" "$img" >"$T/two.sdt"
bad tensortopnm-refuses-existing 1 tensortopnm "tensortopnm -o '$T/img%d.ppm' '$T/two.sdt'"
ok tensortopnm-kept "[ \"\$(cat '$T/img1.ppm')\" = mine ]"
ok tensortopnm-force "tensortopnm -f -o '$T/img%d.ppm' '$T/two.sdt' && pamfile '$T/img1.ppm' | grep -q '64 by 64'"
echo mine >"$T/mine.png"
bad txt2img-refuses-foreign-png 1 sd-txt2img "sd-txt2img -m '$tiny' -p x --steps 2 --seed 1 -o '$T/mine.png'"
ok txt2img-foreign-png-kept "[ \"\$(cat '$T/mine.png')\" = mine ]"
ok txt2img-replaces-own-png "sd-txt2img -m '$tiny' -p x --steps 2 --seed 1 -o '$T/own.png' && sd-txt2img -m '$tiny' -p y --steps 2 --seed 1 -o '$T/own.png'"
bad txt2img-refuses-existing-ppm 1 sd-txt2img "sd-txt2img -m '$tiny' -p x --steps 2 --seed 1 -o '$T/img0.ppm'"
# a failing pipe: non-zero, no file, nothing on standard output
sd-txt2img -m "$T/no-such-model" -p x -o "$T/fail.png" >"$T/fail.out" 2>"$T/fail.err"
rc=$?
ok txt2img-failure-exits-nonzero "[ $rc -ne 0 ] && [ ! -e '$T/fail.png' ] && [ ! -s '$T/fail.out' ]"
ok txt2img-bad-option "sd-txt2img -m '$tiny' -p x --steps 0 2>'$T/so.err'; [ \$? -eq 2 ] && grep -q '^sd-txt2img: --steps' '$T/so.err'"
ok txt2img-prints-seed "sd-txt2img -m '$tiny' -p x --steps 2 -o '$T/seed.png' 2>'$T/seed.err' && grep -Eq '^sd-txt2img: seed [0-9]+$' '$T/seed.err'"
ok txt2img-n "sd-txt2img -m '$tiny' -p x --steps 2 --seed 5 -n 2 -o '$T/n.png' >'$T/n.out' && [ -s '$T/n-1.png' ] && [ -s '$T/n-2.png' ] && [ \"\$(cat '$T/n.out')\" = \"$T/n-1.png
$T/n-2.png\" ]"
ok img2img-png-jpeg-in "pnmtojpeg '$img' >'$T/in.jpg' && sd-img2img -m '$tiny' -i '$T/in.jpg' -p x --steps 4 --seed 2 -o '$T/i2i.png'"

# ==== messages that say what is wrong ====
pnmtopng "$img" >"$T/pic.png"
bad png-where-a-stream-belongs 1 sd-vae-encode "sd-vae-encode -m '$tiny' <'$T/pic.png'"
ok png-message-names-pnmtotensor "sd-vae-encode -m '$tiny' <'$T/pic.png' 2>&1 | grep -q 'a PNG image, not a tensor stream.*pnmtotensor'"
bad ppm-where-a-stream-belongs 1 sd-info "sd-info <'$img'"
bad lora-bad-scale 1 sd-text-encode "sd-tokenize x | sd-text-encode -m '$tiny' --lora '$SD_FIXTURES/tiny-lora/kohya/lora.safetensors:0..8'"
ok lora-bad-scale-names-scale "sd-tokenize x | sd-text-encode -m '$tiny' --lora '$SD_FIXTURES/tiny-lora/kohya/lora.safetensors:0..8' 2>&1 >/dev/null | grep -q \"the scale '0..8' is not a number\""

# ==== the workflow: PNG in -> train -> sd-txt2img with the adapter -> parameters read back ====
mkdir -p "$T/pics"
pnmtopng "$img" >"$T/pics/1.png"; pamflip -lr "$img" | pnmtopng >"$T/pics/2.png"
ok workflow-train "sd-lora-train -m '$tiny' --caption 'a photo in the style of **' --max-steps 2 -o '$T/sketch.safetensors' '$T/pics/'"
ok workflow-txt2img "sd-txt2img -m '$tiny' -p 'a cat in the style of **' -N 'blurry' --sampler ddim --steps 5 --seed 42 --lora '$T/sketch.safetensors:0.8' -o '$T/cat.png'"
if [ -n "$py" ]; then
	want='a cat in the style of ** <lora:sketch:0.8>
Negative prompt: blurry
Steps: 5, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny, Version: sdpipe'
	got=$($py -c 'import sys; from PIL import Image; print(Image.open(sys.argv[1]).text["parameters"])' "$T/cat.png" 2>&1)
	case $got in
	"$want"*) pass workflow-parameters-read-by-pil;;
	*) fail workflow-parameters-read-by-pil "got: $got";;
	esac
else
	skip workflow-parameters-read-by-pil "no python3 with PIL"
fi

# ==== make install PREFIX=... gives working one-command tools ====
case $B in
build)
	if make --no-print-directory install PREFIX="$T/prefix" >"$T/install.log" 2>&1; then
		pass make-install
		ok installed-txt2img "cd '$T' && '$T/prefix/bin/sd-txt2img' -m '$tiny' -p 'a cat' --steps 3 -o '$T/cat-installed.png' && [ -s '$T/cat-installed.png' ]"
		ok installed-img2img "'$T/prefix/bin/sd-img2img' -m '$tiny' -i '$T/cat.png' -p 'a dog' --steps 4 -o '$T/dog-installed.png'"
		ok installed-examples "[ -x '$T/prefix/share/sdpipe/examples/train-style.sh' ] && [ -f '$T/prefix/share/man/man1/sd-txt2img.1' ]"
	else
		fail make-install "$(tail -c 300 "$T/install.log")"
	fi;;
*) skip make-install "checked on the normal build";;
esac
finish
