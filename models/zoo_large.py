"""A large-but-simple model written straight to disk with external data, for the scale tests.

Not in ``zoo.ZOO``: it is a file (plus its weights file), generated layer by layer so that the
builder itself never holds more than one weight matrix in memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper



def matmul_chain(folder: Path, width: int = 4096, hidden: int = 16384, layers: int = 9, name: str = "big") -> Path:
    """``layers`` MatMul -> Relu blocks alternating width -> hidden -> width, float32 weights in
    "<name>.onnx.data" (defaults: ~2.4 GB); returns the path of "<name>.onnx" in ``folder``."""
    rng = np.random.default_rng(0)
    data_name = f"{name}.onnx.data"
    nodes, inits, x, offset = [], [], "x", 0
    with open(folder / data_name, "wb") as data:
        for i in range(layers):
            fan_in, fan_out = (width, hidden) if i % 2 == 0 else (hidden, width)
            raw = (rng.standard_normal((fan_in, fan_out), dtype=np.float32) / np.float32(np.sqrt(fan_in))).tobytes()
            data.write(raw)
            init = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[fan_in, fan_out])
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                init.external_data.add(key=key, value=value)
            init.data_location = TensorProto.EXTERNAL
            inits.append(init)
            offset += len(raw)
            del raw
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
            x = f"r{i}"
    out_dim = width if layers % 2 == 0 else hidden
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", out_dim])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = folder / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return path
