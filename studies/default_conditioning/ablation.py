"""One row of the default model's conditioning ablation (docs/default_model.md, "What each change bought").

Trains the default recipe's denoiser (the recipe's loop and objective, on its MRI training slices) on a given frozen
VAE with one conditioning variant, exports the bundle and writes the held-out table, as ``medsr-train recipe
default`` does for the shipped variant. About 20 minutes on one CPU thread.

    python studies/default_conditioning/ablation.py --vae runs/default/vae/vae.safetensors \\
        --conditioning zerofill --residual --contrast-copies 1 -o runs/ablation/zf_res_copies
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from medsr.bundle.conditioning import UPSAMPLED, Conditioning
from medsr.data.pairs import source_slices
from medsr.data.sources import default_split
from medsr.export.builder import build_models
from medsr.export.onnx import export_bundle
from medsr.export.presets import get_preset
from medsr.export.train.denoiser import train_denoiser
from medsr.export.train.evaluate import evaluate_bundle, markdown_table
from medsr.export.train.recipe import RECIPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=Path, required=True, help="frozen VAE weights (medsr-train vae output)")
    parser.add_argument("--conditioning", choices=["bilinear", "zerofill"], required=True)
    parser.add_argument("--residual", action="store_true", help="x0 = conditioning latent + the UNet's output")
    parser.add_argument("--contrast-copies", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="denoiser steps (default: the recipe's)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    conditioning = (
        Conditioning(residual=args.residual)
        if args.conditioning == "bilinear"
        else Conditioning(UPSAMPLED, "zerofill", residual=args.residual)
    )
    preset = dataclasses.replace(get_preset("default"), conditioning=conditioning)
    recipe = RECIPES["default"]
    loop = dataclasses.replace(recipe.denoiser_loop, steps=args.steps or recipe.denoiser_loop.steps)
    objective = dataclasses.replace(recipe.denoiser, contrast_copies=args.contrast_copies)
    split = default_split()
    percentiles = (preset.intensity["low"], preset.intensity["high"])
    slices = [s for source in split["train"] for s in source_slices(source, percentiles) if s.modality == "mri"]
    weights = args.out / "denoiser" / "weights.safetensors"
    if not weights.is_file():
        train_denoiser(args.out / "denoiser", preset, args.vae, slices, loop, objective, torch.device("cpu"))
    vae, unet, provenance = build_models(preset, str(weights))
    export_bundle(vae, unet, preset, args.out / "bundle", provenance, overwrite=True)
    results = evaluate_bundle(args.out / "bundle", split["heldout"], threads=1)
    (args.out / "heldout.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "heldout.md").write_text(markdown_table(results))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
