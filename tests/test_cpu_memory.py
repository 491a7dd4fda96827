"""CPU sampling does not page-fault on every batch (``certify.cpu_memory``)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from certify import cpu_memory

PROBE = """
import json, resource, torch
from certify import SmoothedClassifier
from certify.cpu_memory import keep_freed_memory
from lightning_modules.models import build_network

torch.manual_seed(0)
model = build_network("digits_cnn", 10, (0.3,), (0.4,)).eval()
smoothed = SmoothedClassifier(model, 10, 0.25)
x = torch.rand(4, 1, 8, 8)
smoothed.sample_counts(x, 4096, batch_size=4096, seed=0)  # warm-up: the heap grows once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
smoothed.sample_counts(x, 4 * 4096, batch_size=4096, seed=1)  # 16 batches of 4,096
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 16
print(json.dumps({"faults_per_batch": faults, "kept": keep_freed_memory()}))
"""

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)


def probe(**env) -> dict:
    environment = {**os.environ, **env}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


@glibc
def test_sampling_on_a_cpu_does_not_page_fault_per_batch():
    kept = probe()
    assert kept["kept"] is True
    # A batch of 4,096 digits allocates about 40 MB of activations; with glibc's defaults
    # that was 12,600 page faults per batch here (half the throughput).
    assert kept["faults_per_batch"] < 1000, kept
    default = probe(**{cpu_memory.OPT_OUT: "0"})
    assert default["kept"] is False
    assert default["faults_per_batch"] > 5 * kept["faults_per_batch"], (default, kept)


def test_user_settings_and_the_opt_out_are_respected(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.setenv(cpu_memory.OPT_OUT, "0")
    assert cpu_memory.keep_freed_memory() is False
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.delenv(cpu_memory.OPT_OUT)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert cpu_memory.keep_freed_memory() is False
    monkeypatch.setattr(cpu_memory, "_applied", None)  # the next caller applies it again
