"""Seconds per 1 mm brain volume of ``medsr-infer --through-plane``, end to end, on a whole simulated acquisition.

Colin27 (181 x 217 x 181 at 1 mm, Debian ``mricron-data``) is made into thick axial slices with the acquisition
model of medsr.degrade (Gaussian slice profile of FWHM = the slice spacing, one slice every s mm, for each
``--factor``), written as NIfTI, and super-resolved by the real command line in a fresh process per run (load,
read, both orientations, fusion, projection onto the measured slices, write), engines interleaved (repeat 1:
every factor and engine; repeat 2: again ...). The figures are medians of the wall times. Colin27 is the subject
the bundled model was trained on (outside the held-out slab): these runs measure time, not fidelity.

    python benchmarks/through_plane.py --factor 4 --engine ort --repeats 3 --threads 2 --tag through-plane-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medsr.bench.machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def thick_slices(truth_path: Path, factor: int, out: Path) -> tuple[int, ...]:
    """Write ``truth_path``'s thick axial slices at ``factor`` to ``out``; the shape written."""
    import nibabel as nib

    from medsr.degrade import ThickSlices

    image = nib.load(truth_path)
    data = np.asarray(image.dataobj, np.float32)
    keep = data.shape[2] - data.shape[2] % factor
    start = (data.shape[2] - keep) // 2
    data = data[:, :, start : start + keep]
    lr = ThickSlices(factor, 2, "gaussian", float(factor)).forward(data).astype(np.float32)
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, 2] * (start + (factor - 1) / 2)
    affine[:3, 2] *= factor
    nib.save(nib.Nifti1Image(lr, affine), out)
    return lr.shape


def run_once(lr: Path, out: Path, engine: str, threads: int, model: str | None) -> float:
    """Wall seconds of one ``medsr-infer --through-plane`` process."""
    command = [str(Path(sys.executable).parent / "medsr-infer"), str(lr), "-o", str(out), "--through-plane"]
    command += ["--engine", engine, "--threads", str(threads), "--overwrite"]
    if model:
        command += ["--model", model]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def main() -> None:
    from medsr.data.sources import default_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=int, action="append")
    parser.add_argument("--engine", action="append")
    parser.add_argument("--model", help="Through-plane bundle (default: the bundled one).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tag")
    args = parser.parse_args()
    factors, engines = args.factor or [4], args.engine or ["ort"]
    colin = next(s for s in default_split()["heldout"] if s.name == "colin27-slab").path
    rows: dict[str, list[float]] = {}
    shapes = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for factor in factors:
            shapes[factor] = thick_slices(colin, factor, work / f"thick_x{factor}.nii.gz")
        for _ in range(args.repeats):
            for factor in factors:
                for engine in engines:
                    lr = work / f"thick_x{factor}.nii.gz"
                    seconds = run_once(lr, work / "sr.nii.gz", engine, args.threads, args.model)
                    rows.setdefault(f"x{factor} {engine}", []).append(seconds)
                    print(f"x{factor} {engine}: {seconds:.1f} s", flush=True)
    load = os.getloadavg()
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load": load},
        "threads": args.threads,
        "model": args.model or "bundled through-plane",
        "thick_shapes": {f"x{f}": list(s) for f, s in shapes.items()},
        "seconds": rows,
        "median_s": {key: statistics.median(values) for key, values in rows.items()},
    }
    lines = ["| run | thick slices | median s per volume | runs |", "|---|---|---|---|"]
    for key, values in rows.items():
        factor = int(key.split()[0][1:])
        shape = "x".join(map(str, shapes[factor]))
        lines.append(f"| {key} | {shape} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    table = "\n".join(lines) + f"\n\nthreads {args.threads}, load average after {load[0]:.1f}\n"
    print(table)
    if args.tag:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"{args.tag}.md").write_text(table)


if __name__ == "__main__":
    main()
