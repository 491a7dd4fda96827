"""``topk-smoothing``: fit, validate, test, certify, predict on one LightningCLI, radius and
report on argparse; a user mistake: ``topk-smoothing CMD: error: ...``, exit 2, nothing written."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ArgumentError

from certify.commands.checkpoints import network_state, read_checkpoint
from certify.commands.countfile import format_radius, read_counts, write_atomic
from certify.commands.report import configure_report, run_report
from certify.commands.runner import CertifyingTrainer
from certify.commands.task import LoggersWhenSampling
from certify.math.radius import certified_radius
from certify.math.validation import UsageError
from lightning_modules.cli import SafeTrainer, TopkLightningCLI, innermost, one_line

#: Modules not of this project (a ``warnings`` filter's ``module``, matched at the start).
THIRD_PARTY = r"(?!certify|lightning_modules|datamodules)"
#: The commands that sample the smoothed classifier (and read Cohen et al.'s checkpoints).
SMOOTHING_COMMANDS = ("certify", "predict")
LIGHTNING_COMMANDS = ("fit", "validate", "test", *SMOOTHING_COMMANDS)
DESCRIPTION = ("Certified top-k robustness by randomized smoothing. Lightning commands: "
               f"{', '.join(LIGHTNING_COMMANDS)} (see `topk-smoothing fit --help`).")  # fmt: skip


class Trainer(CertifyingTrainer, SafeTrainer):
    """``SafeTrainer``'s ``fit``, ``validate``, ``test``; ``CertifyingTrainer``'s the others."""


class SmoothingCLI(TopkLightningCLI):
    """``TopkLightningCLI`` with ``certify`` and ``predict``, checking the checkpoint's network."""

    read_checkpoint = staticmethod(read_checkpoint)

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        super().__init__(args, **{"trainer_class": Trainer, **kwargs})

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        skip = {"model", "datamodule"}
        return {**TopkLightningCLI.subcommands(), **dict.fromkeys(SMOOTHING_COMMANDS, skip)}

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "predict":  # it logs nothing: no logger, no W&B run
            self.config.predict.trainer.logger = False
        super().before_instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any):
        command = self.subcommand
        if command in SMOOTHING_COMMANDS:  # they write into their output directory only
            self.save_config_callback = None
        if self.checkpoint is not None and (net := getattr(self.model, "net", None)) is not None:
            arch = getattr(self.model, "hparams", {}).get("arch")
            _, kind = network_state(self.checkpoint, self.ckpt_path, arch, net)
            if kind == "cohen" and self.config.get("subcommand") not in SMOOTHING_COMMANDS:
                raise UsageError(f"checkpoint {self.ckpt_path!r} is one of Cohen et al.'s models, "
                                 "not a Lightning checkpoint: only `topk-smoothing certify` and "
                                 "`predict` read it")  # fmt: skip
        trainer = super().instantiate_trainer(**kwargs)
        if command in SMOOTHING_COMMANDS:
            trainer.callbacks.append(LoggersWhenSampling(command, trainer.loggers))
            trainer.loggers = []
        return trainer


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
    rows = ["\t".join(["idx", "label", *(f"radius_top{k}" for k in args.k)]) + "\n"]
    for idx, (label, row) in enumerate(zip(labels.tolist(), radii.tolist(), strict=True)):
        rows.append("\t".join([str(idx), str(label), *map(format_radius, row)]) + "\n")
    write_atomic(args.output, rows) if args.output else sys.stdout.writelines(rows)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "radius": ("certified top-k radii from a count file", configure_radius, run_radius),
    "report": ("tables and a plot of certified top-k accuracy", configure_report, run_report),
}


class Numbers(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [number for each in values for number in each])


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors; a list of numbers: ``--k 1 3 5`` or ``--k [1,3,5]``."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        if kwargs.get("nargs") == "+" and (kind := kwargs.get("type")) in (int, float):

            def numbers(text: str) -> list:
                listed = text.startswith("[") and text.endswith("]")
                return [kind(part) for part in (text[1:-1].split(",") if listed else [text])]

            numbers.__name__ = kind.__name__  # argparse says "invalid int value: 'x'"
            kwargs.update(type=numbers, action=Numbers)
        return super().add_argument(*names, **kwargs)


def no_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()  # Lightning's tip at every Trainer


def main(argv: Sequence[str] | None = None) -> int:
    """``topk-smoothing COMMAND ...``: 0 on success, 2 after a one-line user mistake."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in (*LIGHTNING_COMMANDS, *COMMANDS) else None
    prog = "topk-smoothing" + (f" {command}" if command else "")
    try:
        if command in LIGHTNING_COMMANDS:  # no seed line or progress: an error stays alone
            logging.getLogger("lightning_fabric.utilities.seed").setLevel(logging.WARNING)
            lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
            lightning.addFilter(no_advert)
            if command in SMOOTHING_COMMANDS:
                lightning.setLevel(logging.WARNING)
            callers = getattr(sys.modules.get("wandb"), "run", None)  # left as it is
            with warnings.catch_warnings():  # for this command only; -W / PYTHONWARNINGS rule
                for category in () if sys.warnoptions else (DeprecationWarning, FutureWarning):
                    warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)
                SmoothingCLI(args=argv)
            if (wandb := sys.modules.get("wandb")) is not None and wandb.run not in (None, callers):
                wandb.finish()  # the command's run, now: at exit W&B abandons pending requests
            return 0
        parser = OneLineParser(prog="topk-smoothing", description=DESCRIPTION)
        sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
        for name, (help_text, configure, _) in COMMANDS.items():
            configure(sub.add_parser(name, help=help_text, description=help_text))
        for name in LIGHTNING_COMMANDS:
            sub.add_parser(name, help=f"see `topk-smoothing {name} --help`")
        if (args := parser.parse_args(argv)).command is None:
            parser.print_help()
            return 2
        COMMANDS[args.command][2](args)
        return 0
    except ArgumentError as err:  # the innermost parser message names the key and the value
        detail = one_line(innermost(err, ArgumentError))
    except ValueError as err:  # UsageError; for radius and report, the API's ValueErrors too
        if command in LIGHTNING_COMMANDS and not isinstance(err, UsageError):
            raise
        detail = one_line(err)
    except BrokenPipeError:  # e.g. `topk-smoothing radius ... | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except OSError as err:  # a full or read-only disk, missing or unreadable files
        if err.filename is not None and err.strerror:
            detail = f"{err.filename}: {err.strerror}"
        else:  # e.g. torchvision's "Found no valid file for the classes ..."
            detail = one_line(err) or type(err).__name__
    print(f"{prog}: error: {detail}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
