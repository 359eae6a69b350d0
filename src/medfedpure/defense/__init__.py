"""Client-side defense: MAE detector, diffusion purifier, decision rules and the defended classifier."""

from medfedpure.defense.detectors import DETECTORS, DisagreementDetector, MAEDetector, ResidualDetector, build_detector
from medfedpure.defense.diffusion import GaussianDiffusion
from medfedpure.defense.mae import MaskedAutoencoder
from medfedpure.defense.pipeline import DefendedClassifier, DefenseOutput
from medfedpure.defense.trainer import PHASES, build_diffusion, build_mae
from medfedpure.defense.unet import UNet

__all__ = ["DETECTORS", "DefendedClassifier", "DefenseOutput", "DisagreementDetector", "GaussianDiffusion",
           "MAEDetector", "MaskedAutoencoder", "PHASES", "ResidualDetector", "UNet",
           "build_detector", "build_diffusion", "build_mae"]
