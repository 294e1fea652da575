#!/usr/bin/env bash
# A short check of the GPU code paths on a CUDA machine, through the same stage code the pipeline runs:
#   1. train with unsloth (16-bit LoRA), 2. merge that adapter with backend unsloth (unsloth's
#   merged save for a base stored in the merge dtype; the float32 tiny base goes to peft, and the
#   log says so), 3. train with unsloth 4-bit QLoRA, 4. train with transformers + peft on CUDA
#   (bf16), 5. train with transformers + bitsandbytes 4-bit, 6. merge the peft adapter with peft
#   on CUDA (the merge stage checks parity for both merges).
# Each run is short (params below); its metrics JSON and log land in OUTDIR. A step that fails is
# reported and the others still run; the exit status is the number of failed steps.
#
# Usage, from the project root, after `make repro` built models/base and data/ (or copy them here):
#   bash tools/gpu_check.sh OUTDIR
# STEP_TIMEOUT (seconds, default 900) bounds each step; STEPS="unsloth_bf16 merge_unsloth" runs
# only those. Nothing in the project is changed: each step runs in a temporary folder with its own
# params.yaml.
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

failed=0
adapters=$(mktemp -d)  # trained adapters, for the merge step
trap 'rm -rf "$adapters"' EXIT
# step NAME KEY=VALUE... -- COMMAND...: run COMMAND in a fresh folder whose params.yaml has KEY=VALUE set.
step() {
    local name=$1; shift
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
    local sets=()
    while [ "$1" != "--" ]; do sets+=("$1"); shift; done; shift
    local work; work=$(mktemp -d)
    ln -s "$repo/data" "$work/data"
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
    [ -d "$work/adapter" ] && mv "$work/adapter" "$adapters/$name"
    rm -rf "$work"
}

train=(-m stages.train --base-dir "$repo/models/base" --best-params none --live-dir "" --output adapter
       --checkpoints checkpoints)
short=(num_train_epochs=5 eval_steps=20)
step unsloth_bf16 backend=unsloth load_in_4bit=false "${short[@]}" -- \
    "$python" "${train[@]}" --metrics "$out/train_unsloth_bf16.json"
if [ -d "$adapters/unsloth_bf16" ]; then
    step merge_unsloth backend=unsloth -- "$python" -m stages.merge --base "$repo/models/base" \
        --adapter "$adapters/unsloth_bf16" --out merged --metrics "$out/merge_unsloth.json"
fi
step unsloth_4bit backend=unsloth load_in_4bit=true "${short[@]}" -- \
    "$python" "${train[@]}" --metrics "$out/train_unsloth_4bit.json"
step transformers_bf16 backend=transformers load_in_4bit=false "${short[@]}" -- \
    "$python" "${train[@]}" --metrics "$out/train_transformers_bf16.json"
step transformers_4bit backend=transformers load_in_4bit=true "${short[@]}" -- \
    "$python" "${train[@]}" --metrics "$out/train_transformers_4bit.json"
if [ -d "$adapters/transformers_bf16" ]; then
    step merge_peft backend=transformers -- "$python" -m stages.merge --base "$repo/models/base" \
        --adapter "$adapters/transformers_bf16" --out merged --metrics "$out/merge_peft.json"
fi
echo "failed steps: $failed (logs and metrics in $out)"
exit "$failed"
