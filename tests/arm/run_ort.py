"""Run an .ort model on a saved batch with ONNX Runtime; executed by the aarch64 Python under qemu-user."""

import platform
import sys

import numpy as np
import onnxruntime as ort

model, inputs, outputs = sys.argv[1:4]
options = ort.SessionOptions()
options.intra_op_num_threads = 1  # emulated threads only add scheduling noise
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
inp = session.get_inputs()[0]
x = np.load(inputs)
step = inp.shape[0] if isinstance(inp.shape[0], int) else len(x)
y = np.concatenate([session.run(None, {inp.name: x[i : i + step]})[0] for i in range(0, len(x), step)])
np.save(outputs, y)
print(platform.machine(), ort.__version__)
