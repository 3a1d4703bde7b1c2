"""Degradation operators of medsr (HR -> LR), their adjoints, the fair baselines and data consistency.

NumPy only: the torch-free engine uses this package for its data-consistency step. One geometry everywhere:
LR pixel i sits on HR pixel centre s*i + (s-1)/2 (docs/conventions.md). ``matrices`` builds the one-axis
matrices, ``operators`` the operators A with A^T, ``consistency`` the baselines and the consistency steps.
``slices`` is the 2D multi-slice acquisition along one axis, its exact data consistency and slice-axis baselines.
"""

from medsr.degrade.consistency import (
    BASELINES,
    CONSISTENCY_MODES,
    apply_consistency,
    backproject,
    check_consistency,
    consistency_residual,
    kspace_consistency,
    upsample_baseline,
)
from medsr.degrade.operators import (
    OPERATORS,
    SCALES,
    AreaAverage,
    BicubicDownsample,
    Degradation,
    KSpaceTruncation,
    LanczosDownsample,
    degradation_from_dict,
    make_degradation,
)
from medsr.degrade.slices import (
    SLICE_BASELINES,
    SLICE_PROFILES,
    SliceProfile,
    ThickSlicePlanes,
    ThickSlices,
    upsample_slices,
)

__all__ = [
    "BASELINES",
    "CONSISTENCY_MODES",
    "OPERATORS",
    "SCALES",
    "SLICE_BASELINES",
    "SLICE_PROFILES",
    "AreaAverage",
    "BicubicDownsample",
    "Degradation",
    "KSpaceTruncation",
    "LanczosDownsample",
    "SliceProfile",
    "ThickSlicePlanes",
    "ThickSlices",
    "apply_consistency",
    "backproject",
    "check_consistency",
    "consistency_residual",
    "degradation_from_dict",
    "kspace_consistency",
    "make_degradation",
    "upsample_baseline",
    "upsample_slices",
]
