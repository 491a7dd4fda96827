"""Hostile input: the count-file parser, the ``radius`` command and ``SmoothedClassifier``.

The parser and the command are fuzzed with hypothesis (random bytes and text, huge numbers,
unicode digits and spaces, blank lines, Windows and old-Mac line ends). Whatever comes in, the
parser either returns a well-formed table or raises ``UsageError`` (a ``ValueError``) with a
one-line message, and ``main`` never raises, returns 0 exactly when the file and every
argument are valid and 2 otherwise, writes one line to stderr on failure and leaves no output
(or temporary) file behind. The runs are derandomised, so the
suite is reproducible; raise ``max_examples`` locally for a deeper search.

``SmoothedClassifier`` must reject wrong shapes, non-float dtypes, NaN/inf inputs and labels
out of range with a ``ValueError`` naming the problem, before the model runs
(tests/test_sampler.py covers the basic cases; these extend them).
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from certify import SmoothedClassifier, certified_radius
from certify.commands.cli import main
from certify.commands.countfile import format_counts, parse_counts, read_counts
from certify.math.validation import UsageError

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------------------- strategies
SPACES = st.sampled_from([" ", "  ", "\t", " \t ", "\u00a0", "\u3000", "\u2003"])
LINE_ENDS = st.sampled_from(
    ["\n", "\r\n", "\r", "\n\n", "\r\n\r\n", "\n \n", "\x85", "\u2028", "\x0b", "\x0c"]
)
ODD_TOKENS = st.sampled_from(
    [
        "x", "1.5", "-0", "-3", "+1", "1e3", "0x10", "nan", "inf", "\u0663", "\uff11", "1_000",
        "\ufeff1", "9" * 5000, "0" * 5000 + "7", "1" + "0" * 19, str(2**63), str(2**63 - 1),
        "١٢", "\x00", "7\x00", "\udcff", "🎲",
    ]
)  # fmt: skip
NUMBERS = st.one_of(
    st.integers(0, 12),
    st.integers(0, 10**6),
    st.integers(0, 2**63 - 1),
    st.integers(2**63, 10**40),
).map(str)


@st.composite
def count_files(draw, valid: bool):
    """Count-file text: rows of c counts and a label, random separators, blank lines and line
    ends. With ``valid``, every row is correct and the intended table is returned with it;
    otherwise rows are ragged and tokens may be odd, huge or not numbers at all."""
    c = draw(st.integers(2, 6))
    rows = []
    for _ in range(draw(st.integers(0 if not valid else 1, 5))):
        if valid:
            counts = draw(st.lists(st.integers(0, 10**6), min_size=c, max_size=c))
            counts[draw(st.integers(0, c - 1))] += 1  # a positive row sum
            tokens = [*map(str, counts), str(draw(st.integers(0, c - 1)))]
        else:
            width = draw(st.sampled_from([c + 1, c + 1, c + 1, 1, 2, c + 2]))
            tokens = draw(st.lists(st.one_of(NUMBERS, ODD_TOKENS), min_size=width, max_size=width))
        rows.append(tokens)
    text = draw(st.sampled_from(["", "\n", "\r\n", " "]))
    for tokens in rows:
        text += draw(SPACES) if draw(st.booleans()) else ""
        for j, token in enumerate(tokens):
            text += (draw(SPACES) if j else "") + token
        text += draw(LINE_ENDS)
    if not valid or not draw(st.booleans()):
        return text, rows
    return text.rstrip("\n\r"), rows  # no line end after the last row


def encode(text: str) -> bytes:
    """UTF-8, lone surrogates kept as (invalid) bytes: the reader must refuse them cleanly."""
    return text.encode("utf-8", "surrogatepass")


def check_outcome(call):
    """Run a parser call: a well-formed table, or a UsageError with a one-line message."""
    try:
        counts, labels = call()
    except UsageError as err:
        message = str(err)
        assert message and len(message.splitlines()) == 1, repr(message)
        return None
    assert counts.dtype == np.int64 and labels.dtype == np.int64
    assert counts.ndim == 2 and counts.shape[1] >= 2 and labels.shape == (counts.shape[0],)
    assert (counts >= 0).all() and (counts.sum(axis=1) > 0).all()
    assert ((labels >= 0) & (labels < counts.shape[1])).all()
    return counts, labels


# ---------------------------------------------------------------------------- the parser
@FUZZ
@given(st.text())
def test_parse_counts_any_text(text):
    """Arbitrary unicode text: a table or a one-line UsageError, nothing else."""
    check_outcome(lambda: parse_counts(text))


@FUZZ
@given(count_files(valid=False))
def test_parse_counts_mutated_files(case):
    """Count-file-like text with odd tokens (unicode digits, signs, floats, NUL, a BOM,
    5000-digit numbers, values just above int64): a table or a one-line UsageError."""
    check_outcome(lambda: parse_counts(case[0]))


@FUZZ
@given(count_files(valid=True))
def test_parse_counts_valid_files_with_any_layout(case):
    """Every correct file parses to exactly its table, whatever its whitespace, blank lines and
    line ends (\\n, \\r\\n, \\r, NEL, LINE SEPARATOR, VT, FF, none after the last row)."""
    text, rows = case
    result = check_outcome(lambda: parse_counts(text))
    assert result is not None, text
    table = np.array([[int(t) for t in row] for row in rows])
    np.testing.assert_array_equal(result[0], table[:, :-1])
    np.testing.assert_array_equal(result[1], table[:, -1])
    again = parse_counts(format_counts(*result))  # and the writer's format round-trips
    np.testing.assert_array_equal(again[0], result[0])


@FUZZ
@given(st.one_of(st.binary(max_size=300), count_files(valid=False).map(lambda c: encode(c[0]))))
def test_read_counts_any_bytes(data):
    """Arbitrary bytes on disk (invalid UTF-8 included): a table or a one-line UsageError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "counts.txt"
        path.write_bytes(data)
        check_outcome(lambda: read_counts(path))


def test_huge_tokens_are_count_file_errors():
    """Regression: a token of more than 4300 digits used to escape as a plain ValueError from
    int() (Python's digit limit) instead of a UsageError naming the line."""
    with pytest.raises(UsageError, match="line 2: 9999.* is too large"):
        parse_counts("1 2 0\n1 " + "9" * 5000 + " 0\n")
    counts, labels = parse_counts("1 " + "0" * 5000 + "7 1\n")  # leading zeros are harmless
    assert counts.tolist() == [[1, 7]] and labels.tolist() == [1]


# ---------------------------------------------------------------------------- the command
FLOATS = st.sampled_from(
    ["0.25", "0.001", "0", "-1", "nan", "inf", "-inf", "1e-320", "5e-324", "1e300", "abc", ""]
)
KS = st.lists(
    st.sampled_from(["1", "2", "3", "0", "-1", "9999999999999999999999", "1.5", "x"]),
    min_size=1,
    max_size=3,
)


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def radius_should_succeed(counts_path, sigma, alpha, ks, bounds, output) -> bool:
    """Whether ``radius`` must succeed, from its documented rules alone: the file parses
    (``read_counts``, fuzzed above), sigma is a finite number > 0, alpha lies in [1e-100, 1),
    the k are distinct integers with 1 <= k < c, the bounds are known and the output is a
    file in an existing directory (or stdout)."""
    try:
        counts, _ = read_counts(counts_path)
    except (UsageError, OSError):
        return False
    s, a, k = number(sigma), number(alpha), [integer(t) for t in ks]
    return (
        s is not None
        and math.isfinite(s)
        and s > 0
        and a is not None
        and 1e-100 <= a < 1
        and all(v is not None and 1 <= v < counts.shape[1] for v in k)
        and len(set(k)) == len(k)
        and bounds in ("simuem", "binocp")
        and output in (None, "out.tsv")
    )


def test_radius_command_never_crashes():
    """``main(["radius", ...])`` on any file and arguments: never raises, returns 0 exactly when
    the file and every argument are valid (``radius_should_succeed``) and 2 otherwise; on 2,
    stderr is one line "topk-smoothing radius: error: ..." and no output file or temporary file
    is left; on 0, the TSV has a header and one row per count row. Half the examples use valid
    arguments, so that both outcomes come up often (checked at the end)."""
    outcomes = []

    @FUZZ
    @given(
        content=st.one_of(
            count_files(valid=True).map(lambda c: encode(c[0])),
            count_files(valid=False).map(lambda c: encode(c[0])),
            st.binary(max_size=200),
        ),
        args=st.one_of(
            st.tuples(  # valid arguments: the outcome depends on the file alone
                st.sampled_from(["0.25", "1e-3", "10"]),
                st.sampled_from(["0.001", "0.2"]),
                st.just(["1"]),
                st.sampled_from(["simuem", "binocp"]),
                st.sampled_from(["out.tsv", None]),
                st.just(False),
            ),
            st.tuples(
                FLOATS,
                FLOATS,
                KS,
                st.sampled_from(["simuem", "binocp", "wald"]),
                st.sampled_from(["out.tsv", "missing/out.tsv", "existing_dir", None]),
                st.booleans(),
            ),
        ),
    )
    def run(content, args):
        sigma, alpha, ks, bounds, output, missing_input = args
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            counts_path = tmp / "counts.txt"
            if not missing_input:
                counts_path.write_bytes(content)
            (tmp / "existing_dir").mkdir()
            before = set(tmp.rglob("*"))
            valid = radius_should_succeed(counts_path, sigma, alpha, ks, bounds, output)
            argv = ["radius", str(counts_path), "--sigma", sigma, "--alpha", alpha, "--k", *ks]
            argv += ["--bounds", bounds]
            if output is not None:
                argv += ["--output", str(tmp / output)]
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                status = main(argv)
            assert status == (0 if valid else 2), (argv, stderr.getvalue())
            if status == 2:
                err = stderr.getvalue()
                assert err.startswith("topk-smoothing radius: error: "), err
                assert err.count("\n") == 1, err
                assert set(tmp.rglob("*")) == before  # no output, no temporary file
                assert stdout.getvalue() == ""
            else:
                written = (tmp / output).read_text() if output is not None else stdout.getvalue()
                lines = written.splitlines()
                assert lines[0].startswith("idx\tlabel\tradius_top")
                assert len(lines) - 1 == len(parse_counts(content.decode())[1])
                assert stderr.getvalue() == ""
        outcomes.append(status)

    run()
    print(f"[hostile] radius command: {outcomes.count(0)} exit 0, {outcomes.count(2)} exit 2")
    assert outcomes.count(0) >= 10 and outcomes.count(2) >= 10


@FUZZ
@given(
    case=count_files(valid=True),
    sigma=st.floats(1e-3, 10.0),
    alpha=st.floats(1e-9, 0.5),
    bounds=st.sampled_from(["simuem", "binocp"]),
)
def test_radius_command_on_valid_files_matches_the_api(case, sigma, alpha, bounds):
    """Any correct count file with valid arguments: exit 0 and, per row, exactly the radii of
    ``certified_radius``, read back as the same floats (``nan`` for an abstention)."""
    text, rows = case
    c = len(rows[0]) - 1
    ks = sorted({1, c - 1})
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "counts.txt", Path(tmp) / "radii.tsv"
        path.write_bytes(encode(text))
        argv = ["radius", str(path), "--sigma", repr(sigma), "--alpha", repr(alpha)]
        argv += ["--k", *map(str, ks), "--bounds", bounds, "--output", str(out)]
        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            assert main(argv) == 0, stderr.getvalue()
        table = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    counts, labels = parse_counts(text)
    expected = certified_radius(counts, labels, ks, sigma, alpha, bounds).numpy()
    assert len(table) == len(rows)
    for i, (fields, radii) in enumerate(zip(table, expected, strict=True)):
        assert fields[:2] == [str(i), str(labels[i])]
        got = np.array([float(v) for v in fields[2:]])
        np.testing.assert_array_equal(got, radii)  # NaN where both abstain


# ---------------------------------------------------------------------------- SmoothedClassifier
class CountingModel(nn.Module):
    """A linear model that counts its forward passes (a rejected call must make none)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.body(x)


def x_with(value, position=(3, 0, 2, 1), shape=(8, 1, 4, 4), dtype=torch.float32):
    x = torch.rand(shape).to(dtype)
    x[position] = value
    return x


GOOD_X = torch.rand(2, 1, 4, 4)
REJECTED = [
    # (description, call, message pattern)
    ("numpy input", lambda s: s.sample_counts(GOOD_X.numpy(), n=4), "torch.Tensor"),
    ("list input", lambda s: s.sample_counts(GOOD_X.tolist(), n=4), "torch.Tensor"),
    ("0-d input", lambda s: s.sample_counts(torch.tensor(0.5), n=4), "shape"),
    ("uint8 image", lambda s: s.sample_counts((GOOD_X * 255).byte(), n=4), "floating-point"),
    ("int32", lambda s: s.sample_counts(GOOD_X.int(), n=4), "floating-point"),
    ("bool", lambda s: s.sample_counts(GOOD_X > 0.5, n=4), "floating-point"),
    ("complex", lambda s: s.sample_counts(GOOD_X.to(torch.complex64), n=4), "floating-point"),
    ("one NaN in a batch", lambda s: s.sample_counts(x_with(float("nan")), n=4), "NaN"),
    ("-inf", lambda s: s.sample_counts(x_with(-float("inf")), n=4), "infinite"),
    (
        "NaN in float64",
        lambda s: s.sample_counts(x_with(float("nan"), dtype=torch.float64), n=4),
        "NaN",
    ),
    (
        "inf in bfloat16",
        lambda s: s.sample_counts(x_with(float("inf"), dtype=torch.bfloat16), n=4),
        "infinite",
    ),
    ("inf in float16", lambda s: s.sample_counts(x_with(70000.0, dtype=torch.float16), n=4), "inf"),
    ("NaN in predict", lambda s: s.predict(x_with(float("nan")), 1, 10, 0.1), "NaN"),
    (
        "NaN in certify",
        lambda s: s.certify(x_with(float("nan")), torch.zeros(8, dtype=torch.long), 1, 10, 0.1),
        "NaN",
    ),
    ("n negative", lambda s: s.sample_counts(GOOD_X, n=-5), "n must"),
    ("n float", lambda s: s.sample_counts(GOOD_X, n=10.0), "n must"),
    ("n bool", lambda s: s.sample_counts(GOOD_X, n=True), "n must"),
    ("label = c", lambda s: s.certify(GOOD_X, torch.tensor([0, 5]), 1, 10, 0.1), "labels"),
    ("label < 0", lambda s: s.certify(GOOD_X, torch.tensor([-1, 0]), 1, 10, 0.1), "labels"),
    ("label 2**40", lambda s: s.certify(GOOD_X, torch.tensor([2**40, 0]), 1, 10, 0.1), "labels"),
    ("labels (B, 1)", lambda s: s.certify(GOOD_X, torch.tensor([[0], [1]]), 1, 10, 0.1), "shape"),
    ("labels too many", lambda s: s.certify(GOOD_X, [0, 1, 2], 1, 10, 0.1), "shape"),
    ("k = c", lambda s: s.predict(GOOD_X, 5, 10, 0.1), "k must"),
    ("k = 0", lambda s: s.certify(GOOD_X, [0, 1], (1, 0), 10, 0.1), "k must"),
    ("alpha = 0", lambda s: s.certify(GOOD_X, [0, 1], 1, 10, 0.0), "alpha"),
    ("alpha NaN", lambda s: s.predict(GOOD_X, 1, 10, float("nan")), "alpha"),
    ("negative example id", lambda s: s.sample_counts(GOOD_X, 4, example_ids=[0, -1]), "example"),
]


@pytest.mark.parametrize(("call", "match"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_smoothed_classifier_rejects_bad_input_before_sampling(call, match):
    """Each bad argument is a ValueError whose message names the problem, raised before the
    model runs even once (so a typo never costs a Monte Carlo run)."""
    model = CountingModel()
    smoothed = SmoothedClassifier(model, num_classes=5, sigma=0.25)
    with pytest.raises(ValueError, match=match):
        call(smoothed)
    assert model.calls == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"sigma": float("inf")}, "sigma"),
        ({"sigma": "0.25"}, "sigma"),
        ({"num_classes": 2.0}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
    ],
)
def test_smoothed_classifier_rejects_bad_construction(kwargs, match):
    """Bad sigma or num_classes at construction: a ValueError naming it."""
    args = {"model": CountingModel(), "num_classes": 5, "sigma": 0.25, **kwargs}
    with pytest.raises(ValueError, match=match):
        SmoothedClassifier(**args)


# Arguments that used to be refused only after the Monte Carlo run, or with a poor message.
LATE = [
    (
        "float labels are rejected only after the whole Monte Carlo run",
        lambda s: s.certify(GOOD_X, torch.tensor([0.0, 1.0]), 1, 10, 0.1),
        "labels",
    ),
    (
        "bool labels are rejected only after the whole Monte Carlo run",
        lambda s: s.certify(GOOD_X, torch.tensor([True, False]), 1, 10, 0.1),
        "labels",
    ),
    (
        "a misspelt bounds= is rejected only after the whole Monte Carlo run",
        lambda s: s.certify(GOOD_X, [0, 1], 1, 10, 0.1, bounds="wilson"),
        "bounds",
    ),
    (
        "NaN labels give 'cannot convert float NaN to integer'",
        lambda s: s.certify(GOOD_X, torch.tensor([float("nan"), 0.0]), 1, 10, 0.1),
        "labels",
    ),
    (
        "a float seed is a TypeError",
        lambda s: s.sample_counts(GOOD_X, 4, seed=1.5),
        "seed",
    ),
]


@pytest.mark.parametrize(("call", "match"), [r[1:] for r in LATE], ids=[r[0] for r in LATE])
def test_labels_bounds_and_seed_are_checked_before_sampling(call, match):
    """These bad arguments should also be named ValueErrors raised before any forward pass."""
    model = CountingModel()
    smoothed = SmoothedClassifier(model, num_classes=5, sigma=0.25)
    with pytest.raises(ValueError, match=match):
        call(smoothed)
    assert model.calls == 0


def test_numpy_example_ids_are_accepted():
    """Dataset indices often come as a numpy integer array; they name the noise streams just as
    a list of Python ints does."""
    smoothed = SmoothedClassifier(CountingModel(), num_classes=5, sigma=0.25)
    expected = smoothed.sample_counts(GOOD_X, 20, seed=1, example_ids=[3, 9])
    got = smoothed.sample_counts(GOOD_X, 20, seed=1, example_ids=np.array([3, 9]))
    assert torch.equal(got, expected)
