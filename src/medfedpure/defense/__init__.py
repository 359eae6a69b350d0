"""Client-side defense: MAE detector, diffusion purifier, decision rules and the defended classifier."""

from medfedpure.defense.detectors import DisagreementDetector, MAEDetector, ResidualDetector
from medfedpure.defense.diffusion import GaussianDiffusion
from medfedpure.defense.mae import MAEConfig, MaskedAutoencoder
from medfedpure.defense.pipeline import DefendedClassifier, DefenseOutput, DefenseSettings
from medfedpure.defense.trainer import PHASES, build_diffusion, build_mae
from medfedpure.defense.unet import UNet, UNetConfig

__all__ = ["DefendedClassifier", "DefenseOutput", "DefenseSettings", "DisagreementDetector", "GaussianDiffusion",
           "MAEConfig", "MAEDetector", "MaskedAutoencoder", "PHASES", "ResidualDetector", "UNet", "UNetConfig",
           "build_diffusion", "build_mae"]
