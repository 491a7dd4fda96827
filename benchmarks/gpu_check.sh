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
# Writes OUTDIR/gpu_check.json (machine, tests, fit and certify timings, the throughput table)
# and a log per step. Each step has its own time limit, so one that fails or runs long does
# not cost the others. Packages missing on the GPU machine (jsonargparse, wandb) travel as
# wheels: see the device notes of the README's Performance section.
set -u
out=${1:-benchmarks/results}
device=${DEVICE:-cuda}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=offline
python=${PYTHON:-python3}
work=$(mktemp -d)
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

step() {  # NAME SECONDS COMMAND...: run with a limit, log to OUTDIR/NAME.log, time it
    local name=$1 seconds=$2 start=$SECONDS
    shift 2
    timeout "$seconds" "$@" >"$out/$name.log" 2>&1
    local status=$?
    echo "{\"exit\": $status, \"seconds\": $((SECONDS - start))}" >"$out/$name.status.json"
    echo "== $name: exit $status in $((SECONDS - start)) s"
}

if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt"
    step tests 90 $python -m pytest -q -p no:cacheprovider tests/test_sampler_devices.py \
        tests/test_sampler_engine.py
fi

$python -c "from benchmarks.synthetic_data import write_cifar10; from pathlib import Path
write_cifar10(Path('$work/cifar10'), train_per_batch=$per_batch, test_size=100)"
common=(--config configs/cifar10_resnet110.yaml --data.data_dir "$work/cifar10"
        --data.verify_md5 false --data.val_size $((per_batch)) --data.num_workers 4 "${small[@]}")
step fit 300 $python -m certify fit "${common[@]}" --config configs/ddp.yaml \
    --trainer.accelerator "$accelerator" --trainer.devices 1 --trainer.max_epochs "$epochs" \
    --trainer.default_root_dir "$work/runs" --trainer.logger.init_args.save_dir "$work/runs" \
    --trainer.enable_progress_bar false "${trainer[@]}"
checkpoint=$(find "$work/runs" -name last.ckpt | head -1)

# shellcheck disable=SC2086  # the model list is meant to split
step train_throughput 300 $python benchmarks/train_throughput.py --device "$device" \
    --models $models --precision "$precision" --steps "$steps" --warmup "$warmup" \
    --rounds "$rounds" --workers 4 --json "$out/train_throughput.json" "${bench[@]}"
step train_channels_last 120 $python benchmarks/train_throughput.py --device "$device" \
    --models "${models##* }" --precision "$precision" --channels-last --steps "$steps" \
    --warmup "$warmup" --rounds "$rounds" --json "$out/train_channels_last.json" "${bench[@]}"

step train_refresh_every_step 120 $python benchmarks/train_throughput.py --device "$device" \
    --models "${models%% *}" --precision "$precision" --refresh-rate 1 --steps "$steps" \
    --warmup "$warmup" --rounds "$rounds" --json "$out/train_refresh_every_step.json" "${bench[@]}"

step certify 180 $python -m certify certify "${common[@]}" --ckpt_path "$checkpoint" \
    --trainer.accelerator "$accelerator" --trainer.devices 1 --trainer.logger false \
    --n "$n" --max_examples 20 --channels_last true \
    $([ -z "${SMALL:-}" ] && echo --autocast bf16) \
    --output_dir "$work/certify"
cp "$work/certify/report.md" "$out/certify_report.md" 2>/dev/null

$python - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
result = {}
for path in sorted(out.glob("*.json")):
    if path.name != "gpu_check.json":
        result[path.stem] = json.loads(path.read_text())
for name in ("gpu.txt", "certify_report.md"):
    if (out / name).is_file():
        result[name] = (out / name).read_text()
for log in ("fit", "certify"):  # the lines that carry numbers
    lines = (out / f"{log}.log").read_text(errors="replace").splitlines()
    result[f"{log}_lines"] = [
        line for line in lines if "Certification took" in line or line.startswith("certify:")
    ]
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
EOF
rm -rf "$work"
