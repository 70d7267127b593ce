#!/bin/sh
# tests/pipeline/images.sh - pnmtotensor, tensortopnm and sd-info run the way their man pages show them:
# netpbm converters in front and behind, bit-exact round trips at 8 and 16 bits, multi-image streams,
# and a table of bad inputs (exit status, one "prog:" line on stderr, nothing on stdout).
. tests/pipeline/lib.sh

img=$SD_FIXTURES/golden/test_image_64.ppm

# hex STRING: write the bytes spelled in hex (POSIX printf knows only octal escapes).
hex() {
	for h in $(printf '%s' "$1" | sed 's/../& /g'); do printf "\\$(printf %03o "0x$h")"; done
}
# tensor DTYPE SHAPE-HEX DATA-HEX: a msgpack tensor map {"dtype": DTYPE, "shape": […], "data": bin8}.
# SHAPE-HEX is the whole array (0x9N then the numbers); DATA-HEX is at most 255 bytes.
tensor() {
	d=$(printf '%s' "$1" | od -An -tx1 | tr -d ' \n')
	n=$(printf '%02x' $((${#3} / 2)))
	printf '83a56474797065%02x%sa5736861706594%sa464617461c4%s%s' $((0xa0 + ${#1})) "$d" "${2#94}" "$n" "$3"
}
k_image=a5696d616765 # fixstr "image"
half=0000003f        # 0.5 as little-endian f32
one=0000803f         # 1.0

# ==== help, version, usage errors ====
for p in pnmtotensor tensortopnm sd-info; do
	ok "$p-help" "$p --help >'$T/help' && grep -q '^Usage: $p ' '$T/help' && [ \"\$($p -h)\" = \"\$(cat '$T/help')\" ]"
	ok "$p-version" "$p --version | grep -q '^$p (sdpipe) '"
	bad "$p-bad-option" 2 "$p" "$p --no-such-option"
	ok "$p-bad-option-try" "$p --no-such-option 2>&1 >/dev/null | tail -n 1 | grep -qx \"Try '$p --help'.\""
done
bad tensortopnm-maxval-0 2 tensortopnm "tensortopnm --maxval 0"
bad tensortopnm-maxval-big 2 tensortopnm "tensortopnm --maxval 65536"
bad tensortopnm-maxval-missing 2 tensortopnm "tensortopnm --maxval"
bad tensortopnm-pattern 2 tensortopnm "tensortopnm -o '$T/out.ppm'"

# ==== round trips through PNG, bit for bit ====
pnmtopng "$img" >"$T/rgb8.png"
pngtopnm "$T/rgb8.png" >"$T/rgb8.ppm"
ok rgb8-pipe "pngtopnm '$T/rgb8.png' | pnmtotensor | tensortopnm >'$T/rgb8.out'"
same rgb8-bitexact "$T/rgb8.ppm" "$T/rgb8.out"
ok rgb8-png-back "pnmtotensor '$T/rgb8.ppm' | tensortopnm | pnmtopng >'$T/back.png' && pngtopnm '$T/back.png' | cmp -s - '$T/rgb8.ppm'"

# pnmtopng stores 8 bits when every sample is a multiple of 257, so move them off that grid.
pamdepth 65535 "$img" | pamfunc -adder=1 | pnmtopng >"$T/rgb16.png"
pngtopnm "$T/rgb16.png" >"$T/rgb16.ppm"
ok rgb16-pipe "pngtopnm '$T/rgb16.png' | pnmtotensor | tensortopnm --maxval 65535 >'$T/rgb16.out'"
same rgb16-bitexact "$T/rgb16.ppm" "$T/rgb16.out"
ok rgb16-is-16bit "pamfile '$T/rgb16.ppm' | grep -q 'maxval 65535'"
ok rgb16-maxval-meta "pngtopnm '$T/rgb16.png' | pnmtotensor | sd-info | grep -Eq '^  maxval +65535\$'"

# 16-bit samples that are not multiples of 257, and an odd maxval: every value must come back.
python3 -c '
import struct, sys
w, h = 256, 64
px = [(i * 7919 + 13) % 65536 for i in range(w * h * 3)]
sys.stdout.buffer.write(b"P6\n%d %d\n65535\n" % (w, h) + struct.pack(">%dH" % len(px), *px))' >"$T/any16.ppm"
ok any16-pipe "pnmtotensor '$T/any16.ppm' | tensortopnm --maxval 65535 >'$T/any16.out'"
same any16-bitexact "$T/any16.ppm" "$T/any16.out"
pamdepth 1000 "$img" >"$T/odd.ppm"
ok odd-maxval-pipe "pnmtotensor '$T/odd.ppm' | tensortopnm --maxval 1000 >'$T/odd.out'"
same odd-maxval-bitexact "$T/odd.ppm" "$T/odd.out"

ppmtopgm "$img" >"$T/gray8.pgm"
pnmtopng "$T/gray8.pgm" >"$T/gray8.png"
ok pgm8-pipe "pngtopnm '$T/gray8.png' | pnmtotensor | tensortopnm >'$T/gray8.out'"
same pgm8-bitexact "$T/gray8.pgm" "$T/gray8.out"
ok pgm8-shape "pnmtotensor '$T/gray8.pgm' | sd-info | grep -q 'image  *f32  *\[1,1,64,64\]'"
pamdepth 65535 "$T/gray8.pgm" | pamfunc -adder=1 | pnmtopng >"$T/gray16.png"
pngtopnm "$T/gray16.png" >"$T/gray16.pgm"
ok pgm16-is-16bit "pamfile '$T/gray16.pgm' | grep -q 'maxval 65535'"
ok pgm16-pipe "pngtopnm '$T/gray16.png' | pnmtotensor | tensortopnm --maxval 65535 >'$T/gray16.out'"
same pgm16-bitexact "$T/gray16.pgm" "$T/gray16.out"

# ==== PBM: black = 0, white = 1 ====
printf 'P1\n3 1\n1 0 1\n' >"$T/bw.pbm"
ok pbm-pipe "pnmtotensor '$T/bw.pbm' | tensortopnm >'$T/bw.out'"
printf 'P5\n3 1\n255\n\000\377\000' >"$T/bw.want"
same pbm-values "$T/bw.want" "$T/bw.out"
ok pbm-info "pnmtotensor '$T/bw.pbm' | sd-info | grep -Eq '^  maxval +1\$'"
ppmtopgm "$img" | pamditherbw | pamtopnm >"$T/dither.pbm"
ok pbm-raw-pipe "pnmtotensor '$T/dither.pbm' | tensortopnm --maxval 1 | pgmtopbm -threshold -value 0.5 >'$T/dither.out'"
same pbm-raw-bitexact "$T/dither.pbm" "$T/dither.out"

# ==== PAM with alpha: C = 4 in, not writable out ====
python3 -c '
import sys
sys.stdout.buffer.write(b"P7\nWIDTH 2\nHEIGHT 1\nDEPTH 4\nMAXVAL 255\nTUPLTYPE RGB_ALPHA\nENDHDR\n" + bytes([0, 51, 102, 255, 255, 204, 153, 0]))' >"$T/rgba.pam"
ok pam-rgba-shape "pnmtotensor '$T/rgba.pam' | sd-info | grep -q 'image  *f32  *\[1,4,1,2\]  *min 0  *max 1  *mean 0.5\$'"
bad tensortopnm-pam-rgba 1 tensortopnm "pnmtotensor '$T/rgba.pam' | tensortopnm"

# ==== several images ====
ok multi-cat "cat '$img' '$T/gray8.pgm' '$img' | pnmtotensor | sd-info >'$T/multi.txt'"
ok multi-3-frames "grep -c '^frame ' '$T/multi.txt' | grep -qx 3 && tail -n 1 '$T/multi.txt' | grep -qx '3 frames'"
ok multi-shapes "grep 'image ' '$T/multi.txt' | sed 's/.*\(\[[0-9,]*\]\).*/\1/' | tr '\n' ' ' | grep -qx '\[1,3,64,64\] \[1,1,64,64\] \[1,3,64,64\] '"
ok multi-2-images "cat '$img' '$img' | pnmtotensor | tensortopnm >'$T/two.out'"
cat "$img" "$img" >"$T/two.want"
same multi-2-bitexact "$T/two.want" "$T/two.out"
ok multi-files "pnmtotensor '$img' - <'$T/gray8.pgm' | sd-info | grep -c '^  source' | grep -qx 2"
ok multi-source "pnmtotensor '$img' - <'$T/gray8.pgm' | sd-info | grep -q '^  source  \"-\"\$'"
ok multi-pamsplit "cat '$img' '$img' | pnmtotensor | tensortopnm | pamsplit - '$T/split%d.ppm' && cmp -s '$T/split0.ppm' '$img' && cmp -s '$T/split1.ppm' '$img'"

# ==== hand-made streams ====
# a 1x1 gray image of 0.5: 0.5*255 = 127.5 rounds to 128
g1=81$k_image$(tensor f32 9401010101 $half)
hex "$g1" >"$T/gray1.sdt"
ok f32-1x1 "tensortopnm <'$T/gray1.sdt' >'$T/gray1.out'"
printf 'P5\n1 1\n255\n\200' >"$T/gray1.want"
same f32-1x1-rounding "$T/gray1.want" "$T/gray1.out"
hex "81$k_image$(tensor f16 9401010101 0038)" >"$T/f16.sdt"
ok f16-image "tensortopnm <'$T/f16.sdt' | cmp -s - '$T/gray1.want'"
hex "81$k_image$(tensor f32 9402010101 $half$one)" >"$T/batch.sdt"
ok batch-2 "tensortopnm <'$T/batch.sdt' >'$T/batch.out'"
printf 'P5\n1 1\n255\n\200P5\n1 1\n255\n\377' >"$T/batch.want"
same batch-2-images "$T/batch.want" "$T/batch.out"
printf 'P5\n1 1\n255\n\377' >"$T/white1.want"
ok output-pattern "tensortopnm -o '$T/img%03d.pgm' <'$T/batch.sdt' >'$T/pat.out' && [ ! -s '$T/pat.out' ] && cmp -s '$T/img000.pgm' '$T/gray1.want' && cmp -s '$T/img001.pgm' '$T/white1.want'"
hex "81a66c6174656e74$(tensor f32 9401010101 $half)" >"$T/key.sdt"
ok key-option "tensortopnm --key latent <'$T/key.sdt' | cmp -s - '$T/gray1.want'"
ok info-empty "sd-info </dev/null | grep -qx '0 frames'"
hex "81a3666f6f01" >"$T/nokey.sdt"
ok info-no-image "sd-info <'$T/nokey.sdt' | grep -Eq '^  foo +1\$'"
# {"prompt": "a \"", "seed": 1337, "sampler": {"name": "euler", "steps": 20}}
hex "83a670726f6d7074a3612022a473656564cd0539a773616d706c657282a46e616d65a565756c6572a5737465707314" >"$T/meta.sdt"
cat >"$T/meta.want" <<'EOF'
==> -SUB- <==
frame 0
  prompt   "a \""
  seed     1337
  sampler  {name: "euler", steps: 20}
1 frame
EOF
ok info-metadata "sd-info '$T/meta.sdt' >'$T/meta.txt'"
sed 1d "$T/meta.want" >"$T/meta1.want"
same info-metadata-text "$T/meta1.want" "$T/meta.txt"
ok info-two-files "sd-info '$T/meta.sdt' - <'$T/meta.sdt' >'$T/meta2.txt'"
{ sed "s|-SUB-|$T/meta.sdt|" "$T/meta.want"; echo; sed "s|-SUB-|-|" "$T/meta.want"; } >"$T/meta2.want"
same info-two-files-text "$T/meta2.want" "$T/meta2.txt"

# ==== bad input: exit 1, one "prog:" line, empty stdout ====
head -c 1000 "$img" >"$T/trunc.ppm"
bad pnmtotensor-garbage 1 pnmtotensor "printf 'garbage\n' | pnmtotensor"
bad pnmtotensor-truncated 1 pnmtotensor "pnmtotensor '$T/trunc.ppm'"
bad pnmtotensor-empty 1 pnmtotensor "pnmtotensor"
bad pnmtotensor-empty-file 1 pnmtotensor "pnmtotensor /dev/null"
bad pnmtotensor-missing 1 pnmtotensor "pnmtotensor '$T/no-such.ppm'"
bad pnmtotensor-bad-maxval 1 pnmtotensor "printf 'P5\n1 1\n0\n\000' | pnmtotensor"
bad pnmtotensor-header-only 1 pnmtotensor "printf 'P6\n64 64\n255\n' | pnmtotensor"

trunc=$(printf '%s' "$g1" | cut -c 1-50)
huge=81$k_image$(tensor f32 94cf7fffffffffffffffcf7fffffffffffffff0101 $half)
huge2=81$k_image$(tensor f32 9401cd2710cd2710cd2710 $half)
wrongdtype=81$k_image$(tensor f33 9401010101 $half)
notmap=93010203
noimage=81a3666f6f01
c4=81$k_image$(tensor f32 9401040101 $half$half$half$half)
notensor=81${k_image}a3616263
int=81$k_image$(tensor i32 9401010101 01000000)
shortdata=81$k_image$(tensor f32 9401010102 $half)
for v in trunc huge huge2 wrongdtype notmap noimage c4 notensor int shortdata; do
	eval "hex \"\$$v\"" >"$T/$v.sdt"
done
printf 'garbage' >"$T/garbage.sdt"
printf '\301\302' >"$T/c1.sdt"
for p in tensortopnm sd-info; do
	bad "$p-truncated" 1 "$p" "$p <'$T/trunc.sdt'"
	bad "$p-garbage" 1 "$p" "$p <'$T/garbage.sdt'"
	bad "$p-garbage-c1" 1 "$p" "$p <'$T/c1.sdt'"
	bad "$p-huge-shape" 1 "$p" "$p <'$T/huge.sdt'"
	bad "$p-huge-numel" 1 "$p" "$p <'$T/huge2.sdt'"
	bad "$p-wrong-dtype" 1 "$p" "$p <'$T/wrongdtype.sdt'"
	bad "$p-not-a-map" 1 "$p" "$p <'$T/notmap.sdt'"
	bad "$p-short-data" 1 "$p" "$p <'$T/shortdata.sdt'"
	bad "$p-file-truncated" 1 "$p" "$p '$T/trunc.sdt'"
	bad "$p-missing-file" 1 "$p" "$p '$T/no-such.sdt'"
done
bad tensortopnm-no-image 1 tensortopnm "tensortopnm <'$T/noimage.sdt'"
bad tensortopnm-key-missing 1 tensortopnm "tensortopnm --key latent <'$T/gray1.sdt'"
bad tensortopnm-c4 1 tensortopnm "tensortopnm <'$T/c4.sdt'"
bad tensortopnm-not-tensor 1 tensortopnm "tensortopnm <'$T/notensor.sdt'"
bad tensortopnm-int-dtype 1 tensortopnm "tensortopnm <'$T/int.sdt'"
bad tensortopnm-empty 1 tensortopnm "tensortopnm"
ok tensortopnm-no-image-msg "tensortopnm <'$T/nokey.sdt' 2>&1 >/dev/null | grep -qx 'tensortopnm: stdin: frame 0: no \"image\" key'"
ok tensortopnm-c4-msg "tensortopnm <'$T/c4.sdt' 2>&1 >/dev/null | grep -q 'frame 0: .*4 channels'"

# ==== sd-info on safetensors files and folders ====
python3 -c '
import json, struct, sys
hdr = json.dumps({"__metadata__": {"format": "pt"},
                  "a.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                  "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]}}).encode()
hdr += b" " * (-len(hdr) % 8)
sys.stdout.buffer.write(struct.pack("<Q", len(hdr)) + hdr + bytes(32))' >"$T/small.safetensors"
ok st-info "sd-info '$T/small.safetensors' >'$T/st.txt'"
ok st-tensors "grep -Eq '^  a.weight +f32 +\[2,3\]\$' '$T/st.txt' && grep -Eq '^  b +f16 +\[4\]\$' '$T/st.txt'"
ok st-params "tail -n 1 '$T/st.txt' | grep -q '2 tensors, 10 parameters'"
ok st-metadata "grep -Eq '^    format +\"pt\"\$' '$T/st.txt'"
mkdir -p "$T/model/unet"
cp "$T/small.safetensors" "$T/model/unet/diffusion_pytorch_model.safetensors"
printf '{}' >"$T/model/unet/config.json"
printf '{}' >"$T/model/model_index.json"
ok st-folder "sd-info '$T/model' >'$T/folder.txt' && grep -q 'unet/config.json' '$T/folder.txt' && grep -q 'unet/diffusion_pytorch_model.safetensors' '$T/folder.txt' && tail -n 1 '$T/folder.txt' | grep -q '1 safetensors file, 2 tensors, 10 parameters'"
ok st-fixture "sd-info '$SD_FIXTURES/golden/rng.safetensors' | tail -n 1 | grep -q 'parameters'"
head -c 20 "$T/small.safetensors" >"$T/bad.safetensors"
bad sd-info-bad-safetensors 1 sd-info "sd-info '$T/bad.safetensors'"

finish
