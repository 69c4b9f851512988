"""Training data: sources of fixed-length token sequences and the grain pipeline over them."""
