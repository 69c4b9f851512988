"""Pallas kernels (TPU and GPU). Each kernel has a pure-JAX twin in `nemojax/ops/` that tests compare against."""
