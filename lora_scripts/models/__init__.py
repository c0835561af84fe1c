"""Model formats beyond diffusers folders: original LDM/SGM naming (``ldm``) and A1111-style single-file
checkpoints (``single_file``)."""
