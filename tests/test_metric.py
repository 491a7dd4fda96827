"""CertifiedTopKAccuracy: NumPy reference, exact DDP reduction (2 CPU processes, gloo), and
exact means over float64's whole range (hypothesis: 0, subnormals, 1e300, inf)."""

import math
import os
import socket
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_sum

from certify import CertifiedTopKAccuracy
from certify.math.validation import UsageError
from certify.training.metric import markdown_table

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


def test_sum_states_a_gathered_radius_list_and_reset():
    metric = CertifiedTopKAccuracy(TOP_K, RADII)
    reductions = metric._reductions
    assert reductions.pop("radius_list") is dim_zero_cat
    assert all(fn is dim_zero_sum for fn in reductions.values())
    assert metric.full_state_update is False
    metric.update(random_radii(1))
    metric.reset()
    assert metric.total == 0 and metric.radius_list == []
    accuracy, acr = metric.compute_table()
    assert torch.isnan(accuracy).all() and torch.isnan(acr).all()


def test_markdown_table():
    text = markdown_table((1, 3), (0.0, 0.5), [[0.9, 0.5], [1.0, 0.75]], [0.42, 1.5], "n = 9")
    assert text.splitlines() == [
        "Certified top-k accuracy (n = 9)",
        "",
        "| k | r = 0 | r = 0.5 | ACR |",
        "|---|---|---|---|",
        "| top-1 | 90.0% | 50.0% | 0.420 |",
        "| top-3 | 100.0% | 75.0% | 1.500 |",
    ]


def test_bad_arguments():
    with pytest.raises(UsageError, match="top_k"):
        CertifiedTopKAccuracy((0,), RADII)
    with pytest.raises(UsageError, match="radii"):
        CertifiedTopKAccuracy(TOP_K, (-0.5,))
    with pytest.raises(UsageError, match=r"shape \(B, 3\)"):
        CertifiedTopKAccuracy(TOP_K, RADII).update(torch.zeros(4, 2))


def test_plot(tmp_path):
    metric = CertifiedTopKAccuracy(TOP_K, RADII)
    metric.update(random_radii(2))
    fig, ax = metric.plot()
    assert len(ax.get_lines()) == len(TOP_K)
    fig.savefig(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def extreme_radii(rows: int = 64) -> torch.Tensor:
    """Radii over float64's whole range: 0, subnormals, 1e-300, ordinary, 1e300, the largest
    float, inf and NaN, in a fixed shuffled order."""
    values = [0.0, 5e-324, 2.2250738585072014e-308, 1e-300, 0.37, 2.5, 1e300]
    values += [1.7976931348623157e308, math.inf, math.nan]
    rng = np.random.default_rng(5)
    return torch.tensor(rng.choice(values, size=(rows, len(TOP_K))), dtype=torch.float64)


RADII_SETS = {
    "random": lambda: random_radii(3),
    "extreme": extreme_radii,
    "rank 1 without examples": lambda: random_radii(4)[:40],
}


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for which, make in RADII_SETS.items():
        metric = CertifiedTopKAccuracy(TOP_K, RADII)
        radii = make()
        share = radii[: len(radii) * (1 - rank)] if "without" in which else radii[rank::world]
        for part in share.tensor_split(3) if len(share) else []:  # uneven batches, or none
            metric.update(part)
        results[which] = {key: value.item() for key, value in metric.compute().items()}
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_two_process_ddp_is_exactly_the_single_process_result():
    """Ordinary radii, float64's extremes, and a process that saw no example: 2 processes
    give the single process's numbers bit for bit."""
    queue = mp.get_context("fork").Queue()  # fork: the workers skip importing torch again
    workers = mp.start_processes(
        _ddp_worker, (2, free_port(), queue), nprocs=2, join=False, start_method="fork"
    )
    results = queue.get(timeout=120)
    while not workers.join(timeout=120):  # True once both exited (raises if one failed)
        pass
    for which, make in RADII_SETS.items():
        single = CertifiedTopKAccuracy(TOP_K, RADII)
        single.update(make())
        expected = {key: value.item() for key, value in single.compute().items()}
        distributed = results[which]
        assert distributed.keys() == expected.keys()
        for key, value in expected.items():  # bit-identical, ACR included (NaN == NaN here)
            same = math.isnan(value) if math.isnan(distributed[key]) else distributed[key] == value
            assert same, (which, key)
    extreme = CertifiedTopKAccuracy(TOP_K, RADII)
    extreme.update(extreme_radii())  # rows hold inf for every k
    assert all(math.isinf(v) for v in extreme.compute_table()[1].tolist())


# ------------------------------------------------------------------ exact means, any range
SPECIAL = [0.0, -0.0, 5e-324, 1e-320, 2.2250738585072014e-308, 1e-300, 1e300]
SPECIAL += [1.7976931348623157e308, math.inf, math.nan]
RADIUS = st.one_of(
    st.sampled_from(SPECIAL),
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),  # subnormals included
    st.floats(min_value=0.0, max_value=10.0),
)


def exact_reference(radii: list[list[float]], thresholds: tuple[float, ...]):
    """Accuracy (fractions, as the metric rounds them) and the ACR as one rounding of the exact
    rational mean (abstentions 0; inf if some radius is inf), per column."""
    count = len(radii)
    columns = list(zip(*radii, strict=True))
    accuracy = [[sum(r >= t for r in col) / count for t in thresholds] for col in columns]
    acr = []
    for col in columns:
        if any(math.isinf(r) for r in col):
            acr.append(math.inf)
        else:
            acr.append(
                float(sum((Fraction(r) for r in col if not math.isnan(r)), Fraction(0)) / count)
            )
    return accuracy, acr


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    radii=st.lists(st.lists(RADIUS, min_size=2, max_size=2), min_size=1, max_size=40),
    data=st.data(),
)
def test_exact_for_every_float64_radius_in_any_order_and_split(radii, data):
    """The ACR is the exact mean rounded once, accuracy the exact fractions, inf counted at
    every radius and making the ACR infinite; the same bits in any order of the radii, any
    split into batches and any split into metrics merged as DDP merges them."""
    thresholds = (0.0, 1e-300, 0.5, 1e300)
    accuracy, acr = exact_reference(radii, thresholds)
    order = data.draw(st.permutations(range(len(radii))))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(radii)), max_size=4)))
    tensor = torch.tensor([radii[i] for i in order], dtype=torch.float64)  # (B, 2)
    parts = [tensor[a:b] for a, b in zip([0, *cuts], [*cuts, len(radii)], strict=True)]
    merged = CertifiedTopKAccuracy((1, 3), thresholds)
    for part in parts:  # each part on its own "process", merged like a DDP sum reduction
        shard = CertifiedTopKAccuracy((1, 3), thresholds)
        if len(part):
            shard.update(part)
        merged.merge_state(shard)
    single = CertifiedTopKAccuracy((1, 3), thresholds)
    single.update(torch.tensor(radii, dtype=torch.float64))
    for metric in (single, merged):
        got_accuracy, got_acr = metric.compute_table()
        assert got_accuracy.tolist() == accuracy
        assert got_acr.tolist() == acr  # exact: one rounding of the exact mean


def test_two_infinite_radii_do_not_overflow():
    metric = CertifiedTopKAccuracy((1,), (0.0, 1e308))
    metric.update(torch.tensor([[math.inf], [math.inf], [0.5], [math.nan]]))
    accuracy, acr = metric.compute_table()
    assert accuracy.tolist() == [[0.75, 0.5]] and acr.tolist() == [math.inf]
    finite = CertifiedTopKAccuracy((1,), (0.0,))
    finite.update(torch.full((1000, 1), 1.7976931348623157e308, dtype=torch.float64))
    assert finite.compute_table()[1].item() == 1.7976931348623157e308  # no overflow either


def test_negative_radii_are_refused():
    with pytest.raises(UsageError, match=r"radii must be >= 0 \(NaN for an abstention\), got -0.5"):
        CertifiedTopKAccuracy((1,), (0.0,)).update(torch.tensor([[0.5], [-0.5]]))


def test_report_and_radius_files_carry_infinite_and_huge_radii(tmp_path):
    """A radii TSV with inf and 1e300 (as `radius_from_bounds` can give) goes through the
    report: certified at every radius, ACR inf or exact, and the written radii read back."""
    from certify.commands.cli import format_radius
    from certify.commands.report import write_report

    rows = [[math.inf, math.inf], [0.5, math.inf], [math.nan, 1e300]]
    text = "idx\tradius_top1\tradius_top3\n" + "".join(
        f"{i}\t" + "\t".join(map(format_radius, row)) + "\n" for i, row in enumerate(rows)
    )
    assert "inf\tinf" in text and "1e+300" in text
    (tmp_path / "radii.tsv").write_text(text)
    result = write_report(tmp_path / "radii.tsv", at=(0.0, 1.0))
    assert result["accuracy"].tolist() == [[2 / 3, 1 / 3], [1.0, 1.0]]
    assert result["acr"].tolist() == [math.inf, math.inf]
    csv = (tmp_path / "report.csv").read_text().splitlines()
    assert csv[1].endswith(",inf") and csv[2].endswith(",inf")
    assert "| top-1 | 66.7% | 33.3% | inf |" in (tmp_path / "report.md").read_text()


def test_certify_logs_its_scalars_and_table_on_one_wandb_row(isolated_run):
    """``certify``'s numbers reach W&B as the callback's do: scalars, table (k, accuracy per
    radius, ACR) and plot in one row with ``trainer/global_step``; dotted keys defined
    against it, escaped."""
    import json

    import wandb
    from pytorch_lightning.loggers import WandbLogger

    from certify.commands.report import log_to_wandb, write_report
    from tests.wandb_records import history, metrics

    tsv = isolated_run / "certify.tsv"
    tsv.write_text("idx\tlabel\tradius_top1\tradius_top3\n0\t3\t0.3\t0.6\n1\t2\tnan\t0.2\n")
    log_to_wandb([WandbLogger(save_dir=str(isolated_run), offline=True)],
                 write_report(tsv, at=(0.0, 0.25, 0.5)))  # fmt: skip
    wandb.finish()
    wandb.teardown()  # the run file is complete once W&B's service has stopped
    (run_file,) = isolated_run.glob("wandb/offline-run-*/run-*.wandb")
    (row,) = [row for row in history(run_file) if "certify/table/path" in row]
    assert row["trainer/global_step"] == 0 and "certify/curve/path" in row
    expected = [[1, 0.5, 0.5, 0.0, 0.15], [3, 1.0, 0.5, 0.5, 0.4]]
    for k, *accuracy, acr in expected:
        assert [row[f"certify/certified_top{k}@{r:g}"] for r in (0, 0.25, 0.5)] == accuracy
        assert row[f"certify/acr_top{k}"] == pytest.approx(acr)
    table = json.loads((run_file.parent / "files" / row["certify/table/path"]).read_text())
    assert table["columns"] == ["k", "r=0", "r=0.25", "r=0.5", "acr"]
    assert sum(table["data"], []) == pytest.approx(sum(expected, []))
    assert metrics(run_file)["certify/certified_top1@0\\.25"] == "trainer/global_step"
