"""Floating-point work of each graph for one slice, counted on the PyTorch modules the graphs were exported from."""

from __future__ import annotations

from medsr.engine.profiles import graph_input_shapes


def graph_flops(bundle, lr_height: int, lr_width: int) -> dict[str, float]:
    """FLOPs of one slice (batch 1) through each graph at an LR size: {graph name: flops}.

    Counted by torch.utils.flop_counter: 2 flops per multiply-add of convolutions and matrix products (attention
    included); normalizations, activations and resampling are not counted, so achieved GFLOP/s are a lower bound.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medsr.export.models import graph_modules
    from medsr.export.reference import load_reference_models

    modules = graph_modules(*load_reference_models(bundle), bundle.conditioning)
    shapes = graph_input_shapes(bundle, 1, lr_height, lr_width)
    flops = {}
    for name, module in modules.items():
        args = [torch.zeros(shape) for shape in shapes[name].values()]
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(*args)
        flops[name] = float(counter.get_total_flops())
    return flops
