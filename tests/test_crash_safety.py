"""`topk-smoothing certify` under a real kill, a full disk and a read-only disk.

A run killed with SIGKILL while it writes leaves only whole rows that are read back (a torn
last piece is ignored and cut on resume) and no final file; the rerun completes it with the
same files as an uninterrupted run. A run stopped by SIGTERM stops between batches. Both are
real processes; the reruns, the reference run, the full disk (one line, the rows written so
far kept, the rerun with space completes it) and the read-only disk (one line) run in this
process. The disks are small tmpfs mounts (root with mount rights only; skipped otherwise).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from certify.commands.outputs import RunOutput
from tests.console import QUIET, console

REPO = Path(__file__).resolve().parents[1]
N, EXAMPLES = 2000, 30
HEADER = ["idx", "label", "pred1", "pred2", "pred3", "radius_top1", "radius_top3", "seconds"]
ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "WANDB_MODE": "offline",
    "OMP_NUM_THREADS": "1",  # 2 shared cores: one thread per process is much faster
}


def certify_args(ckpt: Path, out: Path, *extra: str, n: int = N, examples: int = EXAMPLES):
    return [
        "certify", "--config", str(REPO / "configs" / "digits.yaml"), "--ckpt_path", str(ckpt),
        "--n", str(n), "--k", "[1,3]", "--max_examples", str(examples), "--seed", "0",
        "--output_dir", str(out), *QUIET, *extra,
    ]  # fmt: skip


def start(ckpt: Path, out: Path, cwd: Path, *extra: str, **sizes) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "certify", *certify_args(ckpt, out, *extra, **sizes)],
        cwd=cwd, env=ENV, text=True, preexec_fn=os.setsid,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def run(ckpt: Path, out: Path, *extra: str, **sizes) -> tuple[int, str]:
    """The command in this process: exit status and stderr."""
    code, _, err = console(*certify_args(ckpt, out, *extra, **sizes))
    return code, err


def assert_one_line_error(returncode: int, stderr: str, *needles: str) -> str:
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("topk-smoothing certify: error: "), last
    for needle in needles:
        assert needle in last, last
    return last


def table(path: Path) -> list[list[str]]:
    """certify.tsv without its wall-clock `seconds` column."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    assert rows[0] == HEADER
    return [row[:-1] for row in rows]


def assert_same_results(done: Path, reference: Path) -> None:
    assert table(done / "certify.tsv") == table(reference / "certify.tsv")
    assert (done / "counts.txt").read_bytes() == (reference / "counts.txt").read_bytes()
    assert len(table(done / "certify.tsv")) == EXAMPLES + 1


def complete_rows(part: Path) -> tuple[list[list[str]], bytes]:
    """The part file's complete lines (split into fields) and the torn piece after them."""
    data = part.read_bytes()
    whole, _, torn = data.rpartition(b"\n")
    return [line.split("\t") for line in whole.decode().split("\n") if whole], torn


def assert_rows_are_whole(rows: list[list[str]], n: int = N) -> None:
    for fields in rows:
        assert len(fields) == len(HEADER) + 1, fields  # + the counts
        idx, label, *preds = map(int, fields[:5])
        radii = [float(v) for v in fields[5:7]]
        counts = [int(v) for v in fields[-1].split(" ")]
        assert len(counts) == 10 and sum(counts) == n, fields
        assert 0 <= label < 10 and all(0 <= p < 10 for p in preds) and idx >= 0
        assert all(r != r or r >= 0 for r in radii)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("crash")


#: The run stopped by SIGTERM: long enough per example to be stopped in the middle.
TERM_SIZES = {"n": 4000, "examples": 10}


@pytest.fixture(scope="module")
def stopped(digits_checkpoint, workdir) -> dict[str, tuple[bytes, int, str]]:
    """Two runs started together, ``killed`` SIGKILLed once its part file has 5 rows and
    ``terminated`` SIGTERMed once it has 2: per run, its part file right after it ended, its
    exit status and its stderr."""
    plan = {"killed": (signal.SIGKILL, 5, {}), "terminated": (signal.SIGTERM, 2, TERM_SIZES)}
    victims = {name: start(digits_checkpoint, workdir / name, workdir, **sizes)
               for name, (_, _, sizes) in plan.items()}  # fmt: skip
    waiting, deadline = set(plan), time.monotonic() + 240
    try:
        while waiting and time.monotonic() < deadline:
            for name in sorted(waiting):
                assert victims[name].poll() is None, f"the {name} run ended before its signal"
                part, (sig, rows, _) = workdir / name / "parts" / "rank0.tsv", plan[name]
                if part.is_file() and part.read_bytes().count(b"\n") >= rows:
                    os.killpg(victims[name].pid, sig)
                    waiting.discard(name)
            time.sleep(0.02)
        assert not waiting, f"no rows from {waiting} in 240 s"
        results = {}
        for name, victim in victims.items():
            returncode, stderr = finish(victim, timeout=120)
            results[name] = (
                (workdir / name / "parts" / "rank0.tsv").read_bytes(),
                returncode,
                stderr,
            )
        return results
    finally:
        for victim in victims.values():
            if victim.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(victim.pid, signal.SIGKILL)
                victim.communicate()


@pytest.fixture(scope="module")
def killed_and_reference(digits_checkpoint, workdir, stopped):
    """The SIGKILLed run; then an uninterrupted run of the same command writes the reference
    files, and a rerun with another seed tries the killed run's directory."""
    killed, reference = workdir / "killed", workdir / "reference"
    snapshot = stopped["killed"][0]
    refused = run(digits_checkpoint, killed, "--seed", "1")
    returncode, stderr = run(digits_checkpoint, reference)
    assert returncode == 0, stderr[-3000:]
    return killed, reference, snapshot, refused


def test_killed_run_leaves_only_whole_rows_and_no_final_files(killed_and_reference):
    killed, _, snapshot, _ = killed_and_reference
    assert snapshot.count(b"\n") >= 5
    rows, torn = complete_rows(killed / "parts" / "rank0.tsv")
    assert 5 <= len(rows) < EXAMPLES
    assert_rows_are_whole(rows)
    read_back = RunOutput(killed, "certify.json", {}, HEADER).read_parts()
    assert sorted(read_back) == sorted(int(r[0]) for r in rows)  # a torn piece is never read
    assert not torn or int(torn.split(b"\t")[0]) not in read_back
    for name in ("certify.tsv", "counts.txt", "report.md"):
        assert not (killed / name).exists(), name


def test_final_files_are_readable_by_others(killed_and_reference):
    """Written through a temporary file, yet with the usual permissions, not mkstemp's 0600."""
    _, reference, _, _ = killed_and_reference
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("certify.json", "certify.tsv", "counts.txt", "report.md", "report.csv"):
        assert (reference / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_rerun_with_other_settings_is_refused_then_same_rerun_completes(
    digits_checkpoint, workdir, killed_and_reference
):
    killed, reference, snapshot, (returncode, stderr) = killed_and_reference
    assert_one_line_error(returncode, stderr, "seed = 0", "seed = 1", "refusing to mix")
    assert (killed / "parts" / "rank0.tsv").read_bytes() == snapshot  # left as it was

    returncode, stderr = run(digits_checkpoint, killed)
    assert returncode == 0, stderr[-3000:]
    assert_same_results(killed, reference)
    rows, torn = complete_rows(killed / "parts" / "rank0.tsv")
    assert torn == b"" and len(rows) == EXAMPLES  # nothing certified twice
    assert_rows_are_whole(rows)


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs at ``path`` (needs root with mount rights: skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    try:
        done = subprocess.run(mount, capture_output=True, text=True, timeout=30)
    except OSError as err:
        pytest.skip(f"cannot mount a tmpfs: {err}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remount(path: Path, options: str) -> None:
    done = subprocess.run(
        ["mount", "-o", f"remount,{options}", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_full_disk_stops_in_one_line_and_the_rerun_completes(digits_checkpoint, workdir):
    """Two 4 KiB pages: certify.json takes one, the part file fills the other mid-run (150
    rows of about 60 bytes at n = 200)."""
    n, examples = 200, 150
    with tmpfs(workdir / "full", "size=8k") as disk:
        out = disk / "out"
        returncode, stderr = run(digits_checkpoint, out, n=n, examples=examples)
        assert_one_line_error(
            returncode, stderr, str(out / "parts"), "No space left on device", "rerun"
        )
        before, _ = complete_rows(out / "parts" / "rank0.tsv")
        assert 10 <= len(before) < examples
        assert_rows_are_whole(before, n)
        assert not (out / "certify.tsv").exists()

        remount(disk, "size=1m")  # space freed: the same command continues
        returncode, stderr = run(digits_checkpoint, out, n=n, examples=examples)
        assert returncode == 0, stderr[-3000:]
        after, torn = complete_rows(out / "parts" / "rank0.tsv")
        assert torn == b"" and len(after) == examples
        assert_rows_are_whole(after, n)
        assert after[: len(before)] == before  # the rows kept are reused, not redone
        final = table(out / "certify.tsv")[1:]
        assert [int(row[0]) for row in final] == list(range(examples))
        assert final == sorted((row[:7] for row in after), key=lambda row: int(row[0]))


def test_read_only_disk_is_refused_in_one_line(digits_checkpoint, isolated_run):
    with tmpfs(isolated_run / "ro", "ro,size=64k") as disk:
        for out, message in (
            (disk / "out", f"cannot create output directory {disk / 'out'}: Read-only file system"),
            (disk, f"cannot create output directory {disk / 'parts'}: Read-only file system"),
        ):
            returncode, err = run(digits_checkpoint, out)
            last = assert_one_line_error(returncode, err)
            assert last == f"topk-smoothing certify: error: {message}", err


def test_sigterm_stops_between_batches_and_the_rerun_completes(digits_checkpoint, workdir, stopped):
    out, (_, returncode, stderr) = workdir / "terminated", stopped["terminated"]
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr.strip().splitlines()[-1]
    rows, torn = complete_rows(out / "parts" / "rank0.tsv")
    assert 2 <= len(rows) < TERM_SIZES["examples"] and torn == b""
    assert_rows_are_whole(rows, n=TERM_SIZES["n"])
    assert not (out / "certify.tsv").exists()
    returncode, stderr = run(digits_checkpoint, out, **TERM_SIZES)
    assert returncode == 0, stderr[-3000:]
    assert len(table(out / "certify.tsv")) == TERM_SIZES["examples"] + 1
