"""The image task: captioned images -> a LoRA for the denoiser of any model family in ``families/``."""

from .objectives import min_snr_weights
from .task import ImageTask, LoRANetwork

__all__ = ["ImageTask", "LoRANetwork", "min_snr_weights"]
