"""`topk-smoothing predict`: the smoothed top-k sets with a radius per label, on the digits test
split and on a folder of image files; consistency with the math, the noise streams, resume,
2 processes, and one-line refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from certify import SmoothedClassifier
from certify.math.prediction import certified_prediction
from datamodules import DigitsDataModule
from lightning_modules import NoisyClassifier
from tests.console import (
    DIGITS,
    QUIET,
    assert_one_line_error,
    console,
    interrupted_copy,
    read_rows,
)

N0, N, K, ALPHA, EXAMPLES = 60, 400, 2, 0.01, 24


def predict_args(ckpt: Path, *extra) -> list:
    return [
        "predict", "--config", DIGITS, "--ckpt_path", ckpt, "--n0", N0, "--n", N,
        "--alpha", ALPHA, "--k", K, "--skip", "3", "--max_examples", EXAMPLES, "--seed", "7",
        *QUIET, *extra,
    ]  # fmt: skip


def read_counts(path: Path) -> tuple[list[int], np.ndarray, np.ndarray]:
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    assert lines[0] == ["idx", "selection_counts", "counts"]
    idx = [int(f[0]) for f in lines[1:]]
    selection = np.array([[int(v) for v in f[1].split()] for f in lines[1:]])
    counts = np.array([[int(v) for v in f[2].split()] for f in lines[1:]])
    return idx, selection, counts


@pytest.fixture(scope="module")
def split_run(digits_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "split"
    code, stdout, err = console(*predict_args(digits_checkpoint, "--output_dir", out))
    assert code == 0, err[-3000:]
    return out, stdout


def test_split_table_is_certified_prediction_of_the_counts(split_run):
    """predict.tsv is `certified_prediction` of the written counts (exactly), the n0 and n
    samples have the sizes asked for, every row names k labels, and the closing line counts
    the answers, the certified labels and the true label's places as the table has them."""
    out, stdout = split_run
    rows = read_rows(out / "predict.tsv")
    assert rows[0] == ["idx", "label", "pred1", "pred2", "radius1", "radius2"]
    assert [int(r[0]) for r in rows[1:]] == list(range(0, 3 * EXAMPLES, 3))
    idx, selection, counts = read_counts(out / "counts.tsv")
    assert idx == [int(r[0]) for r in rows[1:]]
    assert (selection.sum(axis=1) == N0).all() and (counts.sum(axis=1) == N).all()
    labels, radii = certified_prediction(selection, counts, K, 0.25, ALPHA)
    np.testing.assert_array_equal(labels.numpy(), [[int(v) for v in r[2:4]] for r in rows[1:]])
    written = np.array([[float(v) for v in r[4:6]] for r in rows[1:]])
    np.testing.assert_allclose(written, radii.numpy(), rtol=1e-9, equal_nan=True)
    certified = ~np.isnan(written)  # (N, K)
    assert certified[:, 0].mean() > 0.8 and not certified.all()  # partial answers are kept
    truth = np.array([int(r[1]) for r in rows[1:]])
    hit = labels.numpy() == truth[:, None]  # (N, K)
    startup = [line for line in stdout.splitlines() if line.startswith("predict: checkpoint")]
    assert len(startup) == 1
    for needle in ("arch digits_cnn", "sigma 0.25 (as trained)", "mean (0.3053) std (0.376)"):
        assert needle in startup[0]
    for needle in (f"n0 {N0}, n {N}, alpha {ALPHA}, k {K}", "device cpu", "seed 7"):
        assert needle in startup[0]
    answered = int(certified.any(axis=1).sum())
    assert stdout.splitlines()[-1].startswith(
        f"predict: {EXAMPLES} examples, {answered} answered"
        + (f", {EXAMPLES - answered} abstained: no label certified" if answered < EXAMPLES else "")
        + f"; {certified.sum()} of {certified.size} labels certified, pred1 for "
        + f"{certified[:, 0].sum()} (median radius {np.median(written[certified[:, 0], 0]):.4g})"
        + f"; true label in the set for {hit.any(axis=1).sum()}, certified for "
        + f"{(hit & certified).any(axis=1).sum()}; "
    )


def test_summary_says_why_answers_were_withheld():
    """An input with no label certified is an abstention, and the closing line says so."""
    from certify.commands.predict import summary

    rows = [
        ["0", "7", "7", "1", "0.5", "nan", "0.1", "counts"],
        ["3", "2", "-1", "-1", "nan", "nan", "0.3", "counts"],
        ["6", "4", "1", "4", "nan", "0.25", "0.2", "counts"],
    ]
    assert summary(rows, 2, split=True) == (
        "predict: 3 examples, 2 answered, 1 abstained: no label certified; 2 of 6 labels "
        "certified, pred1 for 1 (median radius 0.5); true label in the set for 2, certified "
        "for 2; 0.200 s each on average"
    )
    assert summary(rows[1:2], 2, split=False) == (
        "predict: 1 example, 0 answered, 1 abstained: no label certified; 0 of 2 labels "
        "certified, pred1 for 0; 0.300 s each on average"
    )


@pytest.mark.slow
def test_the_digits_model_answers_with_its_top_label_certified(digits_checkpoint, tmp_path):
    """`--k 3 --n0 100 --n 2000` on 40 test images spread over the split (every 9th). The
    selection counts often tie at zero below the top label; still at least 90 % are answered,
    the true label is in the set for at least 90 %, the top label certified for at least 80 %."""
    args = ["predict", "--config", DIGITS, "--ckpt_path", digits_checkpoint, *QUIET, "--k", "3"]
    args += ["--n0", "100", "--n", "2000", "--skip", "9", "--max_examples", "40"]
    code, _, err = console(*args, "--output_dir", tmp_path / "k3")
    assert code == 0, err[-3000:]
    rows = read_rows(tmp_path / "k3" / "predict.tsv")[1:]
    labels = np.array([[int(v) for v in r[2:5]] for r in rows])  # (40, 3)
    radii = np.array([[float(v) for v in r[5:8]] for r in rows])  # (40, 3)
    truth = np.array([int(r[1]) for r in rows])  # (40,)
    _, selection, _ = read_counts(tmp_path / "k3" / "counts.tsv")
    ordered = np.sort(selection, axis=1)  # (40, 10) ascending
    assert (ordered[:, -3] == ordered[:, -4]).mean() >= 0.25  # often a tie at the 3rd place
    assert len(rows) == 40 and (labels[:, 0] >= 0).mean() >= 0.9
    assert (labels == truth[:, None]).any(axis=1).mean() >= 0.9
    assert (~np.isnan(radii[:, 0])).mean() >= 0.8


def test_selection_and_fresh_counts_come_from_their_own_streams(split_run, digits_checkpoint):
    """The written counts of an example are `sample_counts` of the selection streams (n0) and
    of the certify streams (n) of its index, as the Python API draws them."""
    out, _ = split_run
    idx, selection, counts = read_counts(out / "counts.tsv")
    model = NoisyClassifier.load_from_checkpoint(digits_checkpoint, weights=None)
    data = DigitsDataModule()
    data.setup("test")
    smoothed = SmoothedClassifier(model.net, 10, 0.25)
    row = next(i for i, c in enumerate(counts) if c.sum())
    x = data.test_dataset[idx[row]][0][None]  # (1, 1, 8, 8)
    ids = [idx[row]]
    chosen = smoothed.sample_counts(x, N0, seed=7, example_ids=ids, purpose="selection")
    fresh = smoothed.sample_counts(x, N, seed=7, example_ids=ids, purpose="certify")
    assert chosen[0].tolist() == selection[row].tolist()
    assert fresh[0].tolist() == counts[row].tolist()


def test_resume_completes_an_interrupted_run(split_run, digits_checkpoint):
    out, _ = split_run
    partial = out.parent / "partial"
    interrupted_copy(out, partial, "predict.json", rows=9, cut=5)
    code, stdout, err = console(*predict_args(digits_checkpoint, "--output_dir", partial))
    assert code == 0, err[-3000:]
    assert f"9 of 24 examples already in {partial}, resuming" in stdout
    assert read_rows(partial / "predict.tsv") == read_rows(out / "predict.tsv")
    assert (partial / "counts.tsv").read_bytes() == (out / "counts.tsv").read_bytes()
    other = console(*predict_args(digits_checkpoint, "--output_dir", partial, "--n0", "61"))
    assert_one_line_error(other, "predict", "holds a run with n0 = 60, this run has n0 = 61")


def write_digit_images(folder: Path, count: int) -> list[int]:
    """The first ``count`` digits test images as 8x8 grey BMPs (all of one size) in nested
    folders."""
    data = DigitsDataModule()
    data.setup("test")
    labels = []
    for i in range(count):
        image, label = data.test_dataset[i]
        pixels = (image[0].numpy() * 255).round().astype(np.uint8)  # (8, 8)
        path = folder / f"group{i % 2}" / f"digit{i:02d}#{label}.bmp"  # '#' is no comment
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(path)
        labels.append(label)
    return labels


def test_a_folder_of_image_files(isolated_run, digits_checkpoint):
    """Image files go through the data set's transforms: the files' names in sorted order, and
    the trained model labels them as the digits they are. A file changed in place makes the
    same command a new run in its own default directory, never a merge with the old rows."""
    labels = write_digit_images(Path("images"), 10)
    args = ["predict", "--config", DIGITS, "--ckpt_path", digits_checkpoint, *QUIET]
    args += ["--images", "images", "--n0", "50", "--n", "300", "--alpha", "0.01"]
    code, stdout, err = console(*args)
    assert code == 0, err[-3000:]
    (out,) = Path("runs", "predict").iterdir()
    assert out.name.split("_images-")[1][8:] == "_n0-50_n300_sigma0.25_k1"  # 8 digest digits
    rows = read_rows(out / "predict.tsv")
    assert rows[0] == ["idx", "file", "pred1", "radius1"]
    files = [r[1] for r in rows[1:]]
    assert files == sorted(files) and files[0] == f"group0/digit00#{labels[0]}.bmp"
    predicted = {r[1]: int(r[2]) for r in rows[1:]}
    truth = {f"group{i % 2}/digit{i:02d}#{y}.bmp": y for i, y in enumerate(labels)}
    assert sum(predicted[f] == y for f, y in truth.items()) >= 8
    assert "10 examples" in stdout

    first, second = (
        Path("images", f"group{i % 2}", f"digit{i:02d}#{labels[i]}.bmp") for i in (0, 1)
    )
    assert first.stat().st_size == second.stat().st_size
    first.write_bytes(second.read_bytes())  # same name and size, another digit
    code, stdout, err = console(*args)
    assert code == 0 and "already in" not in stdout, err[-3000:]
    (rerun,) = set(Path("runs", "predict").iterdir()) - {out}
    rows = read_rows(rerun / "predict.tsv")
    assert rows[1][1] == first.relative_to("images").as_posix() and int(rows[1][2]) == labels[1]


def test_bad_image_files_are_one_line(isolated_run, digits_checkpoint):
    """An image of another size or a file that is no image: refused in one line naming the
    file, before anything is written; the same command runs once the file is fixed."""
    Path("images").mkdir()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8), mode="L").save("images/big.png")
    args = ["predict", "--config", DIGITS, "--ckpt_path", digits_checkpoint, *QUIET]
    args += ["--images", "images", "--n", "20"]
    line = assert_one_line_error(console(*args), "predict")
    assert line == (
        "topk-smoothing predict: error: image 'big.png' is (1, 28, 28) after the data set's "
        "transforms, the data set's inputs are (1, 8, 8)"
    )
    Path("images", "big.png").write_bytes(b"not an image")
    assert_one_line_error(console(*args), "predict", "image 'big.png' cannot be read")
    assert not Path("runs").exists()  # refused before anything was written
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save("images/big.png")
    code, _, err = console(*args)  # the same command, fixed file
    assert code == 0, err[-3000:]


def test_certify_and_predict_never_share_an_output_directory(isolated_run, digits_checkpoint):
    """Both write parts/rank*.tsv: rows of one are never read as rows of the other."""
    common = ["--config", DIGITS, "--ckpt_path", digits_checkpoint, *QUIET, "--n", "20"]
    common += ["--max_examples", "2", "--output_dir", "shared"]
    code, _, err = console("certify", *common, "--k", "[2]")
    assert code == 0, err[-3000:]
    line = assert_one_line_error(console("predict", *common, "--k", "2"), "predict")
    assert line == (
        "topk-smoothing predict: error: shared holds a certify run (certify.json); refusing to "
        "mix them (choose another output directory)"
    )
    assert not Path("shared", "predict.json").exists()


def test_impossible_settings_are_one_line(isolated_run, digits_checkpoint):
    """Refused in one line naming the option and the value, nothing written: by the option's
    type (the parser's wording) or at the start of `predict`."""
    base = ["predict", "--config", DIGITS, "--ckpt_path", digits_checkpoint, *QUIET, "--n", "20"]
    for args, needles in [
        (["--n0", "0"], ["n0", "0"]),
        (["--n", "0"], ["n", "0"]),
        (["--k", "10"], ["k must satisfy 1 <= k < c = 10, got k = 10"]),
        (["--k", "0"], ["k", "0"]),
        (["--k", "1", "3"], ["unrecognized arguments: 3"]),
        (["--alpha", "1"], ["alpha", "1"]),
        (["--images", "no/such/folder"], ["images 'no/such/folder' is not a directory"]),
        (["--split", "train"], ["split", "train"]),
    ]:
        assert_one_line_error(console(*base, *args), "predict", *needles)
    assert list(isolated_run.iterdir()) == []


def test_predict_help_names_the_smoothed_classifier(capsys):
    from certify.commands.cli import main

    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = capsys.readouterr().out
    assert "Top-k sets of the smoothed classifier" in text
    for option in ("--n0", "--images", "--trust_checkpoint", "--output_dir"):
        assert option in text
    assert "--return_predictions" not in text and "--weights_only" not in text


def test_tensor_of_a_split_run_and_a_python_run_agree(digits_checkpoint):
    """`SmoothedClassifier.predict_certified` gives what the command writes (same seed, ids)."""
    model = NoisyClassifier.load_from_checkpoint(digits_checkpoint, weights=None)
    data = DigitsDataModule()
    data.setup("test")
    x = torch.stack([data.test_dataset[i][0] for i in (0, 3)])
    smoothed = SmoothedClassifier(model.net, 10, 0.25)
    labels, radii = smoothed.predict_certified(x, K, N0, N, ALPHA, seed=7, example_ids=[0, 3])
    selection = smoothed.sample_counts(x, N0, seed=7, example_ids=[0, 3], purpose="selection")
    fresh = smoothed.sample_counts(x, N, seed=7, example_ids=[0, 3])
    expected = certified_prediction(selection, fresh, K, 0.25, ALPHA)
    assert torch.equal(labels, expected[0])
    torch.testing.assert_close(radii, expected[1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.ddp
def test_two_processes_write_the_same_files(split_run, digits_checkpoint):
    """Two processes forked from this one (``ddp_fork``; ``certify``'s test launches the
    console's own DDP processes) write the files of one process."""
    out, _ = split_run
    double = out.parent / "double"
    extra = ("--trainer.devices", "2", "--trainer.strategy", "ddp_fork", "--output_dir", double)
    code, _, err = console(*predict_args(digits_checkpoint, *extra))
    assert code == 0, err[-3000:]
    assert read_rows(double / "predict.tsv") == read_rows(out / "predict.tsv")
    assert (double / "counts.tsv").read_bytes() == (out / "counts.tsv").read_bytes()
    assert len(list((double / "parts").glob("rank*.tsv"))) == 2


SEQUENTIAL = ("--sequential", "true", "--radii", "[0.25,0.5]", "--n", "4000")


@pytest.fixture(scope="module")
def sequential_run(digits_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "sequential"
    code, stdout, err = console(*predict_args(digits_checkpoint, *SEQUENTIAL, "--output_dir", out))
    assert code == 0, err[-3000:]
    return out, stdout


def test_sequential_rows_are_predict_sequential_with_the_samples_used(
    sequential_run, digits_checkpoint
):
    """`--sequential true`: predict.tsv is `SmoothedClassifier.predict_sequential` of the same
    inputs, seed and ids (labels, target radii, samples); confident inputs stop before `--n`;
    predict.json records the mode, the targets and the schedule; no counts.tsv (stopped counts
    are no input for `certified_prediction`); the closing line gives the mean samples."""
    out, stdout = sequential_run
    rows = read_rows(out / "predict.tsv")
    assert rows[0] == ["idx", "label", "pred1", "pred2", "radius1", "radius2", "samples"]
    idx = [int(r[0]) for r in rows[1:]]
    model = NoisyClassifier.load_from_checkpoint(digits_checkpoint, weights=None)
    data = DigitsDataModule()
    data.setup("test")
    x = torch.stack([data.test_dataset[i][0] for i in idx])  # (24, 1, 8, 8)
    labels, radius, samples = SmoothedClassifier(model.net, 10, 0.25).predict_sequential(
        x, K, N0, (0.25, 0.5), 4000, ALPHA, seed=7, example_ids=idx
    )
    assert [[int(v) for v in r[2:4]] for r in rows[1:]] == labels.tolist()
    written = np.array([[float(v) for v in r[4:6]] for r in rows[1:]])  # (24, 2)
    np.testing.assert_array_equal(written, radius.numpy())
    used = np.array([int(r[6]) for r in rows[1:]])  # (24,)
    assert used.tolist() == samples.tolist() and (used <= 4000).all()
    assert (used[written[:, 0] == 0.5] < 4000).mean() >= 0.5 and used.mean() < 4000
    meta = json.loads((out / "predict.json").read_text())
    assert meta["mode"] == "sequential" and meta["n_max"] == 4000 and "n" not in meta
    assert meta["radii"] == [0.25, 0.5] and {"first", "growth", "futility"} <= set(meta)
    assert not (out / "counts.tsv").exists()
    assert "predict: sequential, at most n = 4000 samples per example" in stdout
    assert f"; {used.mean():.0f} fresh samples each on average (median" in stdout
    assert stdout.splitlines()[-1].endswith(f"wrote predict.tsv to {out}")


def test_sequential_resume_and_settings(sequential_run, digits_checkpoint):
    """An interrupted sequential run resumes to the same rows; other targets are refused."""
    out, _ = sequential_run
    partial = out.parent / "sequential-partial"
    interrupted_copy(out, partial, "predict.json", rows=7, cut=5)
    args = predict_args(digits_checkpoint, *SEQUENTIAL, "--output_dir", partial)
    code, stdout, err = console(*args)
    assert code == 0, err[-3000:]
    assert f"7 of 24 examples already in {partial}, resuming" in stdout
    assert read_rows(partial / "predict.tsv") == read_rows(out / "predict.tsv")
    other = console(*args, "--radii", "[0.5]")
    assert_one_line_error(other, "predict", "radii = [0.25, 0.5], this run has radii = [0.5]")


def test_radii_only_with_sequential_and_its_own_directory(isolated_run, digits_checkpoint):
    """`--radii` without `--sequential true` is one line, nothing written; a sequential run
    without `--output_dir` gets a directory named with its targets."""
    base = ["predict", "--config", DIGITS, "--ckpt_path", digits_checkpoint, *QUIET]
    base += ["--n", "1000", "--max_examples", "1"]
    line = assert_one_line_error(console(*base, "--radii", "[0.5]"), "predict", "--radii")
    assert "--sequential true" in line and list(isolated_run.iterdir()) == []
    code, _, err = console(*base, "--sequential", "true", "--radii", "[0.5]")
    assert code == 0, err[-3000:]
    (out,) = Path("runs", "predict").iterdir()
    assert out.name.endswith("_n0-100_n1000_sigma0.25_k1_seq0.5")
