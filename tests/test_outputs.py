"""The output directory of `certify` and `predict`: torn lines, refusal of mixed settings,
deterministic merge."""

import json
import os
import re

import numpy as np
import pytest

from certify.commands.countfile import format_counts, format_radius, read_counts
from certify.commands.outputs import RunOutput, data_identity, part_line
from certify.math.validation import UsageError

META = {"n": 100, "alpha": 0.001, "sigma": 0.25, "seed": 0}
HEADER = ["idx", "label", "pred1", "radius_top1", "seconds"]


def output(directory, meta=META) -> RunOutput:
    return RunOutput(directory, "certify.json", meta, HEADER)


def write_rows(out: RunOutput, rank: int, indices) -> None:
    fd = out.open_part(rank)
    out.append(fd, [part_line([i, i % 3, i % 3, "0.5"], 0.01, [i, 100 - i, 0]) for i in indices])
    os.close(fd)


def merge(out: RunOutput, selected) -> str | None:
    """The table and count file of the merged rows (as ``certify`` writes them)."""
    rows = out.merged(selected)
    if rows is None:
        return None
    counts = np.array([r[-1].split() for r in rows], dtype=np.int64)
    out.write("counts.txt", [format_counts(counts, np.array([int(r[1]) for r in rows]))])
    return "".join("\t".join(r[:-1]) + "\n" for r in rows)


def test_merge_is_sorted_and_independent_of_who_wrote_what(tmp_path):
    merged = []
    for split in ([range(0, 10)], [range(0, 10, 2), range(1, 10, 2)], [range(9, -1, -1)]):
        out = output(tmp_path / f"run{len(merged)}")
        out.prepare()
        for rank, indices in enumerate(split):
            write_rows(out, rank, list(indices))
        merged.append((merge(out, range(10)), (out.directory / "counts.txt").read_text()))
    assert merged[0] == merged[1] == merged[2]
    assert [int(line.split("\t")[0]) for line in merged[0][0].splitlines()] == list(range(10))
    counts, labels = read_counts(tmp_path / "run0" / "counts.txt")
    np.testing.assert_array_equal(counts[:, 0], np.arange(10))
    np.testing.assert_array_equal(labels, np.arange(10) % 3)


def test_incomplete_run_is_not_merged(tmp_path):
    out = output(tmp_path)
    out.prepare()
    write_rows(out, 0, [0, 1])
    assert out.merged(range(3)) is None


def test_torn_last_line_is_ignored_and_cut(tmp_path):
    out = output(tmp_path)
    out.prepare()
    write_rows(out, 0, [0, 1])
    with open(out.directory / "parts" / "rank0.tsv", "a") as handle:
        handle.write("2\t2\t2\t0.7")  # killed in the middle of a row
    assert sorted(out.read_parts()) == [0, 1]
    write_rows(out, 0, [2])  # the rerun cuts the torn piece before appending
    assert (out.directory / "parts" / "rank0.tsv").read_text().count("\n") == 3
    assert out.merged(range(3)) is not None


@pytest.mark.parametrize("key", ["n", "alpha", "sigma", "seed"])
def test_other_settings_are_refused(tmp_path, key):
    output(tmp_path).prepare()
    changed = dict(META, **{key: META[key] * 2 + 1})
    with pytest.raises(UsageError, match=f"{key} = "):
        output(tmp_path, changed).prepare()
    assert json.loads((tmp_path / "certify.json").read_text()) == META


def test_another_commands_directory_is_refused(tmp_path):
    output(tmp_path).prepare()
    with pytest.raises(UsageError, match=r"holds a certify run \(certify.json\); refusing"):
        RunOutput(tmp_path, "predict.json", META, HEADER).prepare()
    assert not (tmp_path / "predict.json").exists()


def test_unwritable_directory(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file"
        target.write_text("not a directory")
        with pytest.raises(UsageError, match="cannot create output directory"):
            output(target / "out").prepare()
    else:
        tmp_path.chmod(0o500)
        with pytest.raises(UsageError):
            output(tmp_path / "out").prepare()


@pytest.mark.parametrize(
    ("text", "message"),
    [("{garbage", "cannot be read (JSONDecodeError)"), ("[1, 2]", "is not the settings of")],
)
def test_a_damaged_settings_file_is_refused_in_one_line(tmp_path, text, message):
    (tmp_path / "certify.json").write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        output(tmp_path).prepare()


def test_a_foreign_row_in_a_part_file_is_refused(tmp_path):
    out = output(tmp_path)
    out.prepare()
    write_rows(out, 0, [0, 1])
    part = out.directory / "parts" / "rank0.tsv"
    with open(part, "a") as handle:  # as many fields as a row, not one of ours
        handle.write("\t".join(["x"] * (len(out.header) + 1)) + "\n")
    with pytest.raises(UsageError, match=r"rank0.tsv has a row this program did not write \(3"):
        out.read_parts()


def test_a_parts_file_in_the_way_is_named(tmp_path):
    (tmp_path / "parts").write_text("not a directory")
    with pytest.raises(UsageError, match=f"cannot create output directory {tmp_path}/parts"):
        output(tmp_path).prepare()


def test_data_identity_keeps_what_decides_the_examples():
    from datamodules.digits import DigitsDataModule

    identity = data_identity(DigitsDataModule(batch_size=7, num_workers=0, split_seed=3))
    assert identity == {"class": "datamodules.digits.DigitsDataModule", "split_seed": 3}


@pytest.mark.parametrize("target", [0.333333333333, 1 / 3, 0.12345678995, 5e-324, 1e300])
def test_radii_read_back_exactly(tmp_path, target):
    """A radius written to certify.tsv reads back as the same float, so the report counts an
    example certified at a target exactly when the computation did (a sequential run writes
    its targets as radii): 10 significant digits would put 0.333333333333 below itself."""
    from certify.commands.report import accuracy_table, read_radii_tsv

    smaller = np.nextafter(target, 0.0)
    header = ["idx", "label", "pred1", "pred2", "radius_top1", "radius_top2", "seconds"]
    out = RunOutput(tmp_path / "run", "certify.json", META, header)
    out.prepare()
    fd = out.open_part(0)
    radii = [format_radius(target), format_radius(smaller)]
    out.append(fd, [part_line([0, 0, 0, 1, *radii], 0.01, [90, 10, 0])])
    os.close(fd)
    (row,) = out.merged([0])
    out.write("certify.tsv", ["\t".join(header) + "\n", "\t".join(row[:-1]) + "\n"])
    _, read = read_radii_tsv(out.directory / "certify.tsv")
    assert read.tolist() == [[target, smaller]]
    accuracy, _ = accuracy_table(read, [1, 2], (target,))
    assert accuracy.tolist() == [[1.0], [0.0]]
