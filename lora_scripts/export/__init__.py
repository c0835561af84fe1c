"""LoRA file formats the ecosystem loads."""
