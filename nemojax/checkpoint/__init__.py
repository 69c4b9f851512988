"""Checkpoint layouts: the Hugging Face name table (`hf_names`) and readers built on it."""
