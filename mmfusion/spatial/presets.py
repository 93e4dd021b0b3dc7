"""Registration presets (config ``spatial.preset``) and their overrides.

Plain data, free of ANTs, so that :mod:`mmfusion.config_rules` can check
``spatial.preset`` and ``spatial.registration_overrides`` when the config is loaded;
:mod:`mmfusion.spatial.registration` runs them.
"""
from __future__ import annotations

import copy
from typing import Any

from mmfusion.errors import ConfigError

#: Registration presets. Linear stages use Mattes MI (robust to contrast differences
#: between subject and template); the SyN metric is the main accuracy/speed knob.
#: ``reg_iterations`` lists SyN iterations per level, coarse to fine (ANTsPy sets the
#: shrink factors to 2**(n-1)..1 and the smoothing sigmas to n-1..0 voxels for n levels). ``flatten_sigma_mm``: divide
#: both images by their local mean before registering (None = off); ``crop_margin_mm``: run
#: SyN on the template cropped to its foreground plus this margin, the warp is then padded
#: back to the template grid with zero displacement (None = whole template grid).
PRESETS: dict[str, dict[str, Any]] = {
    # Chosen by measurement (bench/bench_registration.py, docs/registration.md):
    # CC radius 2 on bias-flattened images, SyN levels 8,4,2 (the warp is estimated at 2x the
    # registration voxel = 2.5 mm, the output grid); Mattes at the finest level was far less accurate.
    # SyN runs on the template cropped to its foreground + 10 mm (same accuracy, ~40 % less CPU);
    # Flow sigma 4.5 (not ANTs' usual 3): r +0.03-0.04 and slope +0.01 on every subject measured,
    # same CPU; a smaller flow sigma (2) or a larger gradient step (0.3) lowered r and slope, a
    # total-field sigma of 1 raised r but cost slope.
    "default": {
        "linear_stages": ["Rigid", "Similarity", "Affine"],
        "aff_metric": "mattes",
        "aff_sampling": 32,
        "aff_random_sampling_rate": 0.25,
        "aff_iterations": [500, 250, 100],
        "aff_shrink_factors": [4, 2, 1],
        "aff_smoothing_sigmas": [2, 1, 0],
        "syn_metric": "CC",
        "syn_sampling": 2,
        "reg_iterations": [100, 70, 50, 0],
        "grad_step": 0.2,
        "flow_sigma": 4.5,
        "total_sigma": 0.0,
        "histogram_matching": False,
        "linear_resolution": 2.5,
        "flatten_sigma_mm": 5.0,
        "crop_margin_mm": 10.0,
    },
    # The paper (docs/method.md#8-deviations): CC radius 4, gradient step 0.12, 4 levels
    # (shrink 8,4,2,1 in ANTsPy's SyN stage: 6,4,2,1 is not expressible there),
    # smoothing 3,2,1,0 vox, histogram matching. Expensive: see docs/registration.md.
    "paper": {
        "linear_stages": ["Rigid", "Similarity", "Affine"],
        "aff_metric": "mattes",
        "aff_sampling": 32,
        "aff_random_sampling_rate": 0.25,
        "aff_iterations": [1000, 500, 250, 100],
        "aff_shrink_factors": [6, 4, 2, 1],
        "aff_smoothing_sigmas": [3, 2, 1, 0],
        "syn_metric": "CC",
        "syn_sampling": 4,
        "reg_iterations": [100, 70, 50, 20],
        "grad_step": 0.12,
        "flow_sigma": 3.0,
        "total_sigma": 0.0,
        "histogram_matching": True,
        "linear_resolution": None,
        "flatten_sigma_mm": None,
        "crop_margin_mm": None,
    },
    # For tests only: seconds per subject on tiny images, accuracy not a goal.
    "fast-test": {
        "linear_stages": ["Rigid", "Affine"],
        "aff_metric": "mattes",
        "aff_sampling": 16,
        "aff_random_sampling_rate": 0.5,
        "aff_iterations": [50, 20],
        "aff_shrink_factors": [2, 1],
        "aff_smoothing_sigmas": [1, 0],
        "syn_metric": "mattes",
        "syn_sampling": 16,
        "reg_iterations": [10, 5],
        "grad_step": 0.2,
        "flow_sigma": 3.0,
        "total_sigma": 0.0,
        "histogram_matching": False,
        "linear_resolution": None,
        "flatten_sigma_mm": None,
        "crop_margin_mm": None,
    },
}


def resolve_preset(name: str, overrides: dict | None = None) -> dict[str, Any]:
    """Return a copy of preset ``name`` with ``overrides`` (config
    ``spatial.registration_overrides``) applied. Raises ConfigError for unknown names/keys."""
    if name not in PRESETS:
        raise ConfigError(f"spatial.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    params = copy.deepcopy(PRESETS[name])
    for key, value in (overrides or {}).items():
        if key not in params:
            raise ConfigError(f"spatial.registration_overrides: unknown key {key!r}; valid: {sorted(params)}")
        params[key] = value
    return params
