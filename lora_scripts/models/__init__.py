"""Model formats beyond diffusers folders: the original LDM/SGM naming (``ldm``), reading single-file checkpoints
safely (``checkpoint_file``) and loading A1111-style single files as pipeline components (``single_file``); and how
a frozen base is stored quantised (``quantize``: ``base_quantization``)."""
