"""lora-scripts: config-driven LoRA training for Stable Diffusion and LLMs.

Importing this package is cheap: torch, diffusers and transformers load only when a command needs them.
"""

__version__ = "0.1.0"
