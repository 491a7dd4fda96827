#!/usr/bin/env bash
# One GPU session's checks, in one go: the CUDA tests of the sampler, then the sampler benchmark
# on every model with the default options and with the fast ones.
#
#   bash benchmarks/gpu_check.sh OUTDIR [SECONDS] [EXTRA OPTIONS...]
#
# Writes OUTDIR/{gpu.txt,tests.log,default.json,fast.json,bench.log}. Each step has its own
# time limit, so one that fails or hangs does not cost the others.
set -u
out=${1:-benchmarks/results}
seconds=${2:-0.3}
shift $(($# > 2 ? 2 : $#))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__)" | tee -a "$out/gpu.txt"

timeout 100 $python -m pytest -q -p no:cacheprovider tests/test_sampler_devices.py \
    tests/test_sampler_engine.py tests/test_sampler.py >"$out/tests.log" 2>&1
echo "tests: exit $? ($(tail -1 "$out/tests.log"))"

bench() {  # NAME TIMEOUT OPTIONS...
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/bench.log"
    timeout "$limit" $python benchmarks/sampler_throughput.py --device cuda --repeats 3 \
        --seconds "$seconds" --json "$out/$name.json" "$@" >>"$out/bench.log" 2>&1
    echo "   exit $?"
}
bench default 180 "$@"
bench fast 180 --channels-last --autocast bf16 --cuda-graphs --cudnn-benchmark --skip-radius "$@"
grep -E "^\| (digits|cifar|resnet)|^\(d\)|auto batch size|Error|error" "$out/bench.log"
