"""Reading, normalizing and folding the float graph; tensor storage; onnxruntime sessions."""
