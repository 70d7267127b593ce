#!/bin/sh
# tests/pipeline/png.sh - PNG and JPEG in (pnmtotensor) and PNG out (tensortopng): the same pixels as
# the PPM path at 8 and 16 bits (read back by PIL, netpbm and pnmtotensor), JPEG values against PIL's
# decode, gray/alpha/palette layouts against PIL's convert(), the A1111 "parameters" text read back
# with PIL, file naming and the never-destroy-a-file rules, NaN/Inf warnings, bad and hostile inputs
# (exit 1, one "prog:" line, nothing on stdout), and the EXAMPLES of both man pages run as pasted.
# The checks that need PIL and numpy are skipped when no python3 has them.
. tests/pipeline/lib.sh

top=$(pwd)
img=$SD_FIXTURES/golden/test_image_64.ppm
M=$SD_FIXTURES/tiny
ver=$(tensortopng --version | awk '{print $3}')

# a python with PIL, numpy and msgpack (the one on PATH may lack them)
PY=
for p in python3 /usr/bin/python3; do
	if "$p" -c 'import PIL, numpy, msgpack' 2>/dev/null; then PY=$p; break; fi
done
# any python3 (struct and zlib only) for crafting hostile files
PYZ=
for p in python3 /usr/bin/python3; do
	if "$p" -c 'import zlib, struct' 2>/dev/null; then PYZ=$p; break; fi
done

cat >"$T/h.py" <<'EOF'
import sys, struct, zlib
import numpy as np, msgpack
from PIL import Image
def frames(path):
    with open(path, "rb") as f:
        return list(msgpack.Unpacker(f, raw=False))
def tensor(t):
    return np.frombuffer(t["data"], dtype={"f32": "<f4", "f16": "<f2"}[t["dtype"]]).reshape(t["shape"])
def pack_tensor(a):
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "f32", "shape": list(a.shape), "data": a.tobytes()}
def write_frames(path, fr):
    with open(path, "wb") as f:
        for x in fr:
            f.write(msgpack.packb(x, use_bin_type=True))
def read_pnm(path):
    """raw PGM/PPM as an (H, W, C) integer array"""
    d = open(path, "rb").read()
    tok, i = [], 0
    while len(tok) < 4:
        while d[i:i + 1].isspace(): i += 1
        j = i
        while not d[j:j + 1].isspace(): j += 1
        tok.append(d[i:j]); i = j
    i += 1
    w, h, mv = int(tok[1]), int(tok[2]), int(tok[3])
    c = 3 if tok[0] == b"P6" else 1
    a = np.frombuffer(d[i:], dtype=">u2" if mv > 255 else "u1", count=w * h * c)
    return a.reshape(h, w, c).astype(np.int64)
def pil(path, mode=None):
    im = Image.open(path)
    if mode: im = im.convert(mode)
    a = np.asarray(im).astype(np.int64)
    return a if a.ndim == 3 else a[:, :, None]
def hwc(t):
    """a stream image [1,C,H,W] as (H, W, C)"""
    return tensor(t)[0].transpose(1, 2, 0).astype(np.float64)
def maxdiff(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
def chunks(path):
    d = open(path, "rb").read()[8:]
    out = []
    while d:
        n, = struct.unpack(">I", d[:4]); out.append((d[4:8].decode(), d[8:8 + n])); d = d[12 + n:]
    return out
def expect(cond, msg):
    if not cond:
        print(msg); sys.exit(1)
EOF

# $ihdr FILE: "137 80 78 71 W H DEPTH COLOURTYPE" from a PNG's signature and IHDR (W, H < 65536); a
# script, since each check runs in its own sh -c
cat >"$T/ihdr.sh" <<'EOF'
set -- $(od -An -tu1 -N26 "$1")
echo "$1 $2 $3 $4 $((${19} * 256 + ${20})) $((${23} * 256 + ${24})) ${25} ${26}"
EOF
ihdr="sh $T/ihdr.sh"

# pycheck NAME ARGS... <SCRIPT: a python check (exit 0 passes) with h.py's helpers; what it prints is
# shown indented under PASS (the largest differences) or in the FAIL line.
pycheck() {
	n=$1; shift
	if [ -z "$PY" ]; then cat >/dev/null; skip "$n" "no python3 with PIL, numpy and msgpack"; return; fi
	cat "$T/h.py" - >"$T/check.py"
	if (cd "$T" && "$PY" "$T/check.py" "$@") >"$T/py.out" 2>&1; then
		pass "$n"; sed 's/^/  /' "$T/py.out"
	else
		fail "$n" "$(tr '\n' ' ' <"$T/py.out" | head -c 500)"
	fi
}

# okpy NAME CMD: ok, for a check on files a pycheck made (skipped with it)
okpy() {
	if [ -z "$PY" ]; then skip "$1" "no python3 with PIL, numpy and msgpack"; else ok "$@"; fi
}

# ==== help, version, usage errors ====
ok tensortopng-help "tensortopng --help >'$T/help' && grep -q '^Usage: tensortopng ' '$T/help' && [ \"\$(tensortopng -h)\" = \"\$(cat '$T/help')\" ]"
ok tensortopng-version "tensortopng --version | grep -q '^tensortopng (sdpipe) '"
ok pnmtotensor-help-png "pnmtotensor --help | grep -q 'PNG and JPEG'"
bad tensortopng-bad-option 2 tensortopng "tensortopng --no-such-option"
ok tensortopng-bad-option-try "tensortopng --no-such-option 2>&1 >/dev/null | tail -n 1 | grep -qx \"Try 'tensortopng --help'.\""
bad tensortopng-bits-12 2 tensortopng "tensortopng --bits 12"
bad tensortopng-bits-x 2 tensortopng "tensortopng --bits x"
bad tensortopng-pattern-s 2 tensortopng "tensortopng -o '$T/a%s.png'"
bad tensortopng-pattern-2d 2 tensortopng "tensortopng -o '$T/a%d%d.png'"

# ==== streams to work on: the tiny model's images (one, and a batch of four) ====
sd-tokenize "a cat" | sd-text-encode -m "$M" >"$T/cond.sdt"
ok gen-1 "sd-noise -m '$M' --seed 7 --steps 3 | sd-unet-step -m '$M' -c '$T/cond.sdt' | sd-vae-decode -m '$M' >'$T/gen1.sdt'"
ok gen-4 "sd-noise -m '$M' --seed 7 --steps 3 --batch 4 | sd-unet-step -m '$M' -c '$T/cond.sdt' | sd-vae-decode -m '$M' >'$T/gen4.sdt'"
ok gen-other "sd-noise -m '$M' --seed 8 --steps 3 | sd-unet-step -m '$M' -c '$T/cond.sdt' | sd-vae-decode -m '$M' >'$T/gen8.sdt'"

# ==== the same pixels as the PPM path ====
ok png8-write "tensortopng -o '$T/g8.png' <'$T/gen1.sdt' && tensortopnm <'$T/gen1.sdt' >'$T/g8.ppm'"
ok png8-is-png "[ \"\$($ihdr '$T/g8.png')\" = '137 80 78 71 64 64 8 2' ]"
ok png8-netpbm "pngtopnm '$T/g8.png' | cmp -s - '$T/g8.ppm'"
ok png8-back "pnmtotensor '$T/g8.png' | tensortopnm | cmp -s - '$T/g8.ppm'"
ok png16-write "tensortopng --bits 16 -o '$T/g16.png' <'$T/gen1.sdt' && tensortopnm --maxval 65535 <'$T/gen1.sdt' >'$T/g16.ppm'"
ok png16-is-16bit "[ \"\$($ihdr '$T/g16.png')\" = '137 80 78 71 64 64 16 2' ]"
ok png16-netpbm "pngtopnm '$T/g16.png' | cmp -s - '$T/g16.ppm'"
ok png16-back "pnmtotensor '$T/g16.png' | tensortopnm --maxval 65535 | cmp -s - '$T/g16.ppm'"
ok png-stdin "pnmtotensor - <'$T/g8.png' | tensortopnm | cmp -s - '$T/g8.ppm'"
ok png-stdin-pipe "cat '$T/g8.png' | pnmtotensor | sd-info | grep -q '^  source  *\"-\"\$'"
ok png-interlaced "pnmtopng -interlace '$T/g8.ppm' >'$T/il.png' && pnmtotensor '$T/il.png' | tensortopnm | cmp -s - '$T/g8.ppm'"
ok png-mixed-inputs "pnmtotensor '$T/g8.png' '$img' '$T/g16.png' | sd-info | grep -c '^frame ' | grep -qx 3"

# values outside [0,1], and gray, through both writers; PIL reads the PNG
pycheck rand-stream <<'EOF'
rng = np.random.default_rng(1)
write_frames("rand.sdt", [{"image": pack_tensor(rng.uniform(-0.2, 1.2, (1, 3, 37, 53)))},
                          {"image": pack_tensor(rng.uniform(-0.2, 1.2, (1, 1, 19, 23)))}])
EOF
okpy rand-write "tensortopng -o '$T/r8-%d.png' <'$T/rand.sdt' && tensortopnm -o '$T/r8-%d.pnm' <'$T/rand.sdt' &&
  tensortopng --bits 16 -o '$T/r16-%d.png' <'$T/rand.sdt' && tensortopnm --maxval 65535 -o '$T/r16-%d.pnm' <'$T/rand.sdt'"
pycheck png-ppm-same-8 <<'EOF'
for i, pnm in ((1, "r8-0.pnm"), (2, "r8-1.pnm")):
    a, b = pil("r8-%d.png" % i), read_pnm(pnm)
    expect(a.shape == b.shape, "shapes %s %s" % (a.shape, b.shape))
    d = maxdiff(a, b)
    print("image %d %s: max |PNG - PNM| = %g" % (i, a.shape, d))
    expect(d == 0, "PNG and PNM differ")
EOF
pycheck png-ppm-same-16 <<'EOF'
# PIL keeps 16 bits for gray only ("I;16"); the RGB one is compared through pngtopnm above and here
a, b = pil("r16-2.png"), read_pnm("r16-1.pnm")
d = maxdiff(a, b)
print("gray 16-bit %s: max |PNG - PGM| = %g, max sample %d" % (a.shape, d, a.max()))
expect(Image.open("r16-2.png").mode.startswith("I"), "not read as 16-bit gray")
expect(d == 0 and a.max() > 255, "PNG and PGM differ")
EOF
okpy rand16-rgb-netpbm "pngtopnm '$T/r16-1.png' | cmp -s - '$T/r16-0.pnm' && pngtopnm '$T/r16-2.png' | cmp -s - '$T/r16-1.pnm'"
pycheck roundtrip-bytes <<'EOF'
for png, pnm in (("r8-1.png", "r8-0.pnm"), ("r8-2.png", "r8-1.pnm"), ("r16-1.png", "r16-0.pnm"),
                 ("r16-2.png", "r16-1.pnm"), ("g8.png", "g8.ppm"), ("g16.png", "g16.ppm")):
    import subprocess
    a = msgpack.unpackb(subprocess.run(["pnmtotensor", png], capture_output=True, check=True).stdout)
    b = msgpack.unpackb(subprocess.run(["pnmtotensor", pnm], capture_output=True, check=True).stdout)
    expect(a["image"] == b["image"] and a["maxval"] == b["maxval"], "%s and %s give different tensors" % (png, pnm))
    print("%s = %s: %d bytes of image data, maxval %d" % (png, pnm, len(a["image"]["data"]), a["maxval"]))
EOF

# ==== JPEG ====
ok jpeg-netpbm "pnmtojpeg -quality 90 '$img' >'$T/q.jpg' && pnmtotensor '$T/q.jpg' | tensortopnm >'$T/q.out' && jpegtopnm '$T/q.jpg' 2>/dev/null | cmp -s - '$T/q.out'"
ok jpeg-shape "pnmtotensor '$T/q.jpg' | sd-info | grep -q 'image  *f32  *\[1,3,64,64\]'"
ok jpeg-gray-shape "ppmtopgm '$img' | pnmtojpeg >'$T/qg.jpg' && pnmtotensor '$T/qg.jpg' | sd-info | grep -q 'image  *f32  *\[1,1,64,64\]'"
ok jpeg-stdin "cat '$T/q.jpg' | pnmtotensor | tensortopnm | cmp -s - '$T/q.out'"
pycheck jpeg-vs-pil "$img" <<'EOF'
import subprocess
src = Image.open(sys.argv[1])
src.save("p.jpg", quality=85)
src.save("pp.jpg", quality=75, progressive=True)
src.save("p444.jpg", quality=95, subsampling=0)
src.convert("L").save("pg.jpg", quality=85)
for f, mode in (("p.jpg", "RGB"), ("pp.jpg", "RGB"), ("p444.jpg", "RGB"), ("pg.jpg", "L"), ("q.jpg", "RGB")):
    fr = msgpack.unpackb(subprocess.run(["pnmtotensor", f], capture_output=True, check=True).stdout)
    got, want = hwc(fr["image"]), pil(f, mode) / 255.0
    expect(got.shape == want.shape, "%s: shape %s, PIL %s" % (f, got.shape, want.shape))
    d, ds = maxdiff(got, want), maxdiff(np.rint(got * 255), want * 255)
    print("%s (%s): max |pnmtotensor - PIL| = %.3g (%g samples; limit 1/255)" % (f, mode, d, ds))
    expect(d <= 1 / 255 + 1e-7 and fr["maxval"] == 255, "too far from PIL")
EOF

# ==== PNG layouts: gray, alpha, palette, low bit depths, against PIL's convert() ====
pycheck png-layouts "$img" <<'EOF'
import subprocess
rng = np.random.default_rng(2)
rgb = Image.open(sys.argv[1])
rgba = rgb.copy(); rgba.putalpha(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)))
la = rgb.convert("L"); la.putalpha(128)
pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=50)
palt = pal.copy(); palt.info["transparency"] = 3
g16 = Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16))
cases = [("L.png", rgb.convert("L"), "L", 1, 255), ("LA.png", la, "L", 1, 255),
         ("RGBA.png", rgba, "RGB", 3, 255), ("P.png", pal, "RGB", 3, 255), ("Pt.png", palt, "RGB", 3, 255),
         ("1.png", rgb.convert("1"), "L", 1, 255), ("I16.png", g16, None, 1, 65535)]
for f, im, mode, C, mv in cases:
    im.save(f)
    if f == "Pt.png":
        expect(any(c == "tRNS" for c, _ in chunks(f)), "no tRNS chunk in Pt.png")
    fr = msgpack.unpackb(subprocess.run(["pnmtotensor", f], capture_output=True, check=True).stdout)
    got, want = np.rint(hwc(fr["image"]) * mv), pil(f, mode)
    expect(got.shape[2] == C, "%s: %d channels, want %d" % (f, got.shape[2], C))
    d = maxdiff(got, want)
    print("%s (%s): C=%d maxval %d, max |pnmtotensor - PIL convert| = %g samples" % (f, Image.open(f).mode, C, fr["maxval"], d))
    expect(d == 0 and fr["maxval"] == mv, "differs from PIL")
EOF
ok png-gray-netpbm "ppmtopgm '$img' >'$T/gray.pgm' && pnmtopng '$T/gray.pgm' >'$T/gray.png' && pnmtotensor '$T/gray.png' | sd-info | grep -q 'image  *f32  *\[1,1,64,64\]' && pnmtotensor '$T/gray.png' | tensortopnm | cmp -s - '$T/gray.pgm'"
ok png-gray-write "pnmtotensor '$T/gray.pgm' | tensortopng -o '$T/gray2.png' && $ihdr '$T/gray2.png' | grep -q ' 8 0\$' && pngtopnm '$T/gray2.png' | cmp -s - '$T/gray.pgm'"
ok png-gray-2bit "pamdepth 3 '$T/gray.pgm' >'$T/g2.pgm' && pnmtopng '$T/g2.pgm' >'$T/g2.png' && $ihdr '$T/g2.png' | grep -q ' 2 0\$' && pnmtotensor '$T/g2.png' | tensortopnm --maxval 3 | cmp -s - '$T/g2.pgm'"
ok png-gray-2bit-maxval "pnmtotensor '$T/g2.png' | sd-info | grep -Eq '^  maxval +255\$'"

# ==== the parameters text ====
ok params-tiny "tensortopng -o '$T/cat.png' <'$T/gen1.sdt' && pnmtotensor '$T/cat.png' | sd-info | grep -q '^  parameters  .*Steps: 3, Sampler: PLMS, CFG scale: 7.5, Seed: 7, Size: 64x64'"
pycheck params-tiny-pil "$ver" <<'EOF'
import re
t = Image.open("cat.png").text
p = t["parameters"]
print(repr(p))
lines = p.split("\n")
expect(re.fullmatch(r"Steps: 3, Sampler: PLMS, CFG scale: 7\.5, Seed: 7, Size: 64x64(, Model: tiny)?, Version: sdpipe "
                    + re.escape(sys.argv[1]), lines[-1]), "last line is wrong")
expect(len(lines) == 1 or lines[:-1] == ["a cat"], "first line is wrong")
expect(t.get("Software") == "sdpipe " + sys.argv[1], "Software is %r" % t.get("Software"))
EOF
pycheck params-frames <<'EOF'
white = np.ones((2, 3, 8, 8))
write_frames("meta.sdt", [
    {"image": pack_tensor(white), "prompt": "a cat\nin a hat, caf\u00e9 \u2615", "negative_prompt": "blurry, low quality",
     "model": "tiny", "lora": [{"name": "style", "scale": 0.8}, {"name": "ink", "scale": 1.0}],
     "sampler": {"name": "dpmpp_2m", "steps": 20, "seed": 1234, "karras": True, "guidance": 7.5, "strength": 0.7, "eta": 0.0},
     "generator": {"seed": 99}},
    {"image": pack_tensor(white[0]), "sampler": {"name": "euler_a", "steps": 30}, "generator": {"seed": 5},
     "negative_prompt": ""},
    {"image": pack_tensor(white[:1]), "prompt": "plain", "model": "my,model: v2",
     "sampler": {"name": "ddim", "steps": 8, "eta": 0.5, "guidance": 7.0, "seed": 3}}])
EOF
okpy params-write "tensortopng -o '$T/m.png' <'$T/meta.sdt' && [ ! -e '$T/m.png' ] && [ -f '$T/m-4.png' ] && [ ! -e '$T/m-5.png' ]"
pycheck params-a1111 "$ver" <<'EOF'
v = sys.argv[1]
want = {
    "m-1.png": "a cat\nin a hat, caf\u00e9 \u2615 <lora:style:0.8> <lora:ink:1>\nNegative prompt: blurry, low quality\n"
               "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1234, Size: 8x8, Model: tiny, "
               "Batch size: 2, Batch pos: 0, Denoising strength: 0.7, Version: sdpipe " + v,
    "m-3.png": "Steps: 30, Sampler: Euler a, Seed: 5, Size: 8x8, Version: sdpipe " + v,
    "m-4.png": "plain\nSteps: 8, Sampler: DDIM, CFG scale: 7, Seed: 3, Size: 8x8, Model: \"my,model: v2\", Eta: 0.5, "
               "Version: sdpipe " + v,
}
want["m-2.png"] = want["m-1.png"].replace("Batch pos: 0", "Batch pos: 1")
for f in sorted(want):
    got = Image.open(f).text.get("parameters")
    expect(got == want[f], "%s:\n got  %r\n want %r" % (f, got, want[f]))
    kinds = [c for c, d in chunks(f) if c in ("tEXt", "iTXt", "zTXt") and d.startswith(b"parameters\0")]
    expect(kinds == (["iTXt"] if f in ("m-1.png", "m-2.png") else ["tEXt"]), "%s: parameters in %s" % (f, kinds))
    print("%s: %s, %d characters, as expected" % (f, kinds[0], len(got)))
EOF
pycheck params-read-back <<'EOF'
import subprocess
fr = msgpack.unpackb(subprocess.run(["pnmtotensor", "m-2.png"], capture_output=True, check=True).stdout)
expect(fr.get("parameters") == Image.open("m-2.png").text["parameters"], "pnmtotensor's parameters differ from PIL's")
# tEXt is Latin-1: PIL writes "caf\xe9" there, pnmtotensor must hand back UTF-8
from PIL import PngImagePlugin
info = PngImagePlugin.PngInfo(); info.add_text("parameters", "caf\u00e9 au lait")
Image.new("RGB", (4, 4)).save("latin1.png", pnginfo=info)
expect([c for c, _ in chunks("latin1.png") if c.endswith("Xt")] == ["tEXt"], "PIL did not write tEXt")
fr = msgpack.unpackb(subprocess.run(["pnmtotensor", "latin1.png"], capture_output=True, check=True).stdout)
expect(fr.get("parameters") == "caf\u00e9 au lait", "Latin-1 text read as %r" % fr.get("parameters"))
# a frame that no sampler made keeps its text through tensortopng
subprocess.run("pnmtotensor m-2.png | tensortopng -o keep.png", shell=True, check=True)
expect(Image.open("keep.png").text["parameters"] == Image.open("m-2.png").text["parameters"], "text not kept")
print("read back, Latin-1 converted, kept through tensortopng")
EOF

# ==== names: one image, a batch, a pattern, standard output ====
ok batch-4 "cd '$T' && tensortopng -o b.png <gen4.sdt && [ ! -e b.png ] && ls b-*.png | tr '\n' ' ' | grep -qx 'b-1.png b-2.png b-3.png b-4.png '"
ok batch-4-params "pnmtotensor '$T/b-3.png' | sd-info | grep -q 'Batch size: 4, Batch pos: 2'"
ok batch-noext "cd '$T' && tensortopng -o noext <gen4.sdt && [ -f noext-1 ] && [ -f noext-4 ]"
ok batch-pattern "cd '$T' && tensortopng -o 'q%02d.png' <gen4.sdt && [ -f q01.png ] && [ -f q04.png ] && [ ! -e q00.png ] && [ ! -e q05.png ]"
ok batch-pattern-one "cd '$T' && tensortopng -o 'one%d.png' <gen1.sdt && [ -f one1.png ]"
ok two-frames "cd '$T' && cat gen1.sdt gen8.sdt | tensortopng -o two.png && [ -f two-1.png ] && [ -f two-2.png ] && [ ! -e two.png ] && cmp -s two-1.png cat.png"
ok single-stdout "tensortopng <'$T/gen1.sdt' >'$T/s.png' && cmp -s '$T/s.png' '$T/cat.png'"
ok single-dash "tensortopng -o - <'$T/gen1.sdt' | cmp -s - '$T/cat.png'"
bad stdout-4 1 tensortopng "tensortopng <'$T/gen4.sdt'"
ok stdout-4-msg "tensortopng <'$T/gen4.sdt' 2>&1 >/dev/null | grep -qx 'tensortopng: stdin: 4 images: standard output holds one PNG; give -o FILE.png'"
bad stdout-2-frames 1 tensortopng "cat '$T/gen1.sdt' '$T/gen8.sdt' | tensortopng"
bad tensortopng-empty 1 tensortopng "tensortopng"
bad tensortopng-no-image 1 tensortopng "tensortopng <'$T/cond.sdt'"
bad tensortopng-missing-dir 1 tensortopng "tensortopng -o '$T/no/such/dir/x.png' <'$T/gen1.sdt'"

# ==== never destroy a file sdpipe did not write ====
printf 'my precious notes\n' >"$T/own.png"
cp "$T/own.png" "$T/own.bak"
bad refuse-foreign 1 tensortopng "tensortopng -o '$T/own.png' <'$T/gen1.sdt'"
ok refuse-foreign-msg "tensortopng -o '$T/own.png' <'$T/gen1.sdt' 2>&1 | grep -qx 'tensortopng: $T/own.png: exists and was not written by sdpipe; refusing to replace it (use --force)'"
same refuse-foreign-unchanged "$T/own.png" "$T/own.bak"
pnmtopng "$img" >"$T/other.png"
cp "$T/other.png" "$T/other.bak"
bad refuse-other-png 1 tensortopng "tensortopng -o '$T/other.png' <'$T/gen1.sdt'"
same refuse-other-png-unchanged "$T/other.png" "$T/other.bak"
ln -s own.png "$T/link.png"
bad refuse-symlink 1 tensortopng "tensortopng -o '$T/link.png' <'$T/gen1.sdt'"
same refuse-symlink-unchanged "$T/own.png" "$T/own.bak"
ok force-replaces "tensortopng -f -o '$T/own.png' <'$T/gen1.sdt' && cmp -s '$T/own.png' '$T/cat.png'"
ok replace-ours "cp '$T/cat.png' '$T/ours.png' && tensortopng -o '$T/ours.png' <'$T/gen8.sdt' && ! cmp -s '$T/ours.png' '$T/cat.png' && pngtopnm '$T/ours.png' >/dev/null 2>&1"
ok replace-ours-16 "tensortopng --bits 16 -o '$T/ours.png' <'$T/gen8.sdt' && $ihdr '$T/ours.png' | grep -q ' 16 2\$'"
# a batch whose third name is taken: refused before its first file is written
mkdir "$T/bt"
cp "$T/own.bak" "$T/bt/c-3.png"
bad refuse-batch 1 tensortopng "tensortopng -o '$T/bt/c.png' <'$T/gen4.sdt'"
ok refuse-batch-nothing-written "[ ! -e '$T/bt/c-1.png' ] && [ ! -e '$T/bt/c-2.png' ] && [ ! -e '$T/bt/c-4.png' ] && cmp -s '$T/bt/c-3.png' '$T/own.bak'"
ok refuse-batch-no-temp "[ \$(ls -A '$T/bt' | wc -l) -eq 1 ]"
ok force-batch "tensortopng -f -o '$T/bt/c.png' <'$T/gen4.sdt' && [ -f '$T/bt/c-4.png' ] && ! cmp -s '$T/bt/c-3.png' '$T/own.bak'"
# the held first image becomes FILE-1.png when a second frame arrives: that name is checked too
mkdir "$T/bt2"
cp "$T/own.bak" "$T/bt2/d-1.png"
bad refuse-held 1 tensortopng "cat '$T/gen1.sdt' '$T/gen8.sdt' | tensortopng -o '$T/bt2/d.png'"
ok refuse-held-unchanged "cmp -s '$T/bt2/d-1.png' '$T/own.bak' && [ ! -e '$T/bt2/d-2.png' ]"

# ==== NaN and Inf ====
pycheck nan-stream <<'EOF'
write_frames("nan.sdt", [{"image": pack_tensor(np.array([[[np.nan, np.inf, -np.inf], [0.5, 2.0, -1.0]]]))}])
EOF
okpy nan-write "tensortopng -o '$T/nan.png' <'$T/nan.sdt' 2>'$T/nan.err'"
okpy nan-warning "[ \"\$(cat '$T/nan.err')\" = 'tensortopng: stdin: frame 0: image 1: 1 of 6 values are NaN, written as 0; 2 are Inf, written as 1 (+Inf) or 0 (-Inf)' ]"
okpy nan-warning-pnm "tensortopnm <'$T/nan.sdt' >'$T/nan.pgm' 2>'$T/nanp.err' && [ \"\$(cat '$T/nanp.err')\" = 'tensortopnm: stdin: frame 0: image 1: 1 of 6 values are NaN, written as 0; 2 are Inf, written as 1 (+Inf) or 0 (-Inf)' ]"
pycheck nan-values <<'EOF'
a = pil("nan.png")[:, :, 0]
print("pixels", a.tolist())
expect(a.tolist() == [[0, 255, 0], [128, 255, 0]], "NaN/Inf written wrongly")
EOF
ok finite-no-warning "tensortopng -o '$T/quiet.png' <'$T/gen1.sdt' 2>'$T/quiet.err' && [ ! -s '$T/quiet.err' ]"

# ==== bad input to pnmtotensor: exit 1, one line, nothing on stdout ====
size=$(wc -c <"$T/cat.png")
head -c 500 "$T/cat.png" >"$T/trunc.png"
head -c $((size - 12)) "$T/cat.png" >"$T/noiend.png"
head -c $((size / 2)) "$T/cat.png" >"$T/half.png"
cp "$T/cat.png" "$T/crc.png"
printf '\377\377\377\377' | dd of="$T/crc.png" bs=1 seek=$((size - 400)) conv=notrunc 2>/dev/null
printf '\211PNG\r\n\032\n' >"$T/sig.png"
printf '\211PNX\r\n\032\n0000' >"$T/badsig.png"
jsize=$(wc -c <"$T/q.jpg")
head -c $((jsize / 2)) "$T/q.jpg" >"$T/trunc.jpg"
head -c $((jsize - 2)) "$T/q.jpg" >"$T/noeoi.jpg"
head -c 200 "$T/q.jpg" >"$T/head.jpg"
printf '\377\330\377' >"$T/soi.jpg"
printf 'GIF89a\001\000\001\000' >"$T/x.gif"
for f in trunc.png noiend.png half.png crc.png sig.png badsig.png trunc.jpg noeoi.jpg head.jpg soi.jpg x.gif; do
	bad "pnmtotensor-bad-$f" 1 pnmtotensor "pnmtotensor '$T/$f'"
	bad "pnmtotensor-bad-$f-stdin" 1 pnmtotensor "cat '$T/$f' | pnmtotensor"
done
ok pnmtotensor-truncated-msg "pnmtotensor '$T/trunc.png' 2>&1 >/dev/null | grep -q '^pnmtotensor: $T/trunc.png: PNG image: truncated'"
ok pnmtotensor-jpeg-truncated-msg "pnmtotensor '$T/trunc.jpg' 2>&1 >/dev/null | grep -q '^pnmtotensor: $T/trunc.jpg: JPEG image: truncated'"
ok pnmtotensor-unknown-msg "pnmtotensor '$T/x.gif' 2>&1 >/dev/null | grep -qx 'pnmtotensor: $T/x.gif: not a PNM, PNG or JPEG image'"
ok pnmtotensor-unknown-stdin-msg "pnmtotensor <'$T/x.gif' 2>&1 >/dev/null | grep -qx 'pnmtotensor: stdin: not a PNM, PNG or JPEG image'"
# a good image before a bad one: its frame is out, then exit 1
ok pnmtotensor-good-then-bad "pnmtotensor '$T/cat.png' '$T/trunc.png' >'$T/gb.sdt' 2>/dev/null; [ \$? -eq 1 ] && sd-info '$T/gb.sdt' | tail -n 1 | grep -qx '1 frame'"

# ==== hostile headers: refused before the raster is allocated ====
if [ -n "$PYZ" ]; then
	"$PYZ" - "$T" <<'EOF'
import struct, sys, zlib
def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
def png(w, h, idat): return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
                             chunk(b"IDAT", idat) + chunk(b"IEND", b""))
open(sys.argv[1] + "/huge.png", "wb").write(png(100000, 100000, zlib.compress(b"\0" * 1000)))
open(sys.argv[1] + "/tall.png", "wb").write(png(16000, 16000, zlib.compress(b"\0" * 1000)))
j = bytearray(open(sys.argv[1] + "/q.jpg", "rb").read())
i = j.find(b"\xff\xc0")
j[i + 5:i + 9] = struct.pack(">HH", 60000, 60000)
open(sys.argv[1] + "/huge.jpg", "wb").write(bytes(j))
EOF
	bad png-huge 1 pnmtotensor "pnmtotensor '$T/huge.png'"
	ok png-huge-msg "pnmtotensor '$T/huge.png' 2>&1 | grep -q 'image of 100000x100000 pixels and depth 3 is larger than the limit of 268435456 pixels (SD_MAX_PIXELS)'"
	bad png-huge-stdin 1 pnmtotensor "pnmtotensor <'$T/huge.png'"
	bad png-tall-short 1 pnmtotensor "pnmtotensor '$T/tall.png'"
	ok png-tall-short-msg "pnmtotensor '$T/tall.png' 2>&1 | grep -q 'declares 16000x16000 pixels, more than the .* bytes left can hold'"
	bad jpeg-huge 1 pnmtotensor "pnmtotensor '$T/huge.jpg'"
	ok jpeg-huge-msg "pnmtotensor '$T/huge.jpg' 2>&1 | grep -q 'image of 60000x60000 pixels .* larger than the limit'"
else
	skip png-huge "no python3 with zlib"
fi
bad png-max-pixels 1 pnmtotensor "SD_MAX_PIXELS=4095 pnmtotensor '$T/cat.png'"
ok png-max-pixels-ok "SD_MAX_PIXELS=4096 pnmtotensor '$T/cat.png' >/dev/null"
bad jpeg-max-pixels 1 pnmtotensor "SD_MAX_PIXELS=4095 pnmtotensor '$T/q.jpg'"

# ==== the man pages' EXAMPLES, as pasted, from a folder that looks like the top of the tree ====
# examples PAGE: the .Bd -literal blocks of the EXAMPLES section, one per line-group, "\&" removed
examples() {
	awk '/^\.Sh /{sec=$2} sec=="EXAMPLES" && /^\.Bd -literal/{inb=1; next} inb && /^\.Ed/{inb=0; print "#==="; next} inb' "$1" |
		sed 's/^\\&//; s/\\e/\\/g'
}
for page in tensortopng pnmtotensor; do
	d="$T/ex-$page"
	mkdir -p "$d"
	ln -s "$top/tests" "$d/tests"
	examples "man/man1/$page.1" >"$T/ex-$page.txt"
	nblk=0; blk=""
	while IFS= read -r line; do
		if [ "$line" = "#===" ]; then
			nblk=$((nblk + 1))
			printf '%s\n' "$blk" >"$T/ex-$page-$nblk.sh"
			ok "man-$page-example-$nblk" "cd '$d' && sh -e '$T/ex-$page-$nblk.sh' >/dev/null"
			blk=""
		else
			blk="$blk$line
"
		fi
	done <"$T/ex-$page.txt"
	[ "$nblk" -ge 3 ] && pass "man-$page-examples-found" || fail "man-$page-examples-found" "$nblk blocks"
done
ok man-tensortopng-example-files "cd '$T/ex-tensortopng' && [ -f cat.png ] && [ -f cats-1.png ] && [ -f cats-4.png ] && [ -s img16.png ] && $ihdr img16.png | grep -q ' 16 2\$'"
ok man-pnmtotensor-example-files "cd '$T/ex-pnmtotensor' && [ -f cat.png ] && [ -f in16.png ]"

finish
