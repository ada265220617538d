"""Initial quantizers: the numeric quantizers and the weight initialization."""
