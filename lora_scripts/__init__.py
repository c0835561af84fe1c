"""lora-scripts: config-driven LoRA training for Stable Diffusion and LLMs.

Importing this package is cheap: torch, diffusers and transformers load only when a command needs them.
"""

import logging as _logging

__version__ = "0.1.0"

# With torchao installed (the `quant` extra), transformers and diffusers import it whenever they load, and on a
# machine without its CUDA kernels it logs a "Failed to load ..." line per kernel library, torch a deprecation line
# per enum it registers, and diffusers 0.42 that torchao 0.18 lacks its old tensor classes (only used to read
# checkpoints saved by torchao, which we never load). None of it is actionable for a user, and it would bury the one
# line our errors are; the levels are set before those libraries create the loggers, so their errors still show.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
