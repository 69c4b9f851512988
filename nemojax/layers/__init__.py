"""Flax Linen layers, one file per concern."""
