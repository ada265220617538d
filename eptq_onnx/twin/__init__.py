"""The differentiable torch twin of the QDQ graph: op modules, conversion, fake quantizers."""
