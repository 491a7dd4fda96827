#!/usr/bin/env bash
# The GPU check, in one go (about 6 minutes on one H200), writing one JSON of its numbers:
#   1. the CUDA tests of the sampler;
#   2. a 1-GPU DDP fit of the CIFAR-10 ResNet-110 config (bf16-mixed, live certification on)
#      on generated CIFAR-format data, 2 epochs of 10,000 training images;
#   3. benchmarks/train_throughput.py: fit against a plain loop for ResNet-110 and ResNet-50
#      (bf16-mixed; ResNet-50 also channels-last; ResNet-110 also with the progress bar
#      refreshed at every step, Lightning's default);
#   4. `topk-smoothing certify` of 20 test images at n = 100,000 with the fit's checkpoint.
#
#   bash benchmarks/gpu_check.sh OUTDIR          # DEVICE=cpu SMALL=1: a minute-long dry run
#
# Writes OUTDIR/gpu_check.json (machine, tests, fit and certify timings, the throughput table,
# the lines that carry numbers, the last lines of a failed step) and OUTDIR/logs.tar.gz (every
# step's log), rewritten after every step. Each step has its own time limit and the whole
# script a deadline (BUDGET_S, 470 s), so one that fails or runs long does not cost the others.
# The fit logs to CSV, so wandb is not needed. LightningCLI needs jsonargparse and two of its
# extras; where they are missing, put their wheels in .whl/ at the repo root (the script
# installs them into /tmp/site), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#       jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
set -u
out=${1:-benchmarks/results}
device=${DEVICE:-cuda}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."  # configs/, tests/ and benchmarks/ are relative to the repo root
deadline=$((SECONDS + ${BUDGET_S:-470}))  # the device's command limit is 600 s
if [ -d .whl ]; then  # carried wheels (jsonargparse, docstring-parser, typeshed-client)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=offline
python=${PYTHON:-python3}
work=$(mktemp -d)
logs=$work/logs  # $OUT returns 8 files at most: gpu_check.json and logs.tar.gz only
mkdir -p "$logs"
if [ -n "${SMALL:-}" ]; then  # a dry run of every step on tiny sizes, in float32
    per_batch=40 epochs=1 steps=12 warmup=4 rounds=1 n=200 models=cifar_resnet20
    cat >"$work/small.yaml" <<'YAML'
trainer:
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {filename: last}
    - class_path: certify.CertificationCallback
      init_args: {n: 50, num_examples: 4}
YAML
    precision=32-true small=(--model.arch cifar_resnet20 --data.batch_size 8
        --trainer.precision 32-true) bench=(--batch-size 8) trainer=(--config "$work/small.yaml"
        --trainer.limit_train_batches 3 --trainer.limit_val_batches 1)
else
    per_batch=2000 epochs=2 steps=100 warmup=20 rounds=2 n=100000 models="cifar_resnet110 resnet50"
    precision=bf16-mixed small=() bench=() trainer=()
fi
accelerator=$([ "$device" = cuda ] && echo gpu || echo cpu)

step() {  # NAME SECONDS COMMAND...: run with a limit, log to $logs/NAME.log, time it
    local name=$1 seconds=$2 start=$SECONDS status
    shift 2
    local left=$((deadline - SECONDS))
    [ "$left" -lt "$seconds" ] && seconds=$left
    if [ "$seconds" -lt 10 ]; then
        status=125; echo "skipped: the script's deadline" >"$logs/$name.log"
    else
        timeout -k 10 "$seconds" "$@" >"$logs/$name.log" 2>&1
        status=$?
    fi
    echo "{\"exit\": $status, \"seconds\": $((SECONDS - start))}" >"$logs/$name.status.json"
    echo "== $name: exit $status in $((SECONDS - start)) s"
    assemble
}
assemble() {  # (re)write OUTDIR/gpu_check.json and OUTDIR/logs.tar.gz from what exists so far
    $python - "$logs" "$out" <<'EOF'
import json, sys
from pathlib import Path

logs, out = Path(sys.argv[1]), Path(sys.argv[2])
result = {}
for path in sorted(logs.glob("*.json")):
    result[path.stem] = json.loads(path.read_text())
for name in ("gpu.txt", "certify_report.md"):
    if (logs / name).is_file():
        result[name] = (logs / name).read_text()
for path in sorted(logs.glob("*.log")):
    lines = path.read_text(errors="replace").splitlines()
    keep = [line for line in lines
            if "Certification took" in line or line.startswith(("certify:", "model "))
            or " passed" in line or " failed" in line or line.startswith(("SKIPPED", "FAILED"))]
    if result.get(f"{path.stem}.status", {}).get("exit", 0) != 0:
        keep += ["--- last lines ---", *lines[-40:]]
    result[f"{path.stem}_lines"] = keep
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
EOF
    tar czf "$out/logs.tar.gz" -C "$logs" .
}

if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$logs/gpu.txt"; df -h /dev/shm >>"$logs/gpu.txt" 2>&1
    step tests 90 $python -m pytest -q -p no:cacheprovider tests/test_sampler_devices.py \
        tests/test_sampler_engine.py
fi

$python -c "from benchmarks.synthetic_data import write_cifar10; from pathlib import Path
write_cifar10(Path('$work/cifar10'), train_per_batch=$per_batch, test_size=100)"
common=(--config configs/cifar10_resnet110.yaml --data.data_dir "$work/cifar10"
        --data.verify_md5 false --data.val_size $((per_batch)) --data.num_workers 4 "${small[@]}")
step fit 300 $python -m certify fit "${common[@]}" --config configs/ddp.yaml \
    --trainer.accelerator "$accelerator" --trainer.devices 1 --trainer.max_epochs "$epochs" \
    --trainer.default_root_dir "$work/runs" \
    --trainer.logger '{"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "'"$work/runs"'"}}' \
    --trainer.enable_progress_bar false "${trainer[@]}"
checkpoint=$(find "$work/runs" -name last.ckpt | head -1)

# shellcheck disable=SC2086  # the model list is meant to split
step train_throughput 300 $python benchmarks/train_throughput.py --device "$device" \
    --models $models --precision "$precision" --steps "$steps" --warmup "$warmup" \
    --rounds "$rounds" --workers 4 --json "$logs/train_throughput.json" "${bench[@]}"
step train_channels_last 120 $python benchmarks/train_throughput.py --device "$device" \
    --models "${models##* }" --precision "$precision" --channels-last --steps "$steps" \
    --warmup "$warmup" --rounds "$rounds" --workers 4 --json "$logs/train_channels_last.json" "${bench[@]}"

step train_refresh_every_step 120 $python benchmarks/train_throughput.py --device "$device" \
    --models "${models%% *}" --precision "$precision" --refresh-rate 1 --steps "$steps" \
    --warmup "$warmup" --rounds "$rounds" --workers 4 --json "$logs/train_refresh_every_step.json" "${bench[@]}"

step certify 180 $python -m certify certify "${common[@]}" --ckpt_path "$checkpoint" \
    --trainer.accelerator "$accelerator" --trainer.devices 1 --trainer.logger false \
    --n "$n" --max_examples 20 --channels_last true \
    $([ -z "${SMALL:-}" ] && echo --autocast bf16) \
    --output_dir "$work/certify"
cp "$work/certify/report.md" "$logs/certify_report.md" 2>/dev/null; assemble

echo "wrote $out/gpu_check.json and $out/logs.tar.gz"
rm -rf "$work"
