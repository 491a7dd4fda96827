"""``topk-smoothing``: one console command, several subcommands.

``radius`` (and the other pure commands registered in ``COMMANDS``) run without Lightning;
``fit``, ``validate``, ``test``, ``certify`` and ``predict`` go to the LightningCLI in
``lightning_modules.cli``. User mistakes end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

from certify.commands.countfile import format_radius, read_counts, write_atomic
from certify.commands.report import configure_report, run_report
from certify.math.radius import certified_radius

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict", "certify")
LIGHTNING_HELP = {
    "fit": "train a base classifier under Gaussian noise (LightningCLI)",
    "validate": "evaluate a base classifier under noise on the validation split (LightningCLI)",
    "test": "evaluate a base classifier under noise on the test split (LightningCLI)",
    "certify": "certified top-k radii of the true labels of a data split",
    "predict": "top-k sets of the smoothed classifier with a certified radius per label",
}


class UsageError(ValueError):
    """A mistake of the user's: reported in one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def radius_rows(radii: np.ndarray, labels: np.ndarray, top_k: Sequence[int]):
    yield "\t".join(["idx", "label", *(f"radius_top{k}" for k in top_k)]) + "\n"
    for idx, (label, row) in enumerate(zip(labels.tolist(), radii.tolist(), strict=True)):
        yield "\t".join([str(idx), str(label), *map(format_radius, row)]) + "\n"


# ------------------------------------------------------------------------- radius
def configure_radius(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("counts", help="count file: per row, c integer counts then the label")
    parser.add_argument("--sigma", type=float, required=True, help="noise level of the counts")
    parser.add_argument("--alpha", type=float, required=True, help="failure probability")
    parser.add_argument("--k", type=int, nargs="+", required=True, help="one or more k")
    parser.add_argument("--bounds", choices=("simuem", "binocp"), default="simuem")
    parser.add_argument("--output", help="TSV to write (default: stdout)")


def run_radius(args: argparse.Namespace) -> None:
    counts, labels = read_counts(args.counts)
    radii = certified_radius(counts, labels, args.k, args.sigma, args.alpha, args.bounds)
    rows = radius_rows(radii.numpy(), labels, args.k)
    if args.output:
        write_atomic(args.output, rows)
    else:
        sys.stdout.writelines(rows)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "radius": ("certified top-k radii from a count file", configure_radius, run_radius),
    "report": ("tables and a plot of certified top-k accuracy", configure_report, run_report),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="topk-smoothing",
        description="Certified top-k robustness by randomized smoothing. Lightning commands: "
        + ", ".join(LIGHTNING_COMMANDS)
        + " (see `topk-smoothing fit --help`).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (help_text, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=LIGHTNING_HELP.get(name, f"LightningCLI {name}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from lightning_modules.cli import main as lightning_main

        return lightning_main(argv)
    prog = "topk-smoothing" + (f" {argv[0]}" if argv and argv[0] in COMMANDS else "")
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        COMMANDS[args.command][2](args)
    except ValueError as err:  # UsageError, CountFileError and the API's ValueErrors
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `topk-smoothing radius ... | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except OSError as err:
        print(f"{prog}: error: {err.filename or ''}: {err.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
