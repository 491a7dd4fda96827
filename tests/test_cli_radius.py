"""`topk-smoothing radius`: the authors' count files in, exact radii out, clean errors."""

import numpy as np
import pytest

from certify.commands.cli import main
from certify.commands.countfile import parse_counts
from certify.math.validation import UsageError
from tests.messages import assert_names

ARGS = ["--sigma", "0.25", "--alpha", "0.001"]


def read_tsv(path):
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), np.array(
        [[float(v) for v in line.split("\t")] for line in lines[1:]]
    )


def test_reproduces_the_authors_radii(reference_dir, reference_radii_top3, tmp_path):
    out = tmp_path / "radii.tsv"
    assert (
        main(
            [
                "radius",
                str(reference_dir / "counts.txt"),
                *ARGS,
                "--k",
                "1",
                "3",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    header, table = read_tsv(out)
    assert header == ["idx", "label", "radius_top1", "radius_top3"]
    np.testing.assert_array_equal(table[:, 0], np.arange(500))
    ours, theirs = np.nan_to_num(table[:, 3]), reference_radii_top3
    assert np.all(np.abs(ours - theirs) <= 0.005 * np.maximum(theirs, 0.1) + 1.1e-5)
    # at least 8 significant digits are written
    first = out.read_text().splitlines()[1].split("\t")[2]
    assert len(first.replace("0.", "").lstrip("0")) >= 8


def test_stdout_and_binocp(tmp_path, capsys):
    path = tmp_path / "c.txt"
    path.write_text("90 5 5 0\n10 80 10 1\n0 50 50 0\n")
    assert main(["radius", str(path), *ARGS, "--k", "1", "--bounds", "binocp"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "idx\tlabel\tradius_top1"
    assert lines[3] == "2\t0\tnan"
    assert float(lines[1].split("\t")[2]) > 0


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("5 5 x 0\n", [], "line 1: 'x' is not a non-negative integer"),
        ("5 5 1.5 0\n", [], "'1.5' is not a non-negative integer"),
        ("5 -5 3 0\n", [], "'-5' is not a non-negative integer"),
        ("5 5 3 0\n5 5 0\n", [], "line 2: has 3 columns, expected 4"),
        ("5 5 3 3\n", [], "label 3 is outside 0..2"),
        ("0 0 0 1\n", [], "all counts are 0"),
        ("", [], "empty"),
        ("5 5 3 0\n", ["--k", "3"], "k must satisfy 1 <= k < c = 3, got k = 3"),
        ("5 5 3 0\n", ["--k", "0"], "got k = 0"),
        ("5 5 3 0\n", ["--k", "1", "1"], "the k values must be distinct, got [1, 1]"),
        ("5 5 3 0\n", ["--alpha", "1e-300"], "alpha must be at least 1e-100"),
        ("5 5 3 0\n", ["--sigma", "-1"], "sigma must be a finite number > 0, got -1.0"),
        ("5 5 3 0\n", ["--alpha", "1"], "alpha must lie strictly between 0 and 1, got 1.0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, content, args, message):
    path, out = tmp_path / "c.txt", tmp_path / "out.tsv"
    path.write_text(content)
    argv = ["radius", str(path), "--sigma", "0.5", "--alpha", "0.01", "--k", "1", *args]
    assert main([*argv, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and message in err and err.startswith("topk-smoothing radius: error:")
    )
    assert not out.exists() and list(tmp_path.iterdir()) == [path]


def test_unknown_bounds_are_named_with_the_choices(tmp_path, capsys):
    """Refused by the command-line parser (whose wording is its own): exit status 2, one line
    naming the option, the value and the choices, nothing written."""
    path, out = tmp_path / "c.txt", tmp_path / "out.tsv"
    path.write_text("5 5 3 0\n")
    argv = ["radius", str(path), "--sigma", "0.5", "--alpha", "0.01", "--k", "1"]
    assert main([*argv, "--bounds", "wald", "--output", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("topk-smoothing radius: error: ")
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert_names(captured.err, "--bounds", "wald", "simuem", "binocp")
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    ("name", "message"),
    [("nope.txt", "nope.txt: no such file"), (".", "is a directory, not a count file")],
)
def test_a_missing_file_or_a_directory_is_one_line(tmp_path, capsys, name, message):
    assert main(["radius", str(tmp_path / name), *ARGS, "--k", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().endswith(message) and captured.err.count("\n") == 1
    assert captured.out == ""


def test_parser_accepts_windows_line_ends_and_blank_lines():
    counts, labels = parse_counts("1 2 3 2\r\n\r\n\n4 5 6 0\r\n")
    assert counts.tolist() == [[1, 2, 3], [4, 5, 6]] and labels.tolist() == [2, 0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("٣ 4 1\n", "line 1: '٣' is not a non-negative integer"),
        ("1 2 99999999999999999999999 0\n", "line 1: 99999999999999999999999 is too large"),
        ("1 2 0\n\n9223372036854775807 1 0\n", "line 3: the counts sum beyond int64"),
        ("1\n", "needs at least 2 counts and a label"),
        ("🎲 1 0\n", "'🎲' is not a non-negative integer"),
    ],
)
def test_parser_rejects_oddities(text, message):
    with pytest.raises(UsageError, match=message):
        parse_counts(text, "c.txt")


def test_a_certify_tsv_is_not_a_counts_file(tmp_path, capsys):
    """`radius` on certify's radii: one line naming the file, what it is and `report`."""
    path = tmp_path / "certify.tsv"
    path.write_text("idx\tlabel\tpred1\tradius_top1\tseconds\n0\t3\t3\t0.41\t0.01\n")
    assert main(["radius", str(path), *ARGS, "--k", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("topk-smoothing radius: error: ") and captured.out == ""
    assert captured.err.count("\n") == 1
    assert f"{path}: not a counts file, it looks like a certify.tsv" in captured.err
    assert f"`topk-smoothing report {path}`" in captured.err


def test_report_says_where_it_wrote_and_what_it_replaced(tmp_path, capsys):
    path = tmp_path / "certify.tsv"
    path.write_text("idx\tlabel\tradius_top1\n0\t3\t0.41\n1\t2\tnan\n")
    files = "report.md, report.csv and certified_accuracy.png"
    for again in ("", ", replacing the earlier report"):
        assert main(["report", str(path)]) == 0
        last = capsys.readouterr().out.splitlines()[-1]
        assert last == f"report: wrote {files} to {tmp_path}{again}"
    assert main(["report", str(path), "--output-dir", str(tmp_path / "other")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"report: wrote {files} to {tmp_path}/other"
