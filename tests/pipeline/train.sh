#!/bin/sh
# tests/pipeline/train.sh - sd-lora-train on the tiny model and a toy data set of four synthetic 64x64
# PPMs (made here with printf-free python3, or netpbm's ppmmake when python3 is absent): the loss on
# the fixed evaluation batch (--eval: the first images, seed-fixed noise, evenly spread timesteps, no
# dropout) drops by at least 2 % in 40 steps at lr 1e-2; --resume continues bit for bit (kohya files
# compared with cmp), also after SIGINT; both output formats reload in sd-unet-step / sd-text-encode
# (--lora) and change the UNet's prediction; --train text writes no UNet adapter; a NaN loss stops the
# run and keeps the state; bad inputs exit 1 with one "sd-lora-train:" line and no output file.
. tests/pipeline/lib.sh

tiny=$SD_FIXTURES/tiny
[ -d "$tiny/unet" ] || { skip train "the tiny model is absent from $SD_FIXTURES"; exit 0; }
command -v sd-lora-train >/dev/null 2>&1 || { fail train "sd-lora-train is not on PATH"; finish; }
cap='A photo of in the style of **'
TR="sd-lora-train -m '$tiny' --resolution 64 --caption '$cap'"  # for ok/bad (sh -c strings)

# ==== help, version ====
ok help "sd-lora-train --help >'$T/help' && grep -q '^Usage: sd-lora-train ' '$T/help'"
ok version "sd-lora-train --version | grep -q '^sd-lora-train (sdpipe) '"

# ==== the toy data set: four 64x64 gradients of different colours (and a 72x48 one, squashed) ====
mkdir -p "$T/data"
mkimg() { # FILE W H A B
	if command -v python3 >/dev/null 2>&1; then
		python3 -c "
import sys
w, h, a, b = $2, $3, $4, $5
px = bytes(v % 256 for y in range(h) for x in range(w) for v in (a * x, b * y, (a + b) * (x + y) // 2))
sys.stdout.buffer.write(b'P6\n%d %d\n255\n' % (w, h) + px)" >"$1"
	else
		ppmmake "rgb:$(printf %02x $(($4 * 20 % 256)))/$(printf %02x $(($5 * 30 % 256)))/80" "$2" "$3" >"$1"
	fi
}
mkimg "$T/data/a.ppm" 64 64 3 1
mkimg "$T/data/b.ppm" 64 64 1 4
mkimg "$T/data/c.ppm" 72 48 5 2
mkimg "$T/data/d.ppm" 64 64 2 7
echo 'A photo of a gradient in the style of **' >"$T/data/a.txt"

# the sanitized build (4x slower) runs the short cases; the 40-step run and the examples are the normal
# build's
case ${B:-build} in *san*|*vg*) san=1 evsteps=2;; *) san= evsteps=40;; esac
# ==== the loss on the fixed evaluation batch drops ====
if [ -n "$san" ]; then
	sd-lora-train -m "$tiny" --resolution 64 --caption "$cap" --train unet,text --max-steps 2 --lr 1e-2 --eval --log "$T/loss.tsv" -o "$T/k.safetensors" "$T/data" >/dev/null 2>&1 &&
		pass eval-short-run-sanitized || fail eval-short-run-sanitized
elif sd-lora-train -m "$tiny" --resolution 64 --caption "$cap" --train unet,text --max-steps 40 --lr 1e-2 --eval --log "$T/loss.tsv" -o "$T/k.safetensors" "$T/data" \
	>"$T/out" 2>"$T/err"; then
	ev=$(sed -n 's/^sd-lora-train: eval loss \([0-9.e+-]*\) -> \([0-9.e+-]*\)$/\1 \2/p' "$T/err")
	if [ -n "$ev" ] && echo "$ev" | awk '{ exit !($2 < 0.98 * $1) }'; then pass "eval-loss-drops ($ev)"
	else fail eval-loss-drops "eval loss '$ev' did not drop by 2 %"; fi
	[ "$(wc -l <"$T/loss.tsv")" -eq 41 ] && head -n 1 "$T/loss.tsv" | grep -q '^step	epoch	loss' &&
		pass log-tsv || fail log-tsv "$(head -c 200 "$T/loss.tsv")"
	[ -s "$T/out" ] && fail stdout-empty || pass stdout-empty
else
	fail eval-loss-drops "exit $?: $(tail -c 300 "$T/err")"
fi

# ==== both formats reload and change the UNet's prediction ====
sd-tokenize "A photo of a doctor in the style of **" | sd-text-encode -m "$tiny" >"$T/ctx.st"
sd-noise -m "$tiny" --seed 1 -W 64 -H 64 >"$T/lat.st"
sd-unet-step -m "$tiny" -c "$T/ctx.st" --predict 999 <"$T/lat.st" >"$T/eps-base.st"
ok kohya-reload "sd-unet-step -m '$tiny' -c '$T/ctx.st' --predict 999 --lora '$T/k.safetensors' <'$T/lat.st' >'$T/eps-k.st'"
cmp -s "$T/eps-base.st" "$T/eps-k.st" && fail kohya-changes-unet || pass kohya-changes-unet
ok kohya-text-reload "sd-text-encode -m '$tiny' --lora '$T/k.safetensors' <'$T/ctx.st' >/dev/null"
ok kohya-keys "python3 -c \"
import json, struct, sys
f = open('$T/k.safetensors', 'rb'); n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n))
k = [x for x in h if x != '__metadata__']
assert any(x.startswith('lora_unet_') and x.endswith('.lora_down.weight') for x in k)
assert any(x.startswith('lora_te_text_model_encoder_layers_0_self_attn_q_proj.') for x in k)
assert 'lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha' in k
m = h['__metadata__']; assert m['ss_network_dim'] == '8' and m['sdpipe_steps'] == '$evsteps' and len(m['sdpipe_dataset_hash']) == 16
\""
ok peft-train "$TR --max-steps 3 --lr 1e-2 -o '$T/peft/' '$T/data' 2>/dev/null"
ok peft-layout "test -f '$T/peft/unet/adapter_config.json' && test -f '$T/peft/unet/adapter_model.safetensors' &&
	test -f '$T/peft/text_encoder/adapter_model.safetensors' && test -f '$T/peft/vae/adapter_model.safetensors' &&
	grep -q '\"peft_type\": \"LORA\"' '$T/peft/unet/adapter_config.json' && grep -q '\"r\": 8' '$T/peft/unet/adapter_config.json' &&
	grep -q 'base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight' '$T/peft/unet/adapter_model.safetensors'"
ok peft-reload "sd-unet-step -m '$tiny' -c '$T/ctx.st' --predict 999 --lora '$T/peft' <'$T/lat.st' >'$T/eps-p.st'"
cmp -s "$T/eps-base.st" "$T/eps-p.st" && fail peft-changes-unet || pass peft-changes-unet
ok peft-vae-reload "sd-noise -m '$tiny' --seed 2 -W 64 -H 64 | sd-vae-decode -m '$tiny' --lora '$T/peft' >/dev/null"

ok vae-recon "$TR --train vae --vae-recon-weight 1 --max-steps 3 --lr 1e-2 -o '$T/vr/' '$T/data' 2>/dev/null && python3 -c \"
import json, struct
f = open('$T/vr/vae/adapter_model.safetensors', 'rb'); n = struct.unpack('<Q', f.read(8))[0]; h = json.loads(f.read(n)); d = f.read()
k = [x for x in h if 'decoder.' in x and 'lora_B' in x]; assert k
for x in k: a, b = h[x]['data_offsets']; assert any(struct.unpack('<%df' % ((b - a) // 4), d[a:b]))
\""
# ==== --train text: no UNet adapter ====
ok text-only "sd-lora-train -m '$tiny' --resolution 64 --caption '$cap' --train text --max-steps 2 -o '$T/t/' '$T/data' 2>/dev/null"
ok text-only-no-unet "test ! -e '$T/t/unet' && test ! -e '$T/t/vae' && test -f '$T/t/text_encoder/adapter_model.safetensors'"
# the frames differ in their "lora" key (the parameters of the picture); the prediction must not
if pym=$(py_with msgpack); then
ok text-only-unet-unchanged "sd-unet-step -m '$tiny' -c '$T/ctx.st' --predict 999 --lora '$T/t' <'$T/lat.st' >'$T/eps-t.st' && sd-info '$T/eps-t.st' | grep -q '^  lora ' && $pym -c \"
import msgpack, sys
a, b = (next(iter(msgpack.Unpacker(open(f, 'rb'), raw=False))) for f in sys.argv[1:])
sys.exit(a['eps'] != b['eps'])\" '$T/eps-t.st' '$T/eps-base.st'"
else skip text-only-unet-unchanged "no python3 with msgpack"; fi

# ==== --resume: bit for bit (VAE trained: pixels through the encoder; --flip; dropout on) ====
ok resume-full "$TR --batch 3 --flip --max-steps 6 --save-every 3 --state '$T/st' -o '$T/r1.safetensors' '$T/data' 2>/dev/null"
ok resume-state-written "test -s '$T/st'"
ok resume-continue "$TR --batch 3 --flip --max-steps 6 --resume '$T/st' -o '$T/r2.safetensors' '$T/data' 2>/dev/null"
same resume-bit-identical "$T/r1.safetensors" "$T/r2.safetensors"
# cached latents, --grad-accum, cosine schedule with warm-up
ok resume-cached-full "$TR --train unet --grad-accum 2 --lr-warmup 2 --lr-schedule cosine --max-steps 6 --save-every 4 --state '$T/st2' -o '$T/c1.safetensors' '$T/data' 2>/dev/null"
ok resume-cached-continue "$TR --train unet --grad-accum 2 --lr-warmup 2 --lr-schedule cosine --max-steps 6 --resume '$T/st2' -o '$T/c2.safetensors' '$T/data' 2>/dev/null"
same resume-cached-bit-identical "$T/c1.safetensors" "$T/c2.safetensors"
ok resume-other-seed "sd-lora-train -m '$tiny' --resolution 64 --caption '$cap' --train unet --grad-accum 2 --max-steps 6 --seed 9 --resume '$T/st2' -o '$T/c3.safetensors' '$T/data' 2>'$T/ros.err'; [ \$? -eq 1 ] && grep -q '^sd-lora-train: --resume: .*saved with --seed' '$T/ros.err' && [ ! -e '$T/c3.safetensors' ]"

# ==== SIGINT saves the state; resuming it gives the uninterrupted run ====
sd-lora-train -m "$tiny" --resolution 64 --caption "$cap" --train unet --max-steps 30 -o "$T/i1.safetensors" "$T/data" 2>/dev/null
sd-lora-train -m "$tiny" --resolution 64 --caption "$cap" --train unet --max-steps 30 --state "$T/ist" \
	-o "$T/i2.safetensors" "$T/data" 2>"$T/ierr" &
pid=$!
n=0; while ! grep -q 'step 2/30' "$T/ierr" && [ $n -lt 300 ]; do sleep 0.05; n=$((n + 1)); done
kill -INT $pid
wait $pid; rc=$?
if [ "$rc" -eq 1 ] && grep -q 'state saved to' "$T/ierr" && [ -s "$T/ist" ] && [ ! -e "$T/i2.safetensors" ]; then
	pass sigint-saves-state
	ok sigint-resume "$TR --train unet --max-steps 30 --resume '$T/ist' -o '$T/i2.safetensors' '$T/data' 2>/dev/null"
	same sigint-resume-bit-identical "$T/i1.safetensors" "$T/i2.safetensors"
else
	fail sigint-saves-state "exit $rc: $(tail -c 300 "$T/ierr")"
fi

# ==== a NaN/Inf loss stops the run and keeps the last good state ====
sd-lora-train -m "$tiny" --resolution 64 --caption "$cap" --train unet --lr 1e30 --max-steps 50 --state "$T/nst" \
	-o "$T/nan.safetensors" "$T/data" >"$T/nan.out" 2>"$T/nan.err"
rc=$?
if [ $rc -eq 1 ] && tail -n 1 "$T/nan.err" | grep -q '^sd-lora-train: step [0-9]*: the loss is .*the last good state' &&
	[ -s "$T/nst" ] && [ ! -e "$T/nan.safetensors" ] && [ ! -s "$T/nan.out" ]; then pass nan-stops-keeps-state
else fail nan-stops-keeps-state "exit $rc: $(tail -c 300 "$T/nan.err")"; fi

# ==== archives ====
if command -v tar >/dev/null 2>&1; then
	(cd "$T/data" && tar czf "$T/data.tar.gz" a.ppm a.txt b.ppm)
	ok archive-tar-gz "$TR --train unet --max-steps 1 -o '$T/ar.safetensors' '$T/data.tar.gz' 2>/dev/null"
else
	skip archive-tar-gz "no tar"
fi
# a stream on stdin
if command -v pnmtotensor >/dev/null 2>&1; then
	ok stream-stdin "cat '$T/data/a.ppm' '$T/data/b.ppm' | pnmtotensor | $TR --train unet --max-steps 1 -o '$T/st.safetensors' - 2>/dev/null"
fi

# ==== the example scripts (short runs) ====
# (on the normal build: under the sanitizers they are minutes of the same tools run above)
if [ -n "$san" ]; then
	skip examples "the example scripts are run on the normal build"
elif command -v pnmcat >/dev/null 2>&1 && command -v pamscale >/dev/null 2>&1; then
	ok train-style-example "cd '$T' && '$PWD/examples/train-style.sh' -m '$tiny' -r 64 --epochs 2 --steps 3 '$T/data' '$cap' ex >/dev/null 2>&1"
	ok train-style-outputs "test -f '$T/ex.safetensors' && test -f '$T/ex/unet/adapter_model.safetensors' && test -s '$T/ex-transfer.png' && test -s '$T/ex-loss.tsv'"
	ok train-style-previews-differ "! cmp -s '$T/ex-car.png' '$T/ex-base-car.png' && ! cmp -s '$T/ex-doctor.png' '$T/ex-base-doctor.png'"
	ok ablation-example "'$PWD/examples/ablation.sh' -m '$tiny' -r 64 --epochs 1 --steps 2 '$T/data' '$cap' '$T/data/a.ppm' '$T/abl' >/dev/null 2>&1"
	ok ablation-sheet "test -d '$T/abl/no-unet/text_encoder' && test ! -e '$T/abl/no-unet/unet' && test ! -e '$T/abl/no-text/text_encoder' &&
		test ! -e '$T/abl/no-vae/vae' && head -c 20 '$T/abl/sheet.ppm' | grep -q '^256 320'"
else
	skip examples "no netpbm (pnmcat, pamscale)"
fi

# ==== bad input ====
mkdir -p "$T/empty" "$T/mixed"
echo caption >"$T/empty/x.txt"
cp "$T/data/a.ppm" "$T/mixed/"
echo 'not an image' >"$T/mixed/notes.md"
echo x >"$T/afile"
bad missing-folder 1 sd-lora-train "sd-lora-train -m '$tiny' --caption x -o '$T/o1.safetensors' '$T/nothing'"
bad non-image 1 sd-lora-train "sd-lora-train -m '$tiny' --caption x -o '$T/o2.safetensors' '$T/mixed'"
grep -q 'notes.md: not a PNG, JPEG or PNM image' "$T/bad.err" && pass non-image-named || fail non-image-named "$(cat "$T/bad.err")"
bad zero-images 1 sd-lora-train "sd-lora-train -m '$tiny' --caption x -o '$T/o3.safetensors' '$T/empty'"
bad unwritable-output 1 sd-lora-train "sd-lora-train -m '$tiny' --caption x -o '$T/nodir/o4.safetensors' '$T/data'"
bad output-under-file 1 sd-lora-train "sd-lora-train -m '$tiny' --caption x -o '$T/afile/o5.safetensors' '$T/data'"
bad no-caption 1 sd-lora-train "sd-lora-train -m '$tiny' --resolution 64 -o '$T/o6.safetensors' '$T/data'"
ok no-partial-output "test ! -e '$T/o1.safetensors' && test ! -e '$T/o2.safetensors' && test ! -e '$T/o3.safetensors' && test ! -e '$T/o6.safetensors'"
bad no-data 2 sd-lora-train "sd-lora-train -m '$tiny' -o '$T/o.safetensors'"
bad no-output 2 sd-lora-train "sd-lora-train -m '$tiny' '$T/data'"
bad bad-train 2 sd-lora-train "sd-lora-train -m '$tiny' --train unet,foo -o '$T/o.safetensors' '$T/data'"
bad bad-option 2 sd-lora-train "sd-lora-train --frobnicate"
bad bad-rank 2 sd-lora-train "sd-lora-train --rank 0x -o '$T/o.safetensors' '$T/data'"
finish
