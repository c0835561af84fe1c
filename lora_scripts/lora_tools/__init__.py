"""``lora-scripts lora …``: inspect, convert, resize, merge and extract LoRA files of any layout we write or read
(kohya, LyCORIS, diffusers, PEFT). See docs/lora-tools.md."""
