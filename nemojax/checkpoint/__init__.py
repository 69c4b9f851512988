"""Checkpoints: Hub safetensors and Orbax readers, the format dispatch (`loading`), conversion and safe writing."""
