"""CertifiedTopKAccuracy: NumPy reference, exact DDP reduction (2 CPU processes, gloo)."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.utilities.data import dim_zero_sum

from certify import CertifiedTopKAccuracy

TOP_K, RADII = (1, 3, 5), (0.0, 0.25, 0.5, 1.0)


def random_radii(seed: int, rows: int = 301) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    radii = rng.exponential(0.5, size=(rows, len(TOP_K))).cumsum(axis=1)  # non-decreasing in k
    radii[rng.random(rows) < 0.2, 0] = np.nan  # abstentions
    radii[:3] = [[0.0, 0.25, 0.5], [np.nan, np.nan, np.nan], [0.25, 1.0, 1.0]]  # exact ties
    return torch.from_numpy(radii)


def numpy_reference(radii: np.ndarray):
    certified = np.nan_to_num(radii, nan=-1.0)
    accuracy = np.array([[np.mean(certified[:, i] >= r) for r in RADII] for i in range(len(TOP_K))])
    acr = np.nan_to_num(radii, nan=0.0).mean(axis=0)
    return accuracy, acr


def test_matches_numpy_reference_in_any_batching():
    radii = random_radii(0)
    accuracy, acr = numpy_reference(radii.numpy())
    for chunks in (1, 7, 301):
        metric = CertifiedTopKAccuracy(TOP_K, RADII)
        for part in radii.tensor_split(chunks):
            metric.update(part)
        got_accuracy, got_acr = metric.compute_table()
        np.testing.assert_array_equal(got_accuracy.numpy(), accuracy)
        np.testing.assert_allclose(got_acr.numpy(), acr, rtol=1e-9)
        result = metric.compute()
        assert result["certified_top3@0.25"] == got_accuracy[1, 1]
        assert result["acr_top5"] == got_acr[2]
        assert set(result) == {f"certified_top{k}@{r:g}" for k in TOP_K for r in RADII} | {
            f"acr_top{k}" for k in TOP_K
        }


def test_abstention_fails_at_radius_zero():
    metric = CertifiedTopKAccuracy((1,), (0.0,))
    metric.update(torch.tensor([[float("nan")], [0.0], [0.1]]))
    assert metric.compute()["certified_top1@0"].item() == pytest.approx(2 / 3)


def test_only_sum_states_and_reset():
    metric = CertifiedTopKAccuracy(TOP_K, RADII)
    assert all(fn is dim_zero_sum for fn in metric._reductions.values())
    assert metric.full_state_update is False
    metric.update(random_radii(1))
    metric.reset()
    assert metric.total == 0 and torch.isnan(metric.compute_table()[0]).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        CertifiedTopKAccuracy((0,), RADII)
    with pytest.raises(ValueError, match="radii"):
        CertifiedTopKAccuracy(TOP_K, (-0.5,))
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        CertifiedTopKAccuracy(TOP_K, RADII).update(torch.zeros(4, 2))


def test_plot(tmp_path):
    metric = CertifiedTopKAccuracy(TOP_K, RADII)
    metric.update(random_radii(2))
    fig, ax = metric.plot()
    assert len(ax.get_lines()) == len(TOP_K)
    fig.savefig(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    radii = random_radii(3)
    metric = CertifiedTopKAccuracy(TOP_K, RADII)
    for part in radii[rank::world].tensor_split(3):  # each rank its own, unevenly batched share
        metric.update(part)
    result = metric.compute()
    if rank == 0:
        queue.put({key: value.item() for key, value in result.items()})
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_two_process_ddp_is_exactly_the_single_process_result():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_ddp_worker, args=(2, free_port(), queue), nprocs=2, join=True)
    distributed = queue.get(timeout=60)
    single = CertifiedTopKAccuracy(TOP_K, RADII)
    single.update(random_radii(3))
    expected = {key: value.item() for key, value in single.compute().items()}
    assert distributed == expected  # bit-identical, ACR included
