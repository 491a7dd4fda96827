"""Training: the noise-augmented LightningModule, the model registry and the LightningCLI."""

from lightning_modules.models import MODELS, NormalizeLayer, build_backbone, build_network
from lightning_modules.module import NoisyClassifier

__all__ = ["MODELS", "NoisyClassifier", "NormalizeLayer", "build_backbone", "build_network"]
