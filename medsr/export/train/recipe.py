"""``medsr-train recipe default``: the one command that reproduces the bundled default model.

VAE on HR crops of every training source (Colin27 outside the held-out slab, the two radiographs: an autoencoder
does not care how LR was made), then the denoiser on k-space pairs of the MRI training sources only (the model's
task, and the degradation its manifest declares) plus one contrast-remapped copy of each slice (medsr.data.augment),
export to a validated bundle, and the held-out table (medsr.export.train.evaluate). Budget: 45 minutes on 2 CPU
cores; measured about 23 minutes (docs/default_model.md has the timings).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medsr.bundle.manifest import THROUGH_PLANE
from medsr.data.pairs import source_slices
from medsr.data.sources import check_disjoint, default_split
from medsr.errors import InputError
from medsr.export.presets import get_preset
from medsr.export.train.denoiser import DenoiserConfig, train_denoiser
from medsr.export.train.evaluate import evaluate_bundle, markdown_table
from medsr.export.train.loop import LoopConfig
from medsr.export.train.vae import VAE_WEIGHTS, VaeConfig, train_vae


@dataclass(frozen=True)
class Recipe:
    """Everything the default model's training depends on besides the data and the preset."""

    preset: str = "default"
    vae_loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            steps=300, batch_size=16, lr=1e-3, min_lr=1e-5, warmup_steps=30, ema_decay=0.99, checkpoint_every=100
        )
    )
    vae: VaeConfig = field(default_factory=lambda: VaeConfig(crop=64, kl_weight=1e-6))
    denoiser_loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(
            steps=1500, batch_size=16, lr=6e-4, min_lr=1e-5, warmup_steps=100, ema_decay=0.995, checkpoint_every=100
        )
    )
    denoiser: DenoiserConfig = field(
        default_factory=lambda: DenoiserConfig(pairs=4096, crop=48, loss="l2", terminal_fraction=0.5, contrast_copies=1)
    )


#: The bundled through-plane model (docs/through_plane_model.md): the default's VAE recipe on the 8-channel VAE,
#: then one denoiser for factors 2 to 6 on thick-slice crops of the MRI training planes of every orientation.
THROUGH_PLANE_RECIPE = Recipe(
    preset="through-plane",
    vae_loop=LoopConfig(
        steps=2000, batch_size=16, lr=2e-3, min_lr=1e-5, warmup_steps=50, ema_decay=0.995, checkpoint_every=200
    ),
    denoiser_loop=LoopConfig(
        steps=3000, batch_size=16, lr=1e-3, min_lr=1e-5, warmup_steps=100, ema_decay=0.995, checkpoint_every=100
    ),
    denoiser=DenoiserConfig(pairs=4000, crop=64, loss="l2", terminal_fraction=0.5, contrast_copies=1),
)

RECIPES = {"default": Recipe(), "through-plane": THROUGH_PLANE_RECIPE}


def run_recipe(
    name: str,
    out_dir: Path,
    bundle_dir: Path,
    resume: bool,
    overwrite: bool,
    progress: bool,
    heldout: Callable[[Path, Path, tuple[int, ...]], tuple[dict, str]] | None = None,
) -> dict:
    """Train, export and evaluate recipe ``name`` in ``out_dir``; the bundle goes to ``bundle_dir``. A stage whose
    output exists is skipped when resuming; an interrupted stage continues from its last checkpoint.

    ``heldout(bundle_dir, report_dir, factors)`` evaluates a through-plane bundle on held-out volumes (``medsr-train
    recipe`` passes ``medsr-eval through-plane``), giving (results, markdown table); in-plane recipes are evaluated
    slice by slice here (medsr.export.train.evaluate)."""
    from medsr.export.builder import build_models
    from medsr.export.onnx import export_bundle

    recipe = RECIPES[name]
    preset = get_preset(recipe.preset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = default_split()
    check_disjoint(split["train"], split["heldout"])
    note = {part: [s.name for s in sources] for part, sources in split.items()}
    timings = {}
    started = time.perf_counter()
    percentiles = (preset.intensity["low"], preset.intensity["high"])
    all_slices = [s for source in split["train"] for s in source_slices(source, percentiles)]
    mri_slices = [s for s in all_slices if s.modality == "mri"]
    vae_weights = out_dir / "vae" / VAE_WEIGHTS
    if not (resume and vae_weights.is_file()):
        vae_resume = resume and (out_dir / "vae" / "checkpoint").exists()
        train_vae(
            out_dir / "vae",
            preset,
            all_slices,
            recipe.vae_loop,
            recipe.vae,
            device,
            resume=vae_resume,
            progress=progress,
            data_note=json.dumps(note),
        )
    timings["vae_s"] = time.perf_counter() - started
    weights = out_dir / "denoiser" / "weights.safetensors"
    if not (resume and weights.is_file()):
        train_denoiser(
            out_dir / "denoiser",
            preset,
            vae_weights,
            mri_slices,
            recipe.denoiser_loop,
            recipe.denoiser,
            device,
            resume=resume and (out_dir / "denoiser" / "checkpoint").exists(),
            progress=progress,
            data_note=json.dumps(note),
        )
    timings["denoiser_s"] = time.perf_counter() - started - timings["vae_s"]
    vae, unet, provenance = build_models(preset, str(weights))
    provenance.update({"recipe": f"medsr-train recipe {name}", "training_data": note, "recipe_config": asdict(recipe)})
    notice = bundle_dir / "NOTICE"
    kept = notice.read_text() if notice.is_file() else None  # export replaces the directory: keep the data notice
    export_bundle(vae, unet, preset, bundle_dir, provenance, overwrite=overwrite)
    if kept is not None:
        notice.write_text(kept)
    timings["train_and_export_s"] = time.perf_counter() - started
    if preset.plane == THROUGH_PLANE:
        if heldout is None:
            raise InputError(f"recipe {name}: a through-plane model needs its held-out evaluation (heldout=...)")
        results, table = heldout(bundle_dir, out_dir / "heldout", preset.trained_scales)
    else:
        results = evaluate_bundle(bundle_dir, split["heldout"])
        table = markdown_table(results)
    timings["total_s"] = time.perf_counter() - started
    summary = {"recipe": name, "timings": timings, "heldout": results, "threads": torch.get_num_threads()}
    (out_dir / "heldout.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "heldout.md").write_text(table)
    return summary
