"""Tasks plug into the one training loop: image (Stable Diffusion) and, later, text (causal LMs)."""
