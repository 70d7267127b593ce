# sd-info -m: the model summary from every layout (sd-info(1) EXAMPLES).
. tests/pipeline/lib.sh
F=$SD_FIXTURES
ok folder "sd-info -m '$F/tiny' > '$T/folder.txt'"
ok folder-counts "grep -q 'text_encoder  1,617,529 parameters' '$T/folder.txt' && grep -q 'vae           658,375 parameters' '$T/folder.txt' && grep -q 'unet          1,427,012 parameters' '$T/folder.txt' && grep -q '^3,702,916 parameters' '$T/folder.txt'"
ok folder-config "grep -q '\"num_attention_heads\": 4' '$T/folder.txt' && grep -q '(diffusers)' '$T/folder.txt'"
ok ckpt "sd-info -m '$F/tiny.ldm.ckpt' --config '$F/tiny' > '$T/ckpt.txt' && grep -q '(ckpt)' '$T/ckpt.txt'"
# the same components and parameter counts whatever the layout
grep 'parameters' "$T/folder.txt" > "$T/a"; grep 'parameters' "$T/ckpt.txt" > "$T/b"
same ckpt-equals-folder "$T/a" "$T/b"
SD_MODEL="$F/tiny" ok env-model "sd-info -m '' | grep -q '^3,702,916 parameters'"
bad missing-model 1 sd-info "sd-info -m '$T/nothing-here'"
mkdir -p "$T/notmodel"
bad not-a-model 1 sd-info "sd-info -m '$T/notmodel'"
bad config-without-model 2 sd-info "sd-info --config '$F/tiny'"
finish
