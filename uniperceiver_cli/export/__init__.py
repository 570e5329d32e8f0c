"""Export and conversion: bundles, released-checkpoint conversion, expert folding, torch.export and ONNX.

`bundle.py` writes and checks the safetensors bundle, `convert.py` turns released reference files into bundles,
`fold.py` folds segment-routed experts into per-key dense weights for one task, `torch_export.py` and `onnx.py`
export the inference entry points (`entry.py`), and `verify.py` holds the comparison helpers. Importing this
package does not import torch; the submodules do (except `errors.py`).
"""
