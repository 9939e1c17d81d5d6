"""One module per backend kind; each exposes ``Backend``."""
