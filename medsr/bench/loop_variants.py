"""Denoiser wrappers that make the pipeline run one particular sampling loop, to compare the loops side by side on
one engine (benchmarks/device_loop.py, and the tests that hold them bit-identical).

medsr.engine.pipeline keeps the latents on the engine's device when the denoiser session has ``bind``
(medsr.engine.device_loop), and on a capturable binding runs whole trajectories as one CUDA graph.
"""

from __future__ import annotations


class HostOnly:
    """A session without ``bind``: the pipeline then loops through the host (every step's sample and output
    cross between host and engine)."""

    def __init__(self, session):
        self.session = session
        self.input_names, self.output_names, self.providers = session.input_names, session.output_names, ("host",)

    def run(self, feeds):
        return self.session.run(feeds)


class StepByStep(HostOnly):
    """A session whose bindings are never captured whole: the device loop then runs step by step (on TensorRT
    the engine alone replayed per step). Give it a session of its own: it changes the bindings it hands out."""

    def bind(self, inputs, outputs):
        binding = self.session.bind(inputs, outputs)
        if binding is not None and hasattr(binding, "capturable"):
            binding.capturable = False
        return binding
