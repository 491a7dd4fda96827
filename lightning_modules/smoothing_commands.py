"""The parts of ``TopkLightningCLI`` for ``predict``, safe checkpoints and start-up notes.

- ``predict`` is the smoothed classifier's PREDICT with a certified radius per label
  (``certify.commands.predict.smoothed_predict``), not Lightning's ``Trainer.predict`` of the
  base classifier (which ``certify`` and ``predict`` themselves run on to shard their work).
- Checkpoints are read with ``weights_only=True`` by every subcommand, Lightning's own loading
  (``fit --ckpt_path`` resumes, ``validate``, ``test``) included: ``--trust_checkpoint true``
  is the one option that loads a file holding pickled Python objects.
- ``model.top_k`` values the data cannot have are named in a note; ``LearningRateMonitor`` is
  left out of a run without a logger and a progress-bar callback out of a run without a bar
  (either would stop the run).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from certify.commands.checkpoints import CheckpointError, network_state, read_checkpoint
from certify.commands.predict import check_predict_settings, smoothed_predict

#: Model arguments that a checkpoint's hyperparameters replace (LightningCLI reads them back).
FROM_CHECKPOINT = ("arch", "sigma", "loss")
#: The commands that sample the smoothed classifier (and read Cohen et al.'s checkpoints).
SMOOTHING_COMMANDS = ("certify", "predict")
PREDICT_HELP = "Top-k sets of the smoothed classifier, with a certified radius for each label"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class SmoothingSubcommands:
    """A ``LightningCLI`` mixin (first base): the ``predict`` subcommand, ``--trust_checkpoint``,
    the reading of a checkpoint's hyperparameters, and notes at start-up."""

    def __init__(self, *args: Any, parser_kwargs: dict | None = None, **kwargs: Any) -> None:
        parser_kwargs = {"predict": {"description": PREDICT_HELP}, **(parser_kwargs or {})}
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's subcommands (``weights_only`` left to ``--trust_checkpoint``) plus
        ``certify`` (``CertifyingTrainer.certify``); ``predict`` is ``smoothed_predict``."""
        commands = {
            name: {*skip, "weights_only"} for name, skip in LightningCLI.subcommands().items()
        }
        commands["certify"] = {"model", "datamodule", "trust_checkpoint"}
        commands["predict"] = {"trainer", "model", "datamodule", "trust_checkpoint"}
        return commands

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--trust_checkpoint",
            type=bool,
            default=False,
            help="load a --ckpt_path that holds pickled Python objects, whose loading can run "
            "any code (only for a file from a trusted source); off: weights only",
        )

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        if subcommand != "predict":
            return super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser = self.init_parser(**kwargs)  # the arguments of smoothed_predict
        self._add_arguments(parser)
        skip = set(self.subcommands()["predict"])
        added = parser.add_function_arguments(smoothed_predict, as_group=False, skip=skip)
        self._subcommand_method_arguments[subcommand] = added
        return parser

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        trust = bool(self.config_init[subcommand].get("trust_checkpoint"))
        if subcommand in SMOOTHING_COMMANDS:
            kwargs["trust_checkpoint"] = trust
        else:  # Lightning's own loading: weights only, unless trusted
            kwargs["weights_only"] = not trust
        return kwargs

    def predict(self, **kwargs: Any) -> bool:
        """``topk-smoothing predict``: ``smoothed_predict`` on the CLI's trainer."""
        return smoothed_predict(self.trainer, **kwargs)

    def check_predict_config(self) -> None:
        """``predict``'s settings, before anything is built (``CertifySettingsError``)."""
        p = self.config.predict
        check_predict_settings(
            p.n0, p.n, p.alpha, p.k, p.split, p.images, skip=p.skip,
            max_examples=p.max_examples, batch_size=p.batch_size, sigma=p.sigma,
            autocast=p.autocast, seed=p.seed, output_dir=p.output_dir,
        )  # fmt: skip

    def _model_args(self) -> dict:
        init = self.config.get(f"{self.config.get('subcommand')}.model.init_args")
        return {} if init is None else {key: init.get(key) for key in FROM_CHECKPOINT}

    def _parse_ckpt_path(self) -> None:
        # LightningCLI's reading of the checkpoint's hyperparameters into the config, through
        # read_checkpoint (weights only unless --trust_checkpoint): a file that is refused, not
        # a checkpoint, or whose hyperparameters do not parse, becomes one line. Values the
        # checkpoint replaces are named once the start-up checks have passed.
        subcommand = self.config.get("subcommand")
        path = self.config.get(f"{subcommand}.ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():  # keywords and URLs: Lightning loads them
            return
        before = self._model_args()
        checkpoint = read_checkpoint(path, bool(self.config[subcommand].trust_checkpoint))
        hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        hparams = {k: v for k, v in (hparams or {}).items() if k != "_instantiator"}
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        if hparams:
            try:
                self.config = self.parser.parse_object(
                    {subcommand: {"model": hparams}}, self.config
                )
            except Exception as err:  # noqa: BLE001 - diagnosed below, then one line
                network_state(checkpoint, path, None)  # no weights: that is the message
                raise CheckpointError(
                    f"checkpoint {path!r}: its hyperparameters cannot be read: {_one_line(err)}"
                ) from None
        after = self._model_args()
        self.replaced_by_checkpoint = [
            f"model.{key} {before[key]!r} -> {after[key]!r}"
            for key in FROM_CHECKPOINT
            if before.get(key) != after.get(key)
        ]

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        # A config's progress-bar settings apply only to a run with a bar: with
        # `enable_progress_bar: false` its progress-bar callback is left out (Lightning would
        # refuse the combination).
        if config.get("enable_progress_bar") is False and config.get("callbacks"):
            config["callbacks"] = [
                cb for cb in config["callbacks"] if not isinstance(cb, ProgressBar)
            ]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        subcommand = self.config.get("subcommand")
        dropped = getattr(self.model, "dropped_top_k", ())
        if dropped and rank_zero_only.rank == 0:
            kept = ", ".join(map(str, self.model.top_k))
            print(
                f"topk-smoothing {subcommand}: note: model.top_k {', '.join(map(str, dropped))} "
                f"dropped: the data has {self.model.num_classes} classes (accuracies for k = "
                f"{kept})",
                file=sys.stderr,
            )
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.logger is None:  # nothing to log to: it would stop the fit
            trainer.callbacks[:] = [
                cb for cb in trainer.callbacks if not isinstance(cb, LearningRateMonitor)
            ]
        return trainer
