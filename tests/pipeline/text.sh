#!/bin/sh
# tests/pipeline/text.sh - sd-tokenize and sd-text-encode run the way their man pages show them: the
# issue's pipe on the tiny model from the diffusers folder and from the .ckpt (byte-identical
# streams), the numbers against transformers' golden last_hidden_state, prompt files, negative
# prompts, clip skip, pass-through, and a table of bad inputs (exit status, one "prog:" line on stderr,
# nothing on stdout).
. tests/pipeline/lib.sh

tiny=$SD_FIXTURES/tiny
ckpt=$SD_FIXTURES/tiny.ldm.ckpt
golden=$SD_FIXTURES/golden/tiny/text_encoder.safetensors
prompt='a photo in the style of **'
unset SD_MODEL SD_MODEL_CONFIG
# the reference (CPU) path: byte-for-byte comparisons below are within one device, and "auto" would
# pick a GPU whose backend may not have every op yet (test_clip compares CUDA with the golden)
SD_DEVICE=cpu; export SD_DEVICE

# hex STRING: write the bytes spelled in hex (POSIX printf knows only octal escapes).
hex() {
	for h in $(printf '%s' "$1" | sed 's/../& /g'); do printf "\\$(printf %03o "0x$h")"; done
}

# ==== help, version, usage errors ====
for p in sd-tokenize sd-text-encode; do
	ok "$p-help" "$p --help >'$T/help' && grep -q '^Usage: $p ' '$T/help' && [ \"\$($p -h)\" = \"\$(cat '$T/help')\" ]"
	ok "$p-version" "$p --version | grep -q '^$p (sdpipe) '"
	bad "$p-bad-option" 2 "$p" "$p --no-such-option"
	ok "$p-bad-option-try" "$p --no-such-option 2>&1 >/dev/null | tail -n 1 | grep -qx \"Try '$p --help'.\""
done
bad text-encode-no-model 2 sd-text-encode "sd-text-encode"
bad text-encode-clip-skip-0 2 sd-text-encode "sd-text-encode -m '$tiny' --clip-skip 0"
bad text-encode-clip-skip-x 2 sd-text-encode "sd-text-encode -m '$tiny' --clip-skip 2x"
bad text-encode-clip-skip-deep 2 sd-text-encode "sd-text-encode -m '$tiny' --clip-skip 6"
bad text-encode-bad-device 2 sd-text-encode "sd-text-encode -m '$tiny' --device tpu"
bad text-encode-extra-arg 2 sd-text-encode "sd-text-encode -m '$tiny' file.st"
bad tokenize-file-missing-arg 2 sd-tokenize "sd-tokenize -f"

# ==== the issue's pipe, from the diffusers folder and from the .ckpt ====
ok pipe-folder "sd-tokenize '$prompt' | sd-text-encode -m '$tiny' | sd-info >'$T/info'"
ok pipe-folder-context "grep -Eq '^  context +f32 +\[1,77,32\]' '$T/info'"
ok pipe-folder-uncond "grep -Eq '^  uncond_context +f32 +\[1,77,32\]' '$T/info'"
ok pipe-passthrough "grep -Fq '\"$prompt\"' '$T/info' && grep -Eq '^  tokens +i32 +\[1,77\]' '$T/info' && grep -Eq '^  negative_prompt +\"\"' '$T/info'"
sd-tokenize "$prompt" >"$T/tok.st"
if [ -f "$ckpt" ]; then
	ok pipe-ckpt "sd-tokenize '$prompt' | sd-text-encode -m '$ckpt' --config '$tiny' | sd-info | grep -Eq '^  context +f32 +\[1,77,32\]'"
	sd-text-encode -m "$tiny" <"$T/tok.st" >"$T/folder.st"
	sd-text-encode -m "$ckpt" --config "$tiny" <"$T/tok.st" >"$T/ckpt.st"
	same ckpt-equals-folder "$T/folder.st" "$T/ckpt.st"
	SD_MODEL=$ckpt SD_MODEL_CONFIG=$tiny sd-text-encode <"$T/tok.st" >"$T/env.st"
	same env-model-config "$T/folder.st" "$T/env.st"
	bad ckpt-without-config 1 sd-text-encode "sd-text-encode -m '$ckpt' <'$T/tok.st'"
else
	skip pipe-ckpt "no $ckpt"
fi

# ==== numbers: context of the golden's first prompt against transformers' last_hidden_state[0] ====
# (python3 without numpy or msgpack: a small msgpack reader on struct)
cat >"$T/check.py" <<'EOF'
import json, struct, sys
def unpack(b, i):
    t = b[i]; i += 1
    if t <= 0x7f: return t, i
    if 0x80 <= t <= 0x8f or t in (0xde, 0xdf):
        if t <= 0x8f: n = t & 15
        elif t == 0xde: n = struct.unpack_from('>H', b, i)[0]; i += 2
        else: n = struct.unpack_from('>I', b, i)[0]; i += 4
        d = {}
        for _ in range(n):
            k, i = unpack(b, i); v, i = unpack(b, i); d[k] = v
        return d, i
    if 0x90 <= t <= 0x9f or t in (0xdc, 0xdd):
        if t <= 0x9f: n = t & 15
        elif t == 0xdc: n = struct.unpack_from('>H', b, i)[0]; i += 2
        else: n = struct.unpack_from('>I', b, i)[0]; i += 4
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
stream = open(sys.argv[1], 'rb').read()
frame, _ = unpack(stream, 0)
ctx = frame['context']
assert ctx['dtype'] == 'f32' and ctx['shape'] == [1, 77, 32], ctx['shape']
got = struct.unpack('<%df' % (77 * 32), ctx['data'])
st = open(sys.argv[2], 'rb').read()
hl = struct.unpack_from('<Q', st, 0)[0]
hdr = json.loads(st[8:8 + hl])
a, _ = hdr['last_hidden_state']['data_offsets']
want = struct.unpack_from('<%df' % (77 * 32), st, 8 + hl + a)  # prompt 0 of [3,77,32]
diff = max(abs(x - y) for x, y in zip(got, want))
rel = diff / max(abs(y) for y in want)
print('max|diff| %.3g, rel %.3g' % (diff, rel))
sys.exit(0 if rel <= 1e-4 else 1)
EOF
if command -v python3 >/dev/null 2>&1; then
	sd-tokenize 'a photograph of an astronaut riding a horse' | sd-text-encode -m "$tiny" >"$T/astro.st"
	if python3 "$T/check.py" "$T/astro.st" "$golden" >"$T/check.out" 2>&1; then
		pass "golden-last-hidden-state ($(cat "$T/check.out"))"
	else
		fail golden-last-hidden-state "$(head -c 300 "$T/check.out")"
	fi
else
	skip golden-last-hidden-state "no python3"
fi

# ==== clip skip ====
sd-text-encode -m "$tiny" <"$T/tok.st" >"$T/skip0.st"
sd-text-encode -m "$tiny" --clip-skip 1 <"$T/tok.st" >"$T/skip1.st"
sd-text-encode -m "$tiny" --clip-skip 2 <"$T/tok.st" >"$T/skip2.st"
same clip-skip-1-is-default "$T/skip0.st" "$T/skip1.st"
ok clip-skip-2-differs "! cmp -s '$T/skip0.st' '$T/skip2.st' && sd-info '$T/skip2.st' | grep -Eq '^  context +f32 +\[1,77,32\]'"
ok clip-skip-5 "sd-text-encode -m '$tiny' --clip-skip 5 <'$T/tok.st' | sd-info | grep -Eq '^  context +f32 +\[1,77,32\]'"

# ==== sd-tokenize: files, negative prompts, tokenizers ====
printf 'a red apple\n\nthe sea at night\r\nlast line without newline' >"$T/prompts.txt"
ok file-frames "sd-tokenize -f '$T/prompts.txt' | sd-info | grep -c '^frame' | grep -qx 3"
ok file-crlf "sd-tokenize -f '$T/prompts.txt' | sd-info | grep -q '^  prompt  *\"the sea at night\"\$'"
ok file-last-line "sd-tokenize -f '$T/prompts.txt' | sd-info | grep -q '\"last line without newline\"'"
ok file-stdin "sd-tokenize -f - <'$T/prompts.txt' | sd-info | grep -c '^frame' | grep -qx 3"
ok stdin-default "sd-tokenize <'$T/prompts.txt' | sd-info | grep -c '^frame' | grep -qx 3"
ok args-then-file "sd-tokenize -f '$T/prompts.txt' first | sd-info | sed -n 2p | grep -q '\"first\"'"
ok empty-prompt-arg "sd-tokenize '' | sd-info | grep -Eq '^  tokens +i32 +\[1,77\]'"
ok negative "sd-tokenize -n 'blurry, lowres' '$prompt' | sd-info | grep -q '^  negative_prompt  *\"blurry, lowres\"'"
ok negative-differs "sd-tokenize -n 'blurry' '$prompt' | sd-text-encode -m '$tiny' | sd-info >'$T/neg' && ! grep uncond_context '$T/neg' | cmp -s - '$T/info'"
ok two-frames-through "sd-tokenize one two | sd-text-encode -m '$tiny' | sd-info | grep -c '^  context ' | grep -qx 2"
sd-tokenize "$prompt" >"$T/tok-shipped.st"
sd-tokenize --vocab "$tiny/tokenizer" "$prompt" >"$T/tok-vocab.st"
sd-tokenize -m "$tiny" "$prompt" >"$T/tok-model.st"
same vocab-equals-shipped "$T/tok-shipped.st" "$T/tok-vocab.st"
same model-tokenizer-equals-shipped "$T/tok-shipped.st" "$T/tok-model.st"
long=$(i=0; while [ $i -lt 100 ]; do printf 'word%d ' $i; i=$((i + 1)); done)
ok long-prompt-chunked "sd-tokenize -n 'blurry' '$long' 2>'$T/warn' | sd-info | grep -Eq '^  tokens +i32 +\[1,(154|231|308)\]' && ! grep -q truncated '$T/warn'"
ok long-negative-padded "sd-tokenize -n 'blurry' '$long' | sd-info | grep -Eq '^  uncond_tokens +i32 +\[1,(154|231|308)\]'"
ok weights-key "sd-tokenize '(red:1.3) car, [blurry]' | sd-info | grep -Eq '^  weights +f32 +\[1,77\]'"
ok no-weights-key "! sd-tokenize 'red car' | sd-info | grep -q weights && ! sd-tokenize --no-weighting '(red:1.3)' | sd-info | grep -q weights"
ok long-weighted-context "sd-tokenize -n 'blurry' '($long:1.2)' | sd-text-encode -m '$tiny' | sd-info | grep -Eq '^  uncond_context +f32 +\[1,(154|231|308),32\]'"
# a 120-token weighted prompt renders (the UNet takes 154 context tokens, the negative prompt padded to match)
w120="(masterpiece:1.2), a lighthouse on a cliff"; for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30; do w120="$w120, word$i [blurry]"; done
ok txt2img-long-weighted "cd '$T' && sd-txt2img -m '$tiny' -p '$w120' -N '(ugly:1.3)' --steps 2 -W 64 -H 64 -s 1 -o '$T/w120.png' >/dev/null 2>&1 && test -s '$T/w120.png'"

# ==== bad input ====
# sd-tokenize: every check before any output
head -c 70000 /dev/zero | tr '\0' a >"$T/longline.txt"
printf 'fine\n' >>"$T/longline.txt"
printf 'ok line\ncaf\351 au lait\n' >"$T/latin1.txt"
printf 'ok\000nul\n' >"$T/nul.txt"
bad tokenize-long-line 1 sd-tokenize "sd-tokenize -f '$T/longline.txt'"
ok tokenize-long-line-msg "sd-tokenize -f '$T/longline.txt' 2>&1 >/dev/null | grep -q 'line 1 is longer than 65536 bytes'"
bad tokenize-non-utf8-file 1 sd-tokenize "sd-tokenize ok -f '$T/latin1.txt'"
ok tokenize-non-utf8-msg "sd-tokenize -f '$T/latin1.txt' 2>&1 >/dev/null | grep -q 'latin1.txt: line 2: not valid UTF-8'"
bad tokenize-non-utf8-arg 1 sd-tokenize "sd-tokenize \"\$(printf 'caf\\351')\""
bad tokenize-non-utf8-negative 1 sd-tokenize "sd-tokenize -n \"\$(printf '\\377')\" ok"
bad tokenize-overlong-utf8 1 sd-tokenize "sd-tokenize \"\$(printf '\\300\\257')\""
bad tokenize-nul 1 sd-tokenize "sd-tokenize -f '$T/nul.txt'"
bad tokenize-no-prompt 1 sd-tokenize "sd-tokenize"
bad tokenize-no-file 1 sd-tokenize "sd-tokenize -f '$T/no-such-file'"
bad tokenize-bad-vocab 1 sd-tokenize "sd-tokenize --vocab '$T' x"
bad tokenize-bad-model 1 sd-tokenize "sd-tokenize -m '$T/no-such-model' x"

# sd-text-encode: models
mkdir "$T/notext"
cp "$tiny/model_index.json" "$T/notext/"
cp -R "$tiny/vae" "$tiny/unet" "$T/notext/"
bad missing-text-encoder 1 sd-text-encode "sd-text-encode -m '$T/notext' <'$T/tok.st'"
cp -R "$tiny" "$T/corrupt"
for f in "$T"/corrupt/text_encoder/*.safetensors; do printf '\377\377\377\377\377\377\377\177{"a":' >"$f"; done
bad corrupt-header 1 sd-text-encode "sd-text-encode -m '$T/corrupt' <'$T/tok.st'"
bad no-such-model 1 sd-text-encode "sd-text-encode -m '$T/no-such-model' <'$T/tok.st'"
# sd-text-encode: streams
bad missing-tokens 1 sd-text-encode "pnmtotensor '$SD_FIXTURES/golden/test_image_64.ppm' | sd-text-encode -m '$tiny'"
ok missing-tokens-msg "pnmtotensor '$SD_FIXTURES/golden/test_image_64.ppm' | sd-text-encode -m '$tiny' 2>&1 >/dev/null | grep -q 'frame 0: no \"tokens\" key'"
bad no-frames 1 sd-text-encode "sd-text-encode -m '$tiny' </dev/null"
head -c 100 "$T/tok.st" >"$T/trunc.st"
bad truncated-stream 1 sd-text-encode "sd-text-encode -m '$tiny' <'$T/trunc.st'"
# {"tokens": i32 [1,1] = 49408}: one past the vocabulary
tok_k=a6746f6b656e73
hex "81${tok_k}83a56474797065a3693332a57368617065920101a464617461c40400c10000" >"$T/oor.st"
bad token-out-of-range 1 sd-text-encode "sd-text-encode -m '$tiny' <'$T/oor.st'"
ok token-out-of-range-msg "sd-text-encode -m '$tiny' <'$T/oor.st' 2>&1 | grep -q 'token id 49408 .* out of range'"
# {"tokens": "text"}: not a tensor
hex "81${tok_k}a474657874" >"$T/str.st"
bad tokens-not-tensor 1 sd-text-encode "sd-text-encode -m '$tiny' <'$T/str.st'"

finish
