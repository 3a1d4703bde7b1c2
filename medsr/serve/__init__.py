"""Serving medsr on Triton Inference Server (docs/serving.md): one Python-backend model that runs the whole sampler
loop in-process on medsr's engine.

- :mod:`medsr.serve.service`: the request contract (LR planes in the input's units, parameters steps, seed,
  consistency, first_index, window) and the batching of many requests into one engine run, per-plane seeded.
- :mod:`medsr.serve.repository`: a Triton model repository from a bundle (``medsr-export --triton DIR``).
- :mod:`medsr.serve.local`: that repository on the tritonserver that PyTriton bundles (``medsr-serve``).

Torch-free: imports medsr.engine, medsr.io, medsr.bundle, medsr.degrade and medsr.errors only; the Triton pieces
(PyTriton, tritonclient, triton_python_backend_utils) are imported where they are used.
"""
