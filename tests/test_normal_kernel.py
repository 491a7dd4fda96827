"""The compiled noise kernel: torch's CPU ``normal_`` bit for bit, or not used at all."""

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from certify import SmoothedClassifier
from certify import normal_kernel as nk

AVX2 = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() == "AVX2"
CAN_BUILD = AVX2 and shutil.which("c++") is not None
needs_kernel = pytest.mark.skipif(
    not CAN_BUILD, reason="torch's CPU kernels are not AVX2 or no c++"
)


@needs_kernel
def test_kernel_is_in_use_where_it_can_be_built():
    assert nk.kernel_status() == "compiled kernel"
    assert nk.normal_kernel() is not None


@needs_kernel
def test_kernel_writes_torch_normal_bit_for_bit():
    """About 4 million numbers: sizes of every remainder modulo 16 and across the twist's 624
    words, seeds above 2^32 (torch keeps their low 32 bits), small and large deviations."""
    fill = nk.normal_kernel()
    rng = np.random.default_rng(7)
    sizes = list(range(16, 48)) + [623, 624, 625, 1248, 1249, 8192, 6400, 100 * 75, 2**19 + 5]
    for i, size in enumerate(sizes):
        seed = int(rng.integers(0, 2**63)) if i % 3 else i
        std = float(rng.choice([1e-3, 0.12, 0.25, 0.5, 1.0, 2.0, 100.0]))
        for _ in range(1 if size > 2**16 else 4):
            expected = torch.empty(size).normal_(
                0.0, std, generator=torch.Generator().manual_seed(seed)
            )
            got = torch.full((size,), float("nan"))
            fill(got, seed, std)
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (size, seed)
            seed += 2**32 + 1


@needs_kernel
@pytest.mark.parametrize(
    "shape, channels_last", [((1, 8, 8), False), ((3, 5, 5), True), ((1, 1, 3), False)]
)
def test_sampler_counts_are_the_same_with_the_kernel_and_without(shape, channels_last, monkeypatch):
    """Chunks of 128 samples, a last chunk of any length, noise drawn in channels-last order,
    samples of 3 values (a chunk of 5 samples is 15 values: torch's own ``normal_``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), 7)).eval()
    smoothed = SmoothedClassifier(model, num_classes=7, sigma=0.5, channels_last=channels_last)
    x = torch.rand(4, *shape)
    runs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(nk.OPT_OUT, setting)
        assert (nk.normal_kernel() is None) == (setting == "0")
        runs[setting] = [
            smoothed.sample_counts(x, n, batch_size=b, seed=3, example_ids=[5, 0, 2**40, 9])
            for n in (1, 5, 300, 1000)
            for b in (7, 4096)
        ]
    for with_kernel, without in zip(runs["1"], runs["0"], strict=True):
        torch.testing.assert_close(with_kernel, without, rtol=0, atol=0)


@needs_kernel
def test_a_kernel_compiled_another_way_is_refused(tmp_path, monkeypatch):
    """Without floating-point contraction the same source rounds about 1 % of the numbers
    differently: the self-check sees it and the sampler keeps torch's normal_."""
    monkeypatch.setenv(nk.CACHE, str(tmp_path))
    fill, why = nk.build(nk.FLAGS + ("-ffp-contract=off",))
    assert fill is None
    assert why.startswith("the compiled kernel does not reproduce torch's normal_ (")
    fill, why = nk.build()
    assert fill is not None and why == "ok"
    assert len(list(tmp_path.glob("normal_kernel-*.so"))) == 2  # nothing else left behind


def test_no_compiler_means_torch_normal(tmp_path, monkeypatch):
    monkeypatch.setenv(nk.CACHE, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    fill, why = nk.build()
    assert fill is None
    if AVX2:
        assert "no-such-compiler" in why and "\n" not in why
    assert list(tmp_path.iterdir()) == []  # no partial library left


def test_a_failing_compiler_leaves_no_partial_library(tmp_path, monkeypatch):
    monkeypatch.setenv(nk.CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", shutil.which("false") or "false")
    fill, why = nk.build()
    assert fill is None
    if AVX2:
        assert why.endswith("false could not build the noise kernel: no output")
        assert list((tmp_path / "cache").iterdir()) == []


@needs_kernel
def test_an_unwritable_cache_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(nk.CACHE, str(tmp_path / "a_file" / "cache"))  # cannot be created
    kernel, why = nk.build()
    assert kernel is not None and why == "ok"
    assert list(Path(tempfile.gettempdir()).glob("topk-smoothing-*/normal_kernel-*.so"))
