"""``topk-smoothing fit|validate|test|certify|predict``: LightningCLI over the model and data.

``predict`` is the smoothed classifier's (``lightning_modules.smoothing_commands``), and every
subcommand reads checkpoints with ``weights_only=True`` unless ``--trust_checkpoint true``.

``TopkLightningCLI`` is reusable (``run=False`` builds model, datamodule and trainer from a
config without running anything). ``main(argv)`` turns user mistakes found at start-up (a bad
option or value, an unknown model or weights name, a missing data directory or checkpoint)
into one line on stderr and exit status 2.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from certify.commands.checkpoints import CheckpointError, fitting_network_state
from certify.commands.outputs import OutputError
from certify.commands.runner import CertifyingTrainer
from certify.commands.settings import CertifySettingsError
from certify.commands.settings import check_settings as check_certify_settings
from certify.math.validation import check_top_k
from certify.training.callback import CertificationCallback
from datamodules.base import DataSplitError, ImageClassificationDataModule
from lightning_modules.module import NoisyClassifier
from lightning_modules.smoothing_commands import SMOOTHING_COMMANDS, SmoothingSubcommands
from lightning_modules.wandb_runs import continue_run, discard_new_wandb_run, forget_run_id

#: ``--ckpt_path`` values that Lightning resolves itself (keywords, model registry).
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
#: Attributes of the datamodule that the model receives.
LINKED_FROM_DATA = ("num_classes", "mean", "std")
#: What a class raises at instantiation for a bad setting (value, path, device choice).
USER_ERRORS = (ValueError, OSError, MisconfigurationException)


class StartupError(Exception):
    """A user mistake found before anything runs: reported in one line, exit status 2."""


#: Mistakes reported in one line wherever they are found (start-up, data setup, certify).
ONE_LINE_ERRORS = (
    StartupError, CertifySettingsError, CheckpointError, OutputError, DataSplitError
)  # fmt: skip


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def cause_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from, outermost first."""
    chain = [error]
    while (error := error.__cause__ or error.__context__) is not None and error not in chain:
        chain.append(error)
    return chain


def parse_error_message(error: ArgumentError) -> str:
    """The innermost parser message: it names the key and the value (jsonargparse nests them)."""
    return one_line([e for e in cause_chain(error) if isinstance(e, ArgumentError)][-1])


def run_dir(trainer: Trainer) -> Path:
    """The run's own folder: ``save_dir/name/version`` of the logger (the checkpoints' parent)."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


class ConfigToLoggers(SaveConfigCallback):
    """Sends the full resolved config to every logger (the W&B run config), with the values
    linked from the data and the model's settings it resolved from ``None`` (e.g. the loss's
    defaults), and writes ``config.yaml`` (reusable as ``--config``) into the run's
    folder, next to its ``checkpoints/``."""

    def __init__(self, parser: LightningArgumentParser, config, **kwargs: Any) -> None:
        kwargs.setdefault("save_to_log_dir", False)
        super().__init__(parser, config, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = run_dir(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.config_filename
        with warnings.catch_warnings():  # skip_none: skip_unset from jsonargparse 4.49 on
            warnings.filterwarnings("ignore", message=r"\s*skip_none")
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            self.parser.save(self.config, path, skip_none=False, overwrite=True)
        init_args = config.get("model", {}).get("init_args")
        if isinstance(init_args, dict):
            hparams = pl_module.hparams
            init_args.update({key: hparams[key] for key in LINKED_FROM_DATA if key in hparams})
            # Settings the model resolved from None (a loss's defaults): the values it uses.
            init_args.update(
                {
                    key: hparams[key]
                    for key, value in init_args.items()
                    if value is None and hparams.get(key) is not None
                }
            )
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class TopkLightningCLI(SmoothingSubcommands, LightningCLI):
    """LightningCLI with ``NoisyClassifier`` subclasses as model and any datamodule of ours.

    ``num_classes``, ``mean`` and ``std`` are linked from the datamodule into the model.
    Keyword arguments are LightningCLI's; parse errors raise instead of exiting.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", NoisyClassifier)
        kwargs.setdefault("datamodule_class", ImageClassificationDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", ConfigToLoggers)
        kwargs.setdefault("trainer_class", CertifyingTrainer)
        parser_kwargs = {"prog": "topk-smoothing", "exit_on_error": False}
        parser_kwargs.update(kwargs.pop("parser_kwargs", None) or {})
        super().__init__(args=args, run=run, parser_kwargs=parser_kwargs, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)  # --trust_checkpoint
        for key in LINKED_FROM_DATA:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: test the best checkpoint (or the final weights) when training ends",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            if isinstance(args, dict):
                self.config = parser.parse_object(args)
            else:
                self.config = parser.parse_args(args)
        except ArgumentError as err:
            raise StartupError(parse_error_message(err)) from None
        subcommand = self.config.get("subcommand")
        seed = self.config.get(f"{subcommand}.seed_everything")
        if not isinstance(seed, bool) and seed is not None and not 0 <= seed < 2**32:
            raise StartupError(f"seed_everything must lie in 0 .. 2**32 - 1, got {seed}")
        if subcommand == "certify":
            c = self.config.certify
            try:
                check_certify_settings(
                    c.n, c.alpha, c.bounds, c.split, c.skip, c.max_examples, c.batch_size, c.sigma,
                    c.autocast, seed=c.seed, k=c.k, output_dir=c.output_dir,
                    sequential=c.sequential, radii=c.radii,
                )  # fmt: skip
            except CertifySettingsError as err:
                raise StartupError(str(err)) from None
        if subcommand == "predict":
            self.check_predict_config()
        ckpt_path = self.config.get(f"{subcommand}.ckpt_path")
        keyword = ckpt_path in CKPT_KEYWORDS or str(ckpt_path).startswith("registry:")
        local = ckpt_path and not keyword and "://" not in ckpt_path
        if local and Path(ckpt_path).is_dir():
            raise StartupError(f"checkpoint {ckpt_path!r} is a directory, not a checkpoint file")
        if local and not Path(ckpt_path).is_file():
            raise StartupError(f"checkpoint {ckpt_path!r} does not exist")
        if subcommand == "fit" and local:  # the id is for the logger, not config.yaml
            self.continued_run = continue_run(self.config.fit.trainer, Path(ckpt_path))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Checks that need the built model run before the trainer prints anything.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config.get(f"{subcommand}.ckpt_path") if subcommand else None
        net = getattr(self.model, "net", None)
        if ckpt_path and net is not None and Path(ckpt_path).is_file():
            trust = bool(self.config[subcommand].trust_checkpoint)
            try:
                arch = self.model.hparams.get("arch")
                _, kind = fitting_network_state(net, ckpt_path, arch, trust)
            except CheckpointError as err:
                raise StartupError(str(err)) from None
            if kind == "cohen" and subcommand not in SMOOTHING_COMMANDS:
                raise StartupError(
                    f"checkpoint {ckpt_path!r} is one of Cohen et al.'s models, not a Lightning "
                    "checkpoint: only `topk-smoothing certify` and `predict` read it"
                )
        k = self.config[subcommand].get("k") if subcommand in SMOOTHING_COMMANDS else None
        if k is not None:
            try:
                check_top_k(k if isinstance(k, int) else list(k), int(self.model.num_classes))
            except ValueError as err:
                raise StartupError(str(err)) from None
        replaced = getattr(self, "replaced_by_checkpoint", [])
        if replaced and rank_zero_only.rank == 0:
            smoothing = subcommand in SMOOTHING_COMMANDS
            hint = f"; `{subcommand} --sigma` smooths at another level" if smoothing else ""
            print(
                f"topk-smoothing {subcommand}: note: the checkpoint's hyperparameters replace "
                f"the config's: {', '.join(replaced)}{hint}",
                file=sys.stderr,
            )
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            if getattr(self, "continued_run", None) is not None:  # the logger holds it now
                forget_run_id(self.config.fit.trainer, self.continued_run)
        except USER_ERRORS as err:
            # jsonargparse wraps the error of a class's __init__: report the original one.
            original = [e for e in cause_chain(err) if isinstance(e, USER_ERRORS)][-1]
            raise StartupError(one_line(original)) from err

    def _check_callbacks(self) -> None:
        """Certification callbacks meet the model now, before anything is run or written."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, CertificationCallback):
                try:
                    callback.check_module(self.model)
                except ValueError as err:
                    raise StartupError(str(err)) from None

    def before_fit(self) -> None:
        self._check_callbacks()
        # The optimizer and its schedule are built only when training starts: build them once
        # now, on the real parameters, so that a bad setting stops before any run directory.
        model = self.model
        try:
            optimizer = model.optimizer_factory(model.parameters())
            if model.lr_scheduler_factory is not None:
                model.lr_scheduler_factory(optimizer)
        except (ValueError, TypeError) as err:
            raise StartupError(f"model.optimizer / model.lr_scheduler: {one_line(err)}") from None

    def before_validate(self) -> None:
        self._check_callbacks()

    def after_fit(self) -> None:
        if not self.config.fit.test_after_fit:
            return
        callback = self.trainer.checkpoint_callback  # the first ModelCheckpoint: the best epoch
        best = callback.best_model_path if callback is not None else ""
        self.trainer.test(
            self.model,
            datamodule=self.datamodule,
            ckpt_path=best or None,
            weights_only=not self.config.fit.trust_checkpoint,
        )


def list_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``--k 1 3 5`` -> ``--k=[1,3,5]``: space-separated lists, as in ``topk-smoothing radius``."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        values = []
        while arg in names and i < len(argv) and not argv[i].startswith(("--", "[")):
            values.append(argv[i])
            i += 1
        out.append(f"{arg}=[{','.join(values)}]" if values else arg)
    return out


def flag_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``--sequential`` with no value (last, or before another option) -> ``--sequential=true``."""
    return [
        f"{arg}=true"
        if arg in names and (i + 1 == len(argv) or argv[i + 1].startswith("--"))
        else arg
        for i, arg in enumerate(argv)
    ]


def main(argv: list[str]) -> int:
    """Run ``topk-smoothing <fit|validate|test|certify|predict> ...``; 2 on a start-up mistake."""
    prog = " ".join(["topk-smoothing", *argv[:1]])
    # The seed is in the config: keep a start-up error the only line a mistake prints.
    logging.getLogger("lightning_fabric.utilities.seed").setLevel(logging.WARNING)
    if argv[:1] in (["certify"], ["predict"]):  # no trainer banner: they print their own
        # progress, and an output directory or resume refusal (found once the trainer
        # exists) stays one line
        logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    # certify's --k and --radii take several values
    lists = ("--k", "--radii") if argv[:1] == ["certify"] else ()
    wandb_run = getattr(sys.modules.get("wandb"), "run", None)  # a run of the caller's
    try:
        args = flag_options(list_options(list(argv), lists), ("--sequential",))
        TopkLightningCLI(args=args)
    except ONE_LINE_ERRORS as err:
        discard_new_wandb_run(wandb_run)
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a full or read-only disk, missing or unreadable data files
        discard_new_wandb_run(wandb_run)
        if err.filename is not None and err.strerror:
            detail = f"{err.filename}: {err.strerror}"
        else:  # e.g. torchvision's "Found no valid file for the classes ..."
            detail = one_line(err) or type(err).__name__
        print(f"{prog}: error: {detail}", file=sys.stderr)
        return 2
    return 0
