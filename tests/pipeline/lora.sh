#!/bin/sh
# tests/pipeline/lora.sh - --lora on sd-text-encode, sd-vae-encode and sd-vae-decode, and sd-merge, run
# the way their man pages show them on the tiny model and tests/fixtures/tiny-lora: a PEFT parent folder,
# one component's folder, the kohya file and the diffusers file; adapters change the output, two half
# adapters equal one whole, the text context equals peft's golden; sd-merge's checkpoints (diffusers
# folder, single file, f16) load in sd-info and in every tool and give the unmerged outputs; bad
# adapters and bad usage (exit status, one "prog:" line naming the key, nothing on stdout, no output
# left behind).  The numbers of every component are checked in tests/unit/test_lora.c.
. tests/pipeline/lib.sh

tiny=$SD_FIXTURES/tiny
lora=$SD_FIXTURES/tiny-lora
img=$SD_FIXTURES/golden/test_image_64.ppm
golden=$SD_FIXTURES/golden/tiny/lora_outputs.safetensors
[ -d "$tiny/unet" ] && [ -d "$lora/peft" ] || { skip lora "the tiny model or tiny-lora is absent from $SD_FIXTURES"; exit 0; }
command -v python3 >/dev/null 2>&1 && py=1 || py=

# ==== help ====
for p in sd-text-encode sd-vae-encode sd-vae-decode; do
	ok "$p-help-lora" "$p --help | grep -q -- '--lora PATH\\[:SCALE\\]'"
done
ok sd-merge-help "sd-merge --help >'$T/help' && grep -q '^Usage: sd-merge ' '$T/help'"
ok sd-merge-version "sd-merge --version | grep -q '^sd-merge (sdpipe) '"

# ==== a small comparer (python3 without numpy or msgpack) ====
cat >"$T/cmp.py" <<'EOF'
# cmp.py A KEY B KEY2 TOL [same|differ]: the float tensor KEY of stream A against KEY2 of B (a stream,
# or a .safetensors whose first slab along dim 0 is taken when sizes differ); prints max|diff|.
import json, struct, sys
def unpack(b, i):
    t = b[i]; i += 1
    if t <= 0x7f: return t, i
    if 0x80 <= t <= 0x8f or t in (0xde, 0xdf):
        n = t & 15 if t <= 0x8f else struct.unpack_from('>H' if t == 0xde else '>I', b, i)[0]
        i += 0 if t <= 0x8f else (2 if t == 0xde else 4)
        d = {}
        for _ in range(n):
            k, i = unpack(b, i); v, i = unpack(b, i); d[k] = v
        return d, i
    if 0x90 <= t <= 0x9f or t in (0xdc, 0xdd):
        n = t & 15 if t <= 0x9f else struct.unpack_from('>H' if t == 0xdc else '>I', b, i)[0]
        i += 0 if t <= 0x9f else (2 if t == 0xdc else 4)
        a = []
        for _ in range(n):
            v, i = unpack(b, i); a.append(v)
        return a, i
    if 0xa0 <= t <= 0xbf or t in (0xd9, 0xda, 0xdb, 0xc4, 0xc5, 0xc6):
        if 0xa0 <= t <= 0xbf: n = t & 31
        else:
            w = {0xd9: 1, 0xc4: 1, 0xda: 2, 0xc5: 2, 0xdb: 4, 0xc6: 4}[t]
            n = int.from_bytes(b[i:i + w], 'big'); i += w
        s = bytes(b[i:i + n]); i += n
        return (s if t in (0xc4, 0xc5, 0xc6) else s.decode()), i
    if t in (0xcc, 0xcd, 0xce, 0xcf):
        w = {0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8}[t]
        return int.from_bytes(b[i:i + w], 'big'), i + w
    if t in (0xd0, 0xd1, 0xd2, 0xd3):
        w = {0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8}[t]
        return int.from_bytes(b[i:i + w], 'big', signed=True), i + w
    if t == 0xca: return struct.unpack_from('>f', b, i)[0], i + 4
    if t == 0xcb: return struct.unpack_from('>d', b, i)[0], i + 8
    if t == 0xc0: return None, i
    if t in (0xc2, 0xc3): return t == 0xc3, i
    if t >= 0xe0: return t - 256, i
    raise ValueError('msgpack type 0x%02x' % t)
def values(path, key):
    b = open(path, 'rb').read()
    if path.endswith('.safetensors'):
        hl = struct.unpack_from('<Q', b, 0)[0]
        h = json.loads(b[8:8 + hl])[key]
        a, e = h['data_offsets']
        return struct.unpack_from('<%df' % ((e - a) // 4), b, 8 + hl + a)
    t = unpack(b, 0)[0][key]
    assert t['dtype'] == 'f32', t['dtype']
    return struct.unpack('<%df' % (len(t['data']) // 4), t['data'])
got, want = values(sys.argv[1], sys.argv[2]), values(sys.argv[3], sys.argv[4])
want = want[:len(got)]
assert len(got) == len(want), (len(got), len(want))
diff = max(abs(x - y) for x, y in zip(got, want))
rel = diff / max(max(abs(y) for y in want), 1e-12)
print('max|diff| %.3g, rel %.3g' % (diff, rel))
same = sys.argv[6] == 'same' if len(sys.argv) > 6 else True
sys.exit(0 if (rel <= float(sys.argv[5])) == same else 1)
EOF
# close NAME A KEY B KEY2 TOL [same|differ]
close() {
	n=$1; shift
	if [ -z "$py" ]; then skip "$n" "no python3"; return; fi
	if python3 "$T/cmp.py" "$@" >"$T/cmp.out" 2>&1; then pass "$n ($(cat "$T/cmp.out"))"
	else fail "$n" "$(head -c 300 "$T/cmp.out")"; fi
}

# ==== sd-text-encode ====
prompt='a photograph of an astronaut riding a horse'
sd-tokenize "$prompt" >"$T/tok.st"
ok text-base "sd-text-encode -m '$tiny' <'$T/tok.st' >'$T/ctx-base.st'"
ok text-peft "sd-text-encode -m '$tiny' --lora '$lora/peft' <'$T/tok.st' >'$T/ctx-peft.st'"
ok text-peft-component "sd-text-encode -m '$tiny' --lora '$lora/peft/text_encoder' <'$T/tok.st' >'$T/ctx-peft1.st'"
same text-parent-equals-component "$T/ctx-peft.st" "$T/ctx-peft1.st"
ok text-kohya "sd-text-encode -m '$tiny' --lora '$lora/kohya/lora.safetensors' <'$T/tok.st' >'$T/ctx-kohya.st'"
ok text-diffusers-scale-2 "sd-text-encode -m '$tiny' --lora '$lora/diffusers/pytorch_lora_weights.safetensors:2' <'$T/tok.st' >'$T/ctx-diff.st'"
ok text-half-twice "sd-text-encode -m '$tiny' --lora '$lora/peft:0.5' --lora '$lora/peft/text_encoder:0.5' <'$T/tok.st' >'$T/ctx-half.st'"
close text-golden "$T/ctx-peft.st" context "$golden" text_encoder_last_hidden_state 1e-4
close text-kohya-is-peft "$T/ctx-kohya.st" context "$T/ctx-peft.st" context 1e-5
close text-diffusers-is-peft "$T/ctx-diff.st" context "$T/ctx-peft.st" context 1e-5
close text-two-halves-are-one "$T/ctx-half.st" context "$T/ctx-peft.st" context 1e-5
close text-lora-changes-context "$T/ctx-peft.st" context "$T/ctx-base.st" context 1e-3 differ

# ==== sd-vae-encode / sd-vae-decode ====
pnmtotensor "$img" >"$T/img.st"
ok vae-encode-base "sd-vae-encode -m '$tiny' '$T/img.st' >'$T/lat-base.st'"
ok vae-encode-peft "sd-vae-encode -m '$tiny' --lora '$lora/peft' '$T/img.st' >'$T/lat-peft.st'"
ok vae-encode-peft-vae "sd-vae-encode -m '$tiny' --lora '$lora/peft/vae:1.0' '$T/img.st' >'$T/lat-peft1.st'"
same vae-encode-parent-equals-component "$T/lat-peft.st" "$T/lat-peft1.st"
close vae-encode-lora-changes-latent "$T/lat-peft.st" latent "$T/lat-base.st" latent 1e-3 differ
# the kohya file has no VAE part: the latent is the base model's
ok vae-encode-kohya-no-vae "sd-vae-encode -m '$tiny' --lora '$lora/kohya/lora.safetensors' '$T/img.st' >'$T/lat-kohya.st'"
same vae-encode-kohya-is-base "$T/lat-kohya.st" "$T/lat-base.st"
ok vae-decode-peft "sd-vae-decode -m '$tiny' --lora '$lora/peft' '$T/lat-base.st' >'$T/dec-peft.st'"
ok vae-decode-base "sd-vae-decode -m '$tiny' '$T/lat-base.st' >'$T/dec-base.st'"
close vae-decode-lora-changes-image "$T/dec-peft.st" image "$T/dec-base.st" image 1e-3 differ
ok pipe-roundtrip "pnmtotensor '$img' | sd-vae-encode -m '$tiny' --lora '$lora/peft' | sd-vae-decode -m '$tiny' --lora '$lora/peft' | tensortopnm >'$T/out.ppm' && [ \"\$(head -c 2 '$T/out.ppm')\" = P6 ]"

# ==== sd-merge ====
ok merge-diffusers "sd-merge -m '$tiny' --lora '$lora/peft' -o '$T/merged'"
ok merge-info "sd-info -m '$T/merged' | grep -q '^model $T/merged (diffusers)'"
ok merge-no-temporary-left "[ -z \"\$(ls -d '$T'/merged.tmp-* 2>/dev/null)\" ]"
ok merge-text "sd-text-encode -m '$T/merged' <'$T/tok.st' >'$T/ctx-merged.st'"
close merge-text-is-unmerged "$T/ctx-merged.st" context "$T/ctx-peft.st" context 1e-5
ok merge-vae "sd-vae-encode -m '$T/merged' '$T/img.st' >'$T/lat-merged.st'"
close merge-vae-is-unmerged "$T/lat-merged.st" latent "$T/lat-peft.st" latent 1e-5
ok merge-single "sd-merge -m '$tiny' --lora '$lora/kohya/lora.safetensors' --lora '$lora/peft/vae' -o '$T/merged.safetensors'"
ok merge-single-info "sd-info -m '$T/merged.safetensors' --config '$tiny' | grep -q 'single-file'"
ok merge-single-text "sd-text-encode -m '$T/merged.safetensors' --config '$tiny' <'$T/tok.st' >'$T/ctx-single.st'"
close merge-single-text-is-unmerged "$T/ctx-single.st" context "$T/ctx-peft.st" context 1e-5
ok merge-f16 "sd-merge -m '$tiny' --lora '$lora/peft' --to single,f16 -o '$T/merged-f16.safetensors'"
ok merge-f16-info "sd-info -m '$T/merged-f16.safetensors' --config '$tiny' | grep -q 'text_encoder'"
ok merge-weighted "sd-merge --weighted '$tiny:0.5' '$T/merged:0.5' -o '$T/half'"
ok merge-add-difference "sd-merge --add-difference '$tiny' '$T/merged' '$tiny' --multiplier 0.5 -o '$T/half-ad.safetensors'"
ok merge-half-text "sd-text-encode -m '$T/half' <'$T/tok.st' >'$T/ctx-w.st'"
ok merge-half-ad-text "sd-text-encode -m '$T/half-ad.safetensors' --config '$tiny' <'$T/tok.st' >'$T/ctx-ad.st'"
close merge-weighted-is-add-difference "$T/ctx-w.st" context "$T/ctx-ad.st" context 1e-5

# ==== sd-unet-step --lora (the issue's definition of done): the golden noise prediction at t = 999 ====
gp=tests/pipeline/goldens.py
g=$SD_FIXTURES/golden/tiny
if [ -n "$py" ] && [ -f "$gp" ] && command -v sd-unet-step >/dev/null 2>&1; then
	python3 "$gp" frame "$T/ulat.st" "latent=$g/unet.safetensors:latent" &&
		python3 "$gp" frame "$T/ucond.st" "context=$g/unet.safetensors:encoder_hidden_states"
	# unet-golden NAME MODEL LORA-ARGS GOLDEN-FILE GOLDEN-NAME [CONFIG]
	unet_golden() {
		if sd-unet-step -m "$2" ${6:+--config "$6"} -c "$T/ucond.st" --predict 999 $3 <"$T/ulat.st" >"$T/eps.st" 2>"$T/eps.err" &&
			python3 "$gp" compare "$T/eps.st" eps "$4" "$5" 1e-4 >"$T/cmp.out" 2>&1; then
			pass "$1 ($(cat "$T/cmp.out"))"
		else
			fail "$1" "$(head -c 300 "$T/eps.err" "$T/cmp.out")"
		fi
	}
	unet_golden unet-peft "$tiny" "--lora $lora/peft" "$golden" 'unet_noise_pred[0]'
	unet_golden unet-kohya "$tiny" "--lora $lora/kohya/lora.safetensors" "$golden" 'unet_noise_pred[0]'
	unet_golden unet-diffusers-scale-1 "$tiny" "--lora $lora/diffusers/pytorch_lora_weights.safetensors" \
		"$g/lora_diffusers_loaded.safetensors" unet_noise_pred_t0
	unet_golden unet-merged-folder "$T/merged" "" "$golden" 'unet_noise_pred[0]'
	unet_golden unet-merged-single "$T/merged.safetensors" "" "$golden" 'unet_noise_pred[0]' "$tiny"
else
	skip unet-step-lora "no python3, tests/pipeline/goldens.py or sd-unet-step"
fi

# ==== bad adapters and bad usage ====
# a truncated kohya file, an adapter whose A does not fit, one for a layer the model lacks
head -c 20000 "$lora/kohya/lora.safetensors" >"$T/truncated.safetensors"
bad text-truncated-lora 1 sd-text-encode "sd-text-encode -m '$tiny' --lora '$T/truncated.safetensors' <'$T/tok.st'"
bad text-missing-lora 1 sd-text-encode "sd-text-encode -m '$tiny' --lora '$T/nothing.safetensors' <'$T/tok.st'"
bad vae-not-an-adapter-folder 1 sd-vae-decode "sd-vae-decode -m '$tiny' --lora '$tiny' '$T/lat-base.st'"
bad merge-truncated-lora 1 sd-merge "sd-merge -m '$tiny' --lora '$T/truncated.safetensors' -o '$T/bad1'"
ok merge-bad-leaves-nothing "[ ! -e '$T/bad1' ] && [ -z \"\$(ls -d '$T'/bad1.tmp-* 2>/dev/null)\" ]"
if [ -n "$py" ]; then
	python3 - "$T" <<'EOF'
import json, struct, sys
def write(path, tensors):
    hdr, data = {}, b''
    for name, shape in tensors:
        n = 1
        for d in shape: n *= d
        hdr[name] = {'dtype': 'F32', 'shape': shape, 'data_offsets': [len(data), len(data) + 4 * n]}
        data += struct.pack('<%df' % n, *([0.01] * n))
    h = json.dumps(hdr).encode()
    h += b' ' * (-len(h) % 8)
    open(path, 'wb').write(struct.pack('<Q', len(h)) + h + data)
q = 'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
write(sys.argv[1] + '/shape.safetensors', [(q + '.lora_down.weight', [8, 33]), (q + '.lora_up.weight', [32, 8])])
u = 'lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q'
write(sys.argv[1] + '/layer.safetensors', [(u + '.lora_down.weight', [8, 64]), (u + '.lora_up.weight', [64, 8])])
write(sys.argv[1] + '/key.safetensors', [(q + '.lora_down.weight', [8, 32]), (q + '.lora_up.weight', [32, 8]),
                                         (q + '.lora_mid.weight', [8, 8])])
EOF
	bad text-wrong-shape 1 sd-text-encode "sd-text-encode -m '$tiny' --lora '$T/shape.safetensors' <'$T/tok.st'"
	ok text-wrong-shape-names-key "grep -q 'self_attn_q_proj.lora_down.weight' '$T/bad.err'"
	bad merge-unknown-layer 1 sd-merge "sd-merge -m '$tiny' --lora '$T/layer.safetensors' -o '$T/bad2'"
	ok merge-unknown-layer-names-key "grep -q 'down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight' '$T/bad.err'"
	bad text-unknown-key 1 sd-text-encode "sd-text-encode -m '$tiny' --lora '$T/key.safetensors' <'$T/tok.st'"
	ok text-unknown-key-names-key "grep -q 'q_proj.lora_mid.weight' '$T/bad.err'"
else
	skip bad-adapter-files "no python3"
fi
bad merge-no-output 2 sd-merge "sd-merge -m '$tiny'"
bad merge-no-model 2 sd-merge "SD_MODEL= sd-merge -o '$T/x'"
bad merge-operand-without-mode 2 sd-merge "sd-merge -m '$tiny' '$tiny' -o '$T/x'"
bad merge-add-difference-two 2 sd-merge "sd-merge --add-difference '$tiny' '$tiny' -o '$T/x'"
bad merge-weighted-no-weight 2 sd-merge "sd-merge --weighted '$tiny' '$tiny:0.5' -o '$T/x'"
bad merge-bad-to 2 sd-merge "sd-merge -m '$tiny' --to ckpt -o '$T/x'"
bad merge-output-exists 1 sd-merge "sd-merge -m '$tiny' -o '$T/merged'"
if [ -n "$SHARED" ] && [ -d "$SHARED/sd15-shape-small" ]; then
	bad merge-weighted-different-models 1 sd-merge "sd-merge --weighted '$tiny:0.5' '$SHARED/sd15-shape-small:0.5' -o '$T/x'"
else
	skip merge-weighted-different-models "no \$SHARED/sd15-shape-small"
fi
finish
