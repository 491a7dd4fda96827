"""The certify output directory: torn lines, refusal of mixed settings, deterministic merge."""

import json
import os
import re

import numpy as np
import pytest

from certify.commands.countfile import read_counts
from certify.commands.outputs import CertifyOutput, OutputError, data_identity

META = {"n": 100, "alpha": 0.001, "sigma": 0.25, "seed": 0}


def write_rows(out, rank, indices):
    fd = out.open_part(rank)
    kmax, radii = max(out.top_k), [0.5, float("nan")][: len(out.top_k)]
    rows = [out.row(i, i % 3, [i % 3, 0][:kmax], radii, 0.01, [i, 100 - i, 0]) for i in indices]
    out.append(fd, rows)
    os.close(fd)


def test_merge_is_sorted_and_independent_of_who_wrote_what(tmp_path):
    merged = []
    for split in ([range(0, 10)], [range(0, 10, 2), range(1, 10, 2)], [range(9, -1, -1)]):
        out = CertifyOutput(tmp_path / f"run{len(merged)}", META, top_k=(1, 2))
        out.prepare()
        for rank, indices in enumerate(split):
            write_rows(out, rank, list(indices))
        assert out.merge(range(10))
        files = ("certify.tsv", "counts.txt")
        merged.append(tuple((out.directory / name).read_text() for name in files))
    assert merged[0] == merged[1] == merged[2]
    header = merged[0][0].splitlines()[0].split("\t")
    assert header == ["idx", "label", "pred1", "pred2", "radius_top1", "radius_top2", "seconds"]
    counts, labels = read_counts(tmp_path / "run0" / "counts.txt")
    np.testing.assert_array_equal(counts[:, 0], np.arange(10))
    np.testing.assert_array_equal(labels, np.arange(10) % 3)


def test_incomplete_run_is_not_merged(tmp_path):
    out = CertifyOutput(tmp_path, META, top_k=(1,))
    out.prepare()
    write_rows(out, 0, [0, 1])
    assert not out.merge(range(3))
    assert not (tmp_path / "certify.tsv").exists()


def test_torn_last_line_is_ignored_and_cut(tmp_path):
    out = CertifyOutput(tmp_path, META, top_k=(1,))
    out.prepare()
    write_rows(out, 0, [0, 1])
    with open(out.part_path(0), "a") as handle:
        handle.write("2\t2\t2\t0.7")  # killed in the middle of a row
    assert sorted(out.read_parts()) == [0, 1]
    write_rows(out, 0, [2])  # the rerun cuts the torn piece before appending
    assert out.part_path(0).read_text().count("\n") == 3
    assert out.merge(range(3))


@pytest.mark.parametrize("key", ["n", "alpha", "sigma", "seed"])
def test_other_settings_are_refused(tmp_path, key):
    CertifyOutput(tmp_path, META, top_k=(1,)).prepare()
    changed = dict(META, **{key: META[key] * 2 + 1})
    with pytest.raises(OutputError, match=f"{key} = "):
        CertifyOutput(tmp_path, changed, top_k=(1,)).prepare()
    assert json.loads((tmp_path / "certify.json").read_text()) == META


def test_unwritable_directory(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file"
        target.write_text("not a directory")
        with pytest.raises(OutputError, match="cannot create output directory"):
            CertifyOutput(target / "out", META, top_k=(1,)).prepare()
    else:
        tmp_path.chmod(0o500)
        with pytest.raises(OutputError):
            CertifyOutput(tmp_path / "out", META, top_k=(1,)).prepare()


@pytest.mark.parametrize(
    ("text", "message"),
    [("{garbage", "cannot be read (JSONDecodeError)"), ("[1, 2]", "is not the settings of")],
)
def test_a_damaged_settings_file_is_refused_in_one_line(tmp_path, text, message):
    (tmp_path / "certify.json").write_text(text)
    with pytest.raises(OutputError, match=re.escape(message)):
        CertifyOutput(tmp_path, META, top_k=(1,)).prepare()


def test_a_foreign_row_in_a_part_file_is_refused(tmp_path):
    out = CertifyOutput(tmp_path, META, top_k=(1,))
    out.prepare()
    write_rows(out, 0, [0, 1])
    with open(out.part_path(0), "a") as handle:  # as many fields as a row, not one of ours
        handle.write("\t".join(["x"] * (len(out.header) + 1)) + "\n")
    with pytest.raises(OutputError, match=r"rank0.tsv has a row this program did not write \(3"):
        out.read_parts()


def test_a_parts_file_in_the_way_is_named(tmp_path):
    (tmp_path / "parts").write_text("not a directory")
    with pytest.raises(OutputError, match=f"cannot create output directory {tmp_path}/parts"):
        CertifyOutput(tmp_path, META, top_k=(1,)).prepare()


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
    out = CertifyOutput(tmp_path / "run", META, top_k=(1, 2))
    out.prepare()
    fd = out.open_part(0)
    out.append(fd, [out.row(0, 0, [0, 1], [target, smaller], 0.01, [90, 10, 0])])
    os.close(fd)
    assert out.merge([0])
    _, radii = read_radii_tsv(out.directory / "certify.tsv")
    assert radii.tolist() == [[target, smaller]]
    accuracy, _ = accuracy_table(radii, [1, 2], (target,))
    assert accuracy.tolist() == [[1.0], [0.0]]
