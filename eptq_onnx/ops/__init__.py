"""The op registry: what every stage knows about each ONNX op type."""
