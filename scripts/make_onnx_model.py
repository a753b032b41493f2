#!/usr/bin/env python3
"""Writes models/sensor_anomaly.onnx, the small model the ONNX detector's tests and demo use.

It scores generator readings [temp, humidity, pressure, vibration] (float32, shape [N, 4]) by
how far they are from the generator's normal readings:

    z     = (x - mean) / std                  per feature
    d     = sqrt(sum_i w_i * z_i^2)           a weighted standardized distance
    score = sigmoid(d - 4)                    about 0.05 for normal readings, near 1 for anomalies

Output `score`, shape [N, 1]. The batch dimension is symbolic (`N`). Needs the `onnx` package
(`pip install onnx`) only to regenerate the file; Weir reads it with tract, in pure Rust.
"""
import os
import sys

import onnx
from onnx import TensorProto, helper

MEAN = [23.35, 45.0, 1013.0, 0.02]
STD = [1.6, 5.0, 2.0, 0.005]
WEIGHTS = [1.0, 0.25, 0.25, 0.05]
OFFSET = 4.0


def const(name, values, dims):
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name + "_t", TensorProto.FLOAT, dims, values)
    )


def build():
    nodes = [
        const("mean", MEAN, [1, 4]),
        const("std", STD, [1, 4]),
        const("w", WEIGHTS, [4, 1]),
        const("offset", [OFFSET], [1, 1]),
        helper.make_node("Sub", ["readings", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["z"]),
        helper.make_node("Mul", ["z", "z"], ["z2"]),
        helper.make_node("MatMul", ["z2", "w"], ["d2"]),
        helper.make_node("Sqrt", ["d2"], ["d"]),
        helper.make_node("Sub", ["d", "offset"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sensor_anomaly",
        [helper.make_tensor_value_info("readings", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])],
    )
    model = helper.make_model(graph, producer_name="weir", opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "models", "sensor_anomaly.onnx")
    onnx.save(build(), out)
    print(f"wrote {out}")
