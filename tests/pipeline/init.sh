#!/bin/sh
# tests/pipeline/init.sh - sd-init: the tiny configuration gives the fixture model's tensor names,
# shapes and parameter counts, a tokenizer/ whose vocab.json equals CLIP's, the same bytes for the
# same seed, a model every tool runs; a JSON configuration file; and bad input (exit status, one
# "sd-init:" line, nothing left behind).  (--config sd15 writes 4 GB: the benchmark's job, not a test's.)
. tests/pipeline/lib.sh

tiny=$SD_FIXTURES/tiny
[ -d "$tiny/unet" ] || { skip init "the tiny model is absent from $SD_FIXTURES"; exit 0; }
unset SD_MODEL SD_MODEL_CONFIG
SD_DEVICE=cpu; export SD_DEVICE

ok sd-init-help "sd-init --help >'$T/help' && grep -q '^Usage: sd-init ' '$T/help' && [ \"\$(sd-init -h)\" = \"\$(cat '$T/help')\" ]"
ok sd-init-version "sd-init --version | grep -q '^sd-init (sdpipe) '"
bad sd-init-bad-option 2 sd-init "sd-init --no-such-option"
bad sd-init-no-config 2 sd-init "sd-init -o '$T/x'"
bad sd-init-no-output 2 sd-init "sd-init --config tiny"
bad sd-init-bad-seed 2 sd-init "sd-init --config tiny -o '$T/x' --seed -1"
bad sd-init-missing-file 1 sd-init "sd-init --config '$T/none.json' -o '$T/x'"
printf '{"unet": {}}' >"$T/partial.json"
bad sd-init-partial-config 1 sd-init "sd-init --config '$T/partial.json' -o '$T/x'"
ok sd-init-nothing-left "[ ! -e '$T/x' ] && ! ls '$T' | grep -q 'x.tmp-'"

ok tiny "sd-init --config tiny -o '$T/m'"
ok tiny-layout "[ -f '$T/m/model_index.json' ] && [ -f '$T/m/scheduler/scheduler_config.json' ] && [ -f '$T/m/unet/diffusion_pytorch_model.safetensors' ] && [ -f '$T/m/vae/config.json' ] && [ -f '$T/m/text_encoder/model.safetensors' ]"
sd-info -m "$tiny" | grep parameters >"$T/want"
sd-info -m "$T/m" | grep parameters >"$T/got"
same tiny-same-parameters-as-fixture "$T/want" "$T/got"
if command -v python3 >/dev/null 2>&1; then
	cat >"$T/names.py" <<'PY'
import json, struct, sys
def names(p):
    b = open(p, 'rb').read()
    h = json.loads(b[8:8 + struct.unpack_from('<Q', b, 0)[0]])
    h.pop('__metadata__', None)
    return {k: v['shape'] for k, v in h.items()}
a, b = names(sys.argv[1]), names(sys.argv[2])
sys.exit(0 if a == b else 1)
PY
	for c in text_encoder/model unet/diffusion_pytorch_model vae/diffusion_pytorch_model; do
		ok "tiny-names-$(dirname $c)" "python3 '$T/names.py' '$T/m/$c.safetensors' '$tiny/$c.fp16.safetensors'"
	done
	ok tiny-vocab-is-clips "python3 -c 'import json,sys; sys.exit(json.load(open(\"$T/m/tokenizer/vocab.json\")) != json.load(open(\"$tiny/tokenizer/vocab.json\")))'"
fi
ok tiny-same-seed-same-bytes "sd-init --config tiny -o '$T/m2' && diff -r '$T/m' '$T/m2'"
ok tiny-other-seed "sd-init --config tiny --seed 1 -o '$T/m3' && ! cmp -s '$T/m/unet/diffusion_pytorch_model.safetensors' '$T/m3/unet/diffusion_pytorch_model.safetensors'"
bad exists 1 sd-init "sd-init --config tiny -o '$T/m'"
ok tiny-generates "sd-txt2img -m '$T/m' -s 1 --sampler ddim --steps 2 -p 'a cat' -o '$T/cat.ppm' && pamfile '$T/cat.ppm' | grep -q '64 by 64'"
ok tiny-tokenizes-like-fixture "sd-tokenize -m '$T/m' 'a cat in the style of **' | cmp -s - \"\$(sd-tokenize -m '$tiny' 'a cat in the style of **' >'$T/t2'; echo '$T/t2')\""
# a JSON file of configs: the tiny one with two transformer layers and linear projections
cp "$T/m/unet/config.json" "$T/u.json"
printf '{"text_encoder": %s, "vae": %s, "unet": %s}' "$(cat "$T/m/text_encoder/config.json")" "$(cat "$T/m/vae/config.json")" \
	"$(sed 's/"use_linear_projection": false/"use_linear_projection": true, "transformer_layers_per_block": 2/' "$T/u.json")" >"$T/cfg.json"
ok json-config "sd-init --config '$T/cfg.json' -o '$T/j' && sd-info -m '$T/j' | grep -q 'unet .*parameters'"
ok json-config-runs "sd-noise -m '$T/j' --seed 1 | sd-unet-step -m '$T/j' --sampler ddim --steps 1 -c \"\$(sd-tokenize 'x' | sd-text-encode -m '$T/j' >'$T/c.st'; echo '$T/c.st')\" | sd-info | grep -Eq '^  latent +f32 +\\[1,4,32,32\\]'"
finish
