"""Where quantizers go: quantization points, shared scales, range rules, deployment targets."""
