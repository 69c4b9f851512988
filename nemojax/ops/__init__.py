"""Pure-JAX sequence operators (the reference twins of the Pallas kernels in `pallas/`)."""
