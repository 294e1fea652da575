#!/usr/bin/env bash
# A short check of the GPU code paths on a CUDA machine, through the same stage code the pipeline runs,
# on a tiny Gemma 3 in the real shape (896 px, 14 px patches, 256 image tokens) with pan-and-scan on:
#   1. compare: the same 4 rows through unsloth and transformers + peft, 16-bit and 4-bit
#      (tools/compare_backends.py): sequence lengths, image tokens, pixel tensors, labels and
#      trainable modules/parameter counts must be identical; the forward losses are reported;
#   2. train with unsloth 16-bit LoRA, then 3. merge that adapter (backend unsloth);
#   4. train with unsloth 4-bit QLoRA;
#   5. train with transformers + peft (bf16), then 6. merge it with peft;
#   7. train with transformers + bitsandbytes 4-bit.
# The merge stage checks parity (greedy outputs and logits) for both merges. Each step's metrics
# JSON and log land in OUTDIR. A failed step is reported and the others still run; the exit status
# is the number of failed steps.
#
# Usage, from the project root (nothing in the project is changed; each step runs in a temp folder
# with its own params.yaml):
#   bash tools/gpu_check.sh OUTDIR
# STEP_TIMEOUT (seconds, default 900) bounds each step; STEPS="compare unsloth_bf16" runs only those.
# DRY_RUN=1 prints each step's params and command line instead of running it (no GPU needed:
# tests/test_gpu_check.py parses every printed command with the stage's own argument parser).
set -uo pipefail

out=$(realpath -m "${1:-gpu_check}")
repo=$(pwd)
mkdir -p "$out"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1  # nothing is downloaded; no usage ping
# unsloth compiles each decoder block with torch.compile; on the tiny model the first step took 78 s
# and new batch shapes recompiled (H200), so a 60-step check ran out of time. Set it to 0 to check that too.
export UNSLOTH_COMPILE_DISABLE=${UNSLOTH_COMPILE_DISABLE:-1}
python=$(realpath -s "$(command -v "${PYTHON:-python3}")")  # absolute: steps run elsewhere
dry=${DRY_RUN:-}
fixture="$out/fixture"
image='{"do_pan_and_scan": true, "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_crop_size": 256, "pan_and_scan_min_ratio_to_activate": 1.2}'

if [ -z "$dry" ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    "$python" - <<'EOF' | tee -a "$out/gpu.txt"
import importlib.metadata as md
for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth",
             "unsloth_zoo", "vllm"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
EOF
    [ -d "$fixture/base" ] || "$python" tools/compare_backends.py fixture "$fixture" || exit 1
fi

failed=0
adapters="$out/adapters"  # trained adapters, for the merge steps
mkdir -p "$adapters"
# step NAME KEY=VALUE... -- COMMAND...: run COMMAND in a fresh folder whose params.yaml has KEY=VALUE set.
step() {
    local name=$1; shift
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
    local sets=()
    while [ "$1" != "--" ]; do sets+=("$1"); shift; done; shift
    if [ -n "$dry" ]; then
        printf 'DRY\t%s\t' "$name"; [ ${#sets[@]} -eq 0 ] || printf '%q ' "${sets[@]}"
        printf '\t'; printf '%q ' "$@"; printf '\n'
        return
    fi
    local work; work=$(mktemp -d)
    "$python" - "$repo/params.yaml" "$work/params.yaml" "${sets[@]}" <<'EOF'
import sys, yaml
params = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
for item in sys.argv[3:]:
    key, value = item.split("=", 1)
    params[key] = yaml.safe_load(value)
yaml.safe_dump(params, open(sys.argv[2], "w", encoding="utf-8"), allow_unicode=True)
EOF
    echo "== $name: ${sets[*]}"
    local start=$SECONDS
    if (cd "$work" && timeout "${STEP_TIMEOUT:-900}" "$@") > "$out/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - start)) s; $(tail -n 1 "$out/$name.log")"
    else
        echo "   FAILED in $((SECONDS - start)) s; last lines of $out/$name.log:"; tail -n 15 "$out/$name.log" | sed 's/^/   | /'
        failed=$((failed + 1))
    fi
    [ -d "$work/adapter" ] && rm -rf "${adapters:?}/$name" && mv "$work/adapter" "$adapters/$name"
    rm -rf "$work"
}

compare=("$repo/tools/compare_backends.py")
runs=()
for bits in 16 4; do
    for backend in transformers unsloth; do
        step "compare_${backend}_${bits}" -- "$python" "${compare[@]}" one "$backend" "$bits" "$fixture/base" \
            "$fixture/rows.json" "$out/compare_${backend}_${bits}.json" --image "$image"
        runs+=("$out/compare_${backend}_${bits}.json")
    done
done
step compare -- "$python" "${compare[@]}" compare "${runs[@]}"

train=(-m stages.train --base-dir "$fixture/base" --non-test "$fixture/rows.json" --live-dir "" --output adapter
       --checkpoints checkpoints)
short=(num_train_epochs=3 per_device_train_batch_size=2 eval_steps=4 logging_steps=1 val_ratio=0.25
       "image=$image")  # the demo learning rate (5e-3): a visible adapter effect for the merges to preserve
merge=(-m stages.merge --base "$fixture/base" --rows "$fixture/rows.json" --samples 2 --max-new-tokens 8 --out merged)
step unsloth_bf16 backend=unsloth load_in_4bit=false "${short[@]}" -- \
    "$python" "${train[@]}" --metrics "$out/train_unsloth_bf16.json"
step merge_unsloth backend=unsloth "image=$image" -- \
    "$python" "${merge[@]}" --adapter "$adapters/unsloth_bf16" --metrics "$out/merge_unsloth.json"
step unsloth_4bit backend=unsloth load_in_4bit=true "${short[@]}" -- \
    "$python" "${train[@]}" --metrics "$out/train_unsloth_4bit.json"
step transformers_bf16 backend=transformers load_in_4bit=false "${short[@]}" -- \
    "$python" "${train[@]}" --metrics "$out/train_transformers_bf16.json"
step merge_peft backend=transformers "image=$image" -- \
    "$python" "${merge[@]}" --adapter "$adapters/transformers_bf16" --metrics "$out/merge_peft.json"
step transformers_4bit backend=transformers load_in_4bit=true "${short[@]}" -- \
    "$python" "${train[@]}" --metrics "$out/train_transformers_4bit.json"
[ -n "$dry" ] || echo "failed steps: $failed (logs and metrics in $out)"
exit "$failed"
