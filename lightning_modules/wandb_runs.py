"""The W&B run of a command: a resumed fit continues its run; a start-up mistake leaves none.

- :func:`continue_run`: ``fit --ckpt_path SAVE_DIR/PROJECT/ID/checkpoints/last.ckpt`` gives the
  W&B logger ``id=ID``, so the run keeps its folder (and ModelCheckpoint its best score) and
  its W&B run.
- :func:`discard_new_wandb_run`: a run that the command started before a start-up mistake
  stopped it is finished, and removed when it is offline and logged nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
from pathlib import Path
from typing import Any


def _wandb_logger_args(trainer_config: Any) -> list[Any]:
    """The ``init_args`` of the trainer config's WandbLoggers."""
    loggers = trainer_config.get("logger")
    found = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        class_path = getattr(logger, "class_path", "") or ""
        init_args = getattr(logger, "init_args", None)
        if class_path.endswith("WandbLogger") and init_args is not None:
            found.append(init_args)
    return found


def continue_run(trainer_config: Any, ckpt_path: Path) -> str | None:
    """Give the WandbLogger whose folder holds ``ckpt_path`` that run's id.

    The folder is Lightning's: ``save_dir`` (or its alias ``dir``, else the trainer's
    ``default_root_dir``), then the project (as WandbLogger defaults it), then the id. A logger
    given an id, or a checkpoint from elsewhere, is left alone and starts a new run.

    Returns:
        The run id given (``id`` and ``resume="allow"``), or None. Once the logger exists,
        :func:`forget_run_id` takes it out of the config again, so that the run's saved
        config stays the config of a new run.
    """
    if ckpt_path.parent.name != "checkpoints":
        return None
    run = ckpt_path.resolve().parent.parent
    for init_args in _wandb_logger_args(trainer_config):
        if init_args.get("id") or init_args.get("version"):
            continue
        save_dir = (
            init_args.get("save_dir")
            or init_args.get("dir")
            or trainer_config.get("default_root_dir")
            or "."
        )
        project = init_args.get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs")
        if run.parent == Path(save_dir, project).resolve():
            init_args["id"], init_args["resume"] = run.name, "allow"
            return run.name
    return None


def forget_run_id(trainer_config: Any, run_id: str | None) -> None:
    """Undo :func:`continue_run` in the config (the logger already holds the id)."""
    for init_args in _wandb_logger_args(trainer_config):
        if run_id is not None and init_args.get("id") == run_id:
            init_args["id"] = init_args["resume"] = None


def discard_new_wandb_run(before: Any) -> None:
    """Finish the W&B run started since ``before`` (the run open when the command began), so
    that a start-up mistake's line ends the output; an offline run that logged nothing goes
    with its folder. A run of the caller's is never touched."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None or run is before:
        return
    empty_offline = run.offline and run.step == 0
    folder = Path(run.dir).parent  # <save_dir>/wandb/offline-run-<date>-<id>
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        wandb.finish(exit_code=2)
    if empty_offline and folder.name.startswith("offline-run-"):
        shutil.rmtree(folder, ignore_errors=True)
        for link in folder.parent.iterdir():  # latest-run, debug.log, debug-internal.log
            if link.is_symlink() and str(link.readlink()).startswith(folder.name):
                link.unlink()
