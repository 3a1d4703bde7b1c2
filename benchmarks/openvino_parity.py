"""Per-stage parity of the OpenVINO engine (fp32, bf16, auto) against the eager PyTorch fp32 reference.

    python benchmarks/openvino_parity.py [--work-dir /tmp/medsr-bench] [--out benchmarks/results/openvino-parity.json]

Uses the random-weight bundles medsr-bench exported (default and latentsr-medvae-4x3), the benchmark's LR volume
(2 slices of 64 x 64), 10 steps and the seed 0. Random weights are a harsh case: trained networks have smaller
activations and usually lose less to bf16.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medsr.bench.run import ensure_bundle
from medsr.bench.stages import write_test_volume
from medsr.engine.openvino import open_openvino_sessions
from medsr.engine.pipeline import LatentSRPipeline, SamplingOptions
from medsr.eval.parity import DEFAULT_THRESHOLDS_DB, compare_pipelines
from medsr.export.reference import open_torch_sessions
from medsr.io.nifti import load_nifti
from medsr.io.normalize import fit_window, normalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/medsr-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/openvino-parity.json"))
    parser.add_argument("--presets", nargs="+", default=["default", "latentsr-medvae-4x3"])
    args = parser.parse_args()
    volume = load_nifti(write_test_volume(args.work_dir / "lr_64_2.nii.gz", 64, 2)).data
    lr = normalize(volume.transpose(2, 0, 1), fit_window(volume))[0]
    options = SamplingOptions(steps=10, seed=0, batch_size=2, consistency="kspace")
    results = {}
    for preset in args.presets:
        bundle = ensure_bundle(preset, args.work_dir)
        reference = LatentSRPipeline(bundle, open_torch_sessions(bundle))
        for precision in ("fp32", "bf16", "auto"):
            sessions = open_openvino_sessions(bundle, precision)
            threshold = DEFAULT_THRESHOLDS_DB["fp32" if precision == "fp32" else "bf16"]
            report = compare_pipelines(LatentSRPipeline(bundle, sessions), reference, lr, options, threshold)
            chosen = {name: session.providers[0] for name, session in sessions.items()}
            results[f"{preset}/{precision}"] = {"sessions": chosen, **report.to_dict()}
            stages = ", ".join(f"{s.stage} {s.psnr_db:.1f}" for s in report.stages)
            print(f"{preset} openvino {precision}: passed={report.passed} [{stages}] {chosen}", flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
