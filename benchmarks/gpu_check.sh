#!/usr/bin/env bash
# The GPU checks in one go: the CUDA tests of the sampler, then the sampler benchmark with the
# default options, with the fast ones, and with torch.compile (digits CNN only).
#
#   bash benchmarks/gpu_check.sh OUTDIR ["MODELS"] ["NS"]     # LIMIT=S: seconds per benchmark
#
# Writes OUTDIR/{gpu.txt,tests.log,default.*,fast.*,compile.*} (.json and .log). Each step has
# its own time limit, so one that fails or runs long does not cost the others; the benchmark
# writes its JSON after every model.
set -u
out=${1:-benchmarks/results}
models=${2:-digits_cnn cifar_resnet20 cifar_resnet110 resnet50}
ns=${3:-100 1000 10000}
limit=${LIMIT:-900}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__)" | tee -a "$out/gpu.txt"

timeout 40 $python -m pytest -q -p no:cacheprovider tests/test_sampler_devices.py \
    tests/test_sampler_engine.py >"$out/tests.log" 2>&1
echo "tests: exit $? ($(tail -1 "$out/tests.log"))"

bench() {  # NAME LIMIT OPTIONS...
    local name=$1 seconds=$2
    shift 2
    # shellcheck disable=SC2086  # the model and n lists are meant to split
    timeout "$seconds" $python benchmarks/sampler_throughput.py --device cuda --repeats 3 \
        --seconds 0.3 --skip-radius --models $models --n $ns --json "$out/$name.json" "$@" \
        >"$out/$name.log" 2>&1
    echo "== $name ($*): exit $?"
    grep -E "auto batch size|n= " "$out/$name.log" | cut -c1-200
}
bench default "$limit"
bench fast "$limit" --channels-last --autocast bf16 --cuda-graphs --cudnn-benchmark
bench compile 40 --compile --models digits_cnn --n 1000
