"""Degradation operators of medsr (HR -> LR), their adjoints, the fair baselines and data consistency.

NumPy only: the torch-free engine uses this package for its data-consistency step. One geometry everywhere:
LR pixel i sits on HR pixel centre s*i + (s-1)/2 (REFERENCE.md section 7). ``matrices`` builds the one-axis
matrices, ``operators`` the operators A with A^T, ``consistency`` the baselines and the consistency steps.
"""

from medsr.degrade.consistency import (
    BASELINES,
    backproject,
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

__all__ = [
    "BASELINES",
    "OPERATORS",
    "SCALES",
    "AreaAverage",
    "BicubicDownsample",
    "Degradation",
    "KSpaceTruncation",
    "LanczosDownsample",
    "backproject",
    "consistency_residual",
    "degradation_from_dict",
    "kspace_consistency",
    "make_degradation",
    "upsample_baseline",
]
