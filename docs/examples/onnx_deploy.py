"""Export a layer with FastRPB to ONNX and run it in ONNX Runtime from a NumPy-only process.

Nothing is trained: the script builds a causal ``fastrpb.torch.LinearAttention``
with SIKF features and a FastRPB term, exports it with
``torch.onnx.export(..., dynamo=True)`` at one sequence length with a dynamic batch
dimension, then starts a second Python process that imports only NumPy and ONNX
Runtime (it checks that PyTorch and fastrpb are not loaded), runs the graph on a
batch of another size and saves the output. Back here the output is compared with
the eager layer. Needs the ``torch`` and ``export`` extras
(``pip install -e '.[torch,export]'``).

Run:  python docs/examples/onnx_deploy.py           (L = 1024 tokens)
      python docs/examples/onnx_deploy.py --tiny    (what the tests run)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import fastrpb.torch as frt

# The deployment side: a separate process with NumPy and ONNX Runtime only.
RUNTIME = """
import sys
import numpy as np
import onnxruntime as ort

model, inputs, outputs = sys.argv[1:]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
x = np.load(inputs)
(y,) = session.run(None, {session.get_inputs()[0].name: x})
np.save(outputs, y)
loaded = sorted(m for m in ("torch", "fastrpb", "jax") if m in sys.modules)
print(f"ONNX Runtime {ort.__version__}: input {x.shape} -> output {y.shape}; also loaded: {loaded or 'nothing else'}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes: what the tests run")
    args = parser.parse_args()
    d_model, heads, L = (16, 2, 32) if args.tiny else (256, 8, 1024)

    # 1. A layer (random weights: nothing is trained here), in eval mode.
    torch.manual_seed(0)
    layer = frt.LinearAttention(d_model, heads, feature_map="sikf", rpb=L, causal=True).eval()

    # 2. Export at one length L with a dynamic batch: the example has batch 2.
    example = torch.randn(2, L, d_model)
    batch = torch.export.Dim("batch")
    onnx_program = torch.onnx.export(
        layer, (example,), dynamo=True, dynamic_shapes=({0: batch},), opset_version=18, verbose=False
    )
    ops = sorted({node.op_type for node in onnx_program.model_proto.graph.node})
    print(f"exported: opset 18, {len(onnx_program.model_proto.graph.node)} nodes, DFT in the graph: {'DFT' in ops}")

    with tempfile.TemporaryDirectory() as tmp:
        model, inputs, outputs = Path(tmp, "layer.onnx"), Path(tmp, "x.npy"), Path(tmp, "y.npy")
        onnx_program.save(str(model))

        # 3. Run it elsewhere, on a batch of 3, in a process without PyTorch.
        x = np.random.default_rng(1).standard_normal((3, L, d_model)).astype(np.float32)
        np.save(inputs, x)
        run = subprocess.run(
            [sys.executable, "-c", RUNTIME, str(model), str(inputs), str(outputs)],
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode:
            sys.exit(f"the ONNX Runtime process failed:\n{run.stderr}")
        print(run.stdout.strip())
        y = np.load(outputs)

    # 4. Compare with the eager layer.
    with torch.no_grad():
        eager = layer(torch.from_numpy(x)).numpy()
    error = float(np.max(np.abs(y - eager)) / np.max(np.abs(eager)))
    print(f"max |ONNX Runtime - eager| / max |eager| = {error:.1e}")
    if error > 1e-4:
        sys.exit("ONNX Runtime and eager PyTorch disagree")


if __name__ == "__main__":
    main()
