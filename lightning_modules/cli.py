"""``fit``, ``validate`` and ``test`` of a ``NoisyClassifier`` on LightningCLI's public hooks."""

from __future__ import annotations

import os
import sys
import time
import warnings
from functools import partialmethod
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from certify.math.validation import UsageError
from certify.training.callback import CertificationCallback
from datamodules.base import ImageClassificationDataModule
from lightning_modules.module import NoisyClassifier

LINKED_FROM_DATA = ("num_classes", "mean", "std", "data_kind")  # from the datamodule into the model
USER_ERRORS = (ValueError, OSError, MisconfigurationException)  # a bad value, path or device
FIT_FOLDER = "TOPK_SMOOTHING_FIT_FOLDER"  # a logger-less fit's folder, for its DDP processes


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def innermost(error: BaseException, kind: type | tuple) -> BaseException:
    """The innermost exception of type ``kind`` that ``error`` was raised from (or itself)."""
    chain = [error]
    while (error := error.__cause__ or error.__context__) is not None and error not in chain:
        chain.append(error)
    return [e for e in chain if isinstance(e, kind)][-1]


class SafeTrainer(pl.Trainer):
    """Lightning's ``fit``, ``validate`` and ``test``, reading ``ckpt_path`` weights only.

    Args:
        ckpt_path: a checkpoint file, or ``last`` or ``best`` (Lightning's keywords).
        trust_checkpoint: load a ``ckpt_path`` that holds pickled Python objects (their
            loading can run any code: only for a file from a trusted source).
    """

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None,
        ckpt_path: str | None = None, trust_checkpoint: bool = False) -> None:  # fmt: skip
        safe = not trust_checkpoint  # weights_only
        super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, safe)

    def validate(self, model=None, dataloaders=None, ckpt_path: str | None = None,
        verbose: bool = True, datamodule=None, trust_checkpoint: bool = False):  # fmt: skip
        safe = not trust_checkpoint
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, safe)

    def test(self, model=None, dataloaders=None, ckpt_path: str | None = None,
        verbose: bool = True, datamodule=None, trust_checkpoint: bool = False):  # fmt: skip
        safe = not trust_checkpoint
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, safe)

    fit.__doc__ = validate.__doc__ = test.__doc__ = __doc__  # the options' help on the console


def run_folder(trainer: pl.Trainer) -> Path:
    """The fit's folder, the parent of ``checkpoints/``: ``save_dir/name/version`` of the first
    logger, else ``default_root_dir`` (as ``ModelCheckpoint`` chooses)."""
    folder, logger = Path(trainer.default_root_dir), trainer.logger
    if logger is None:
        return folder
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(logger.save_dir or folder, str(logger.name), version)


def prepare_wandb(loggers: list) -> None:
    """Each ``WandbLogger`` before its run starts: without the deprecated ``anonymous`` argument
    (Lightning passes it even as None, and W&B warns about any value) and with its ``save_dir``
    made (W&B looks for a git repository there and warns when the folder is missing)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is None:
            if logger._wandb_init.get("anonymous") is None:
                logger._wandb_init.pop("anonymous", None)
            Path(logger.save_dir or ".").mkdir(parents=True, exist_ok=True)


def has_wandb_key(init: Namespace) -> bool:
    """Whether a ``WandbLogger``'s run can start as configured: offline, or an API key found
    (the environment, netrc, W&B's settings; no network asked). Online without a key, W&B
    would stop the command with a traceback once the run starts."""
    offline = ("offline", "dryrun", "disabled")
    if init.get("offline") or init.get("mode") in offline:
        return True
    import wandb
    from wandb.sdk import wandb_setup

    settings = wandb_setup.singleton().settings  # the environment and the settings files
    if settings.mode in offline:
        return True
    try:
        from wandb.sdk.lib import wbauth
    except ImportError:  # W&B before its wbauth module: its internal API's own lookup
        return bool(getattr(getattr(wandb, "api", None), "api_key", None))
    host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
    return bool(wbauth.authenticate_session(host=host, source="topk-smoothing", prompt=False,
                                            update_session=False))  # fmt: skip


class ConfigToLoggers(SaveConfigCallback):
    """``config.yaml`` next to ``checkpoints/``; to the loggers, the config the model resolved."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():  # skip_none: skip_unset from jsonargparse 4.49 on
            warnings.filterwarnings("ignore", message=r"\s*skip_none")
            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            if stage == "fit":  # beside the checkpoints; validate and test only log it
                folder = run_folder(trainer)
                folder.mkdir(parents=True, exist_ok=True)
                self.parser.save(self.config, folder / self.config_filename, skip_none=False,
                                 overwrite=True)  # fmt: skip
        init_args = config.get("model", {}).get("init_args") or {}
        init_args.update({key: value for key, value in pl_module.hparams.items()  # resolved
                          if value is not None and (key in LINKED_FROM_DATA
                                                    or init_args.get(key, 0) is None)})  # fmt: skip
        for each in trainer.loggers:
            each.log_hyperparams(config)


class TopkLightningCLI(LightningCLI):
    """LightningCLI over ``NoisyClassifier`` and our datamodules that raises instead of exiting."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs = {
            "model_class": NoisyClassifier, "datamodule_class": ImageClassificationDataModule,
            "subclass_mode_model": True, "subclass_mode_data": True,
            "save_config_callback": ConfigToLoggers, "trainer_class": SafeTrainer,
            "save_config_kwargs": {"save_to_log_dir": False}, **kwargs,
            "parser_kwargs": {"prog": "topk-smoothing", "exit_on_error": False,
                              **kwargs.get("parser_kwargs", {})},
        }  # fmt: skip
        super().__init__(args=args, run=run, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:  # Lightning's, but predict
        return {key: skip for key, skip in LightningCLI.subcommands().items() if key != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in LINKED_FROM_DATA:
            parser.link_arguments(f"data.{key}", f"model.init_args.{key}", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=False,
                            help="fit only: test the best checkpoint (or the final weights) "
                            "when training ends")  # fmt: skip

    def read_checkpoint(self, path: str, trust: bool) -> Any:
        return torch.load(path, map_location="cpu", weights_only=not trust)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse; read a local ``ckpt_path`` once: its hyperparameters replace the config's."""
        parse = parser.parse_object if isinstance(args, (dict, Namespace)) else parser.parse_args
        self.config = parse(args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if type(seed := config.get("seed_everything")) is int and not 0 <= seed < 2**32:
            raise UsageError(f"seed_everything must lie in 0 .. 2**32 - 1, got {seed}")
        self.ckpt_path, self.checkpoint, self.notes, self.continued_runs = None, None, [], []
        path = config.get("ckpt_path")  # a local file: not one of Lightning's keywords or a URL
        if not path or path in ("last", "best", "hpc", "registry") or path.startswith("registry:") \
                or "://" in path:  # fmt: skip
            return
        self.ckpt_path, self.checkpoint = path, self.read_checkpoint(path, config.trust_checkpoint)
        hparams = isinstance(self.checkpoint, dict) and self.checkpoint.get("hyper_parameters")
        hparams = {key: value for key, value in (hparams or {}).items() if key != "_instantiator"}
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        if hparams:
            old = config.model.init_args.clone()
            try:
                self.config = parser.parse_object({subcommand: {"model": hparams}}, self.config)
            except ArgumentError as err:
                message = f"checkpoint {path!r}: its hyperparameters: {one_line(err)}"
                raise UsageError(message) from None
            new = self.config[subcommand].model.init_args
            changes = [f"model.{key} {old.get(key)!r} -> {new.get(key)!r}" for key in
                       ("arch", "sigma", "loss") if old.get(key) != new.get(key)]  # fmt: skip
            if changes:
                self.notes.append("the checkpoint's hyperparameters replace the config's: "
                                  + ", ".join(changes))  # fmt: skip
        self.config[subcommand].ckpt_path = None
        run = Path(path).resolve().parent  # <save_dir>/<project>/<id>/checkpoints
        loggers = self.config.fit.trainer.get("logger") if subcommand == "fit" else None
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = getattr(logger, "init_args", None)  # a WandbLogger without an id continues
            wandb = init is not None and str(logger.class_path).endswith("WandbLogger")
            project = run.parent.parent.name if run.name == "checkpoints" else None
            if wandb and not init.get("id") and (init.project or "lightning_logs") == project:
                init.id, init.resume = run.parent.name, "allow"
                self.continued_runs.append(init)

    def before_instantiate_classes(self) -> None:
        if self.ckpt_path is not None:
            self.config[self.config.subcommand].ckpt_path = self.ckpt_path
        loggers = self._get(self.config, "trainer").get("logger")
        self.offline = []  # the W&B loggers' save_dir, in order, that log offline for want of a key
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = getattr(logger, "init_args", None)
            if init is not None and str(logger.class_path).endswith("WandbLogger"):
                self.offline.append(None if has_wandb_key(init) else init.get("save_dir") or ".")
        if any(folder is not None for folder in self.offline):
            folder = next(folder for folder in self.offline if folder is not None)
            self.notes.append("no W&B API key (`wandb login`): logging offline; upload later with "
                              f"`wandb sync {folder}/wandb/offline-run-*`")  # fmt: skip

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except UsageError:
            raise
        except USER_ERRORS as err:  # jsonargparse wraps the error of a class's __init__
            raise UsageError(one_line(innermost(err, USER_ERRORS))) from err

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        for init_args in self.continued_runs:  # the logger holds the id: a new run's config
            init_args.id = init_args.resume = None
        if dropped := getattr(self.model, "dropped_top_k", ()):
            self.notes.append(f"model.top_k {', '.join(map(str, dropped))} dropped: the data has "
                              f"{self.model.num_classes} classes (accuracies for k = "
                              f"{', '.join(map(str, self.model.top_k))})")  # fmt: skip
        prog = " ".join(filter(None, ["topk-smoothing", self.config.get("subcommand")]))
        for note in self.notes if rank_zero_only.rank == 0 else []:
            print(f"{prog}: note: {note}", file=sys.stderr)
        logger = self._get(self.config_init, "trainer").get("logger")
        if self.subcommand == "fit" and logger is not None and not logger:  # its own folder
            kwargs.setdefault("default_root_dir", self.fit_folder())
        trainer = super().instantiate_trainer(**kwargs)
        wandb = [each for each in trainer.loggers if isinstance(each, WandbLogger)]
        for each, folder in zip(wandb, self.offline, strict=False):
            if folder is not None:  # wandb.init's argument; the saved config is left as it was
                each._wandb_init["mode"] = "offline"
        unused = []
        if trainer.logger is None:  # nothing to log the learning rate to: it would stop the fit
            unused.append(LearningRateMonitor)
        saved = self.checkpoint.get("callbacks", {}) if isinstance(self.checkpoint, dict) else {}
        for callback in trainer.checkpoint_callbacks if self.subcommand != "fit" else []:
            folder = saved.get(callback.state_key, {}).get("dirpath")  # saves nothing here:
            callback.dirpath = folder or callback.dirpath  # its state restores without a warning
        trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, tuple(unused))]
        return trainer

    def fit_folder(self) -> str:
        """A logger-less fit's folder: the folder of the checkpoint it resumes
        (``<folder>/checkpoints/last.ckpt``); with ``ckpt_path`` ``last`` or ``hpc``, the latest
        ``fit-*`` folder; in a SLURM job (requeued ones too), ``fit-slurm<job id>``; else a new
        ``<default_root_dir>/fit-<date>-<time>[-n]``. The processes that DDP launches from this
        one read it from the environment variable ``FIT_FOLDER`` names."""
        resumed = Path(self.ckpt_path or ".").parent
        if resumed.name == "checkpoints":
            return str(resumed.parent)
        if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(FIT_FOLDER):
            return os.environ[FIT_FOLDER]  # a process that rank 0 launched
        root = Path(self.config_init.fit.trainer.get("default_root_dir") or ".")
        earlier = [each for each in root.glob("fit-*") if each.is_dir()]
        if job := os.environ.get("SLURM_JOB_ID"):
            folder = root / f"fit-slurm{job}"
        elif self.config.fit.get("ckpt_path") in ("last", "hpc") and earlier:
            folder = max(earlier, key=lambda each: each.stat().st_mtime)
        else:
            stamp = time.strftime("fit-%Y%m%d-%H%M%S")
            folder, n = root / stamp, 0
            while folder.exists():
                n += 1
                folder = root / f"{stamp}-{n}"
        os.environ[FIT_FOLDER] = str(folder)
        return str(folder)

    def check_before_run(self, stage: str) -> None:
        """Before a logger starts a run: check the certification callbacks, set up the data."""
        for callback in [c for c in self.trainer.callbacks if isinstance(c, CertificationCallback)]:
            callback.check_module(self.model)
        if self.datamodule is not None:
            self.datamodule.prepare_data()
            self.datamodule.setup(stage)
        prepare_wandb(self.trainer.loggers)

    def before_fit(self) -> None:
        # The optimizer and its schedule are built once training starts: build them now.
        try:
            optimizer = self.model.optimizer_factory(self.model.parameters())
            if self.model.lr_scheduler_factory is not None:
                self.model.lr_scheduler_factory(optimizer)
        except (ValueError, TypeError) as err:
            raise UsageError(f"model.optimizer / model.lr_scheduler: {one_line(err)}") from None
        self.check_before_run("fit")

    before_validate = partialmethod(check_before_run, "validate")
    before_test = partialmethod(check_before_run, "test")

    def after_fit(self) -> None:
        if self.config.fit.test_after_fit:  # the first ModelCheckpoint's best, or the weights
            best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best,
                              trust_checkpoint=self.config.fit.trust_checkpoint)  # fmt: skip
        if self.trainer.is_global_zero:  # the first monitored ModelCheckpoint's, else the last
            saving = self.trainer.checkpoint_callbacks
            saving = [c for c in saving if c.monitor] + [c for c in saving if not c.monitor]
            best = next((c.best_model_path for c in saving if c.best_model_path), None)
            print(f"topk-smoothing fit: run folder {run_folder(self.trainer)}; best checkpoint "
                  f"{best or 'none (no checkpoint saved)'}")  # fmt: skip
