"""Mixed precision: per-layer sensitivities and the bit-width search."""
