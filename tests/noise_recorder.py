"""A ``NoisyClassifier`` that keeps the training noise it adds, for the multi-process tests.

``topk-smoothing fit --model noise_recorder.RecordingClassifier ...`` (with ``tests/`` on the
Python path) writes ``noise-rank{r}-epoch{e}.pt`` into the trainer's ``default_root_dir`` at
the end of every training epoch: the list of noise tensors that process added, in order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_modules import NoisyClassifier


class RecordingClassifier(NoisyClassifier):
    def add_noise(self, x: torch.Tensor) -> torch.Tensor:
        noisy = super().add_noise(x)
        if self.training:
            self.__dict__.setdefault("recorded", []).append((noisy - x).detach().cpu())
        return noisy

    def on_train_epoch_end(self) -> None:
        name = f"noise-rank{self.global_rank}-epoch{self.current_epoch}.pt"
        torch.save(self.__dict__.pop("recorded", []), Path(self.trainer.default_root_dir, name))
