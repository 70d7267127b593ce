#!/bin/sh
# tests/pipeline/docs.sh - every documented command runs as pasted: each shell block of README.md
# (``` fences, except the set-up block of make commands) and each literal block of every man page's
# EXAMPLES section is run with bash -e -o pipefail, in document order, in one scratch folder laid out
# with the files the examples name.  The only substitutions are the ones a user with a real model
# would not need: the model names (sd15, tiny, model, stable-diffusion-v1-5, *.safetensors, *.ckpt)
# are the tiny test model (links in the scratch folder, $SD_MODEL_CONFIG for its single files), and
# sd-lora-train runs a few steps (--max-steps 4 when a block gives one, else --max-steps 2 added;
# --save-every 2).  A block passes when it exits 0 and leaves no empty file; it names the file and the
# line it starts on.  Blocks that cannot run here are listed below, each with its reason.
. tests/pipeline/lib.sh

top=$PWD
tiny=$SD_FIXTURES/tiny
[ -d "$tiny/unet" ] || { skip docs "the tiny model is absent from $SD_FIXTURES"; exit 0; }
command -v bash >/dev/null 2>&1 || { skip docs "no bash"; exit 0; }
# the documentation is checked against the normal build; the sanitized one (5x slower here) runs the
# same tools through the other pipeline tests
case ${B:-build} in *san*|*vg*) skip docs "checked on the normal build"; exit 0;; esac

# blocks that cannot run on this machine as written, by "file:line" of their first line
not_here() {
	case $1 in
	sd-init.1:*"sd-init --config sd15"*) echo "writes a full-size SD 1.5 (4 GB)";;
	*) return 1;;
	esac
}

# ==== the scratch folder: what the examples name ====
W=$T/w
mkdir -p "$W/.bin" "$W/style" "$W/sketches" "$W/tests"
# the examples that name tests/fixtures run from the top of the checkout
ln -s "$SD_FIXTURES" "$W/tests/fixtures"
ln -s "$top/examples" "$W/examples"
for n in sd15 tiny stable-diffusion-v1-5 sd15-config; do ln -s "$tiny" "$W/$n"; done
ln -s "$SD_FIXTURES/tiny.ldm.ckpt" "$W/tiny.ldm.ckpt"
ln -s "$SD_FIXTURES/tiny.ldm.ckpt" "$W/model.ckpt"
sd-merge -m "$tiny" --to single -o "$W/.single.safetensors" >/dev/null 2>&1 || fail docs-setup "sd-merge --to single"
for n in v1-5-pruned-emaonly sd15 m1 m2 other tuned; do ln -s .single.safetensors "$W/$n.safetensors"; done
img=$SD_FIXTURES/golden/test_image_64.ppm
for n in in photo a b cat; do cp "$img" "$W/$n.ppm"; done
pnmtopng "$img" >"$W/in.png"; cp "$W/in.png" "$W/table.png"
pamdepth 65535 "$img" >"$W/in16.ppm" && pnmtopng "$W/in16.ppm" >"$W/in16.png"
for i in 1 2; do cp "$W/in.png" "$W/style/$i.png"; cp "$W/in.png" "$W/sketches/$i.png"; done
printf 'a castle on a hill\na lighthouse at night\n' >"$W/prompts.txt"
(
	cd "$W" || exit 1
	# the adapters the examples load before the one that trains them runs (sd-lora-train writes them,
	# so that the examples that train may replace them)
	sd-lora-train -m sd15 --max-steps 1 --caption x -o sketch.safetensors -o style/ sketches/ &&
		cp sketch.safetensors a.safetensors && cp sketch.safetensors b.safetensors &&
		sd-tokenize "a photo in the style of **" | sd-text-encode -m sd15 >cond.st &&
		cp cond.st style.st && sd-noise -m sd15 --seed 1 >x.st && sd-noise -m sd15 -W 128 -H 128 --seed 2 >big.st &&
		pnmtotensor a.ppm b.ppm >images.sdt
) >"$T/setup.log" 2>&1 || fail docs-setup "$(tail -c 300 "$T/setup.log")"
# python3 with PIL and msgpack (the one on PATH may lack them)
for p in python3 /usr/bin/python3; do
	if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import PIL, msgpack' 2>/dev/null; then
		ln -sf "$(command -v "$p")" "$W/.bin/python3"; break
	fi
done

# ==== the blocks ====
# README: ``` fences; man pages: .Bd -literal ... .Ed inside .Sh EXAMPLES, roff escapes undone
B=$T/blocks
mkdir -p "$B"
awk -v out="$B" '
	/^```/ { if (inb) { close(f); inb = 0 } else { n++; f = sprintf("%s/%03d README.md:%d", out, n, NR + 1); inb = 1; printf "" > f }; next }
	inb { print > f }' README.md
k=100
for m in man/man1/*.1 man/man5/*.5; do
	k=$((k + 100))
	awk -v out="$B" -v base="$k" -v name="$(basename "$m")" '
		/^\.Sh / { ex = ($2 == "EXAMPLES") }
		ex && /^\.Bd -literal/ { n++; f = sprintf("%s/%03d %s:%d", out, base + n, name, NR + 1); inb = 1; printf "" > f; next }
		inb && /^\.Ed/ { close(f); inb = 0; next }
		inb { gsub(/\\e/, "\\"); gsub(/\\&/, ""); gsub(/\\-/, "-"); print > f }' "$m"
done

nblocks=0
for f in "$B"/*; do
	label=${f##*/}; label=${label#* }; label=${label#docs:}
	grep -q '^make ' "$f" && continue          # the set-up block (make demo, make check)
	nblocks=$((nblocks + 1))
	if why=$(not_here "$label:$(cat "$f")"); then skip "$label" "$why"; continue; fi
	# small sizes for sd-lora-train: a few steps
	sed -e '/sd-lora-train/{/--max-steps/!s/sd-lora-train /sd-lora-train --max-steps 2 /;}' \
	    -e 's/--max-steps [0-9][0-9]*/--max-steps 4/g' -e 's/--save-every [0-9][0-9]*/--save-every 2/g' \
	    "$f" >"$T/run.sh"
	touch "$T/mark"
	# a Python block (sd-tensor(5)) reads a stream on standard input
	case $(head -n 1 "$f") in
	import*|from*) run="python3 $T/run.sh"; input=$W/x.st;;
	*) run="bash -e -o pipefail $T/run.sh"; input=/dev/null;;
	esac
	if (cd "$W" && PATH="$W/.bin:$PATH" SD_MODEL_CONFIG="$tiny" timeout 300 $run) >"$T/out" 2>"$T/err" <"$input"; then
		empty=$(cd "$W" && find . -type f -newer "$T/mark" -size 0 | head -n 3 | tr '\n' ' ')
		if [ -n "$empty" ]; then fail "$label" "left empty files: $empty"
		else pass "$label"; fi
	else
		fail "$label" "exit $?: $(tail -n 3 "$T/err" | head -c 400 | tr '\n' ' ')"
	fi
done
[ "$nblocks" -ge 40 ] && pass "blocks-found ($nblocks)" || fail blocks-found "only $nblocks blocks: the extraction broke"

# ==== the fixtures are regular files (a symlink breaks under cp -r of the model) ====
links=$(find "$SD_FIXTURES" -type l | head -n 3)
[ -z "$links" ] && pass fixtures-regular-files || fail fixtures-regular-files "symlinks: $links"
finish
