"""What every config key accepts, checked by :func:`mmfusion.config.load_config`.

``RULES[section][key]`` is a :class:`Rule` (what is allowed, in words, and a test of one
value); ``CROSS_RULES`` are the rules between keys (model levels vs filters vs input
shape vs the spatial grid, ...). :func:`check_config` applies both and raises
:class:`~mmfusion.errors.ConfigError` (exit 64) naming the file, the key, the value and
what is allowed, so a typo fails in well under a second, before any data is read.
``docs/configuration.md`` shows each key's ``allowed`` text (``python -m mmfusion.docgen``).

Allowed values come from the code that consumes the key where that module is light to
import (``evaluation.BACKGROUNDS``, ``phenotypes.MISSING_POLICIES``,
``spatial.presets.PRESETS``, ``distribute.parse_sync_batchnorm``); the ones whose
consumer imports Keras (``DEPTHWISE_IMPLEMENTATIONS``) or scikit-learn/numba
(``DAMPING_MIN_RANGE``) are defined here and imported by that consumer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mmfusion.learning.distribute import parse_sync_batchnorm
from mmfusion.errors import ConfigError
from mmfusion.learning.metrics import BACKGROUNDS
from mmfusion.strata.phenotypes import MISSING_POLICIES
from mmfusion.spatial.presets import PRESETS

#: DIPY TensorModel fit methods offered by diffusion.dti_fit_method (mmfusion/diffusion/fit.py uses it).
DTI_FIT_METHODS = ("WLS", "OLS", "NLLS", "RESTORE")
#: Depthwise algorithms of the separable layers (mmfusion/model/layers.py).
DEPTHWISE_IMPLEMENTATIONS = ("auto", "dense", "sliced", "split", "grouped", "numba")
#: Kernel initializers of every convolution (model.kernel_initializer; Keras names).
KERNEL_INITIALIZERS = ("glorot_uniform", "he_normal")
#: stratify.damping_min: [low, high) (scikit-learn's affinity propagation needs damping in [0.5, 1)).
DAMPING_MIN_RANGE = (0.5, 1.0)
#: Where the strata come from (mmfusion/strata/validity.py, choose_strata).
STRATA_SOURCES = ("consensus", "final_model")
#: The largest seed every seeded generator accepts (NumPy RandomState: < 2**32).
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Rule:
    """``allowed``: what a value may be, in words; ``test(value)``: True when it is."""

    allowed: str
    test: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           integer: bool = False) -> Rule:
    """A number (an integer if ``integer``) within the given bounds."""
    def test(v: Any) -> bool:
        return ((_is_int(v) if integer else _is_number(v))
                and (lo is None or (v > lo if lo_open else v >= lo))
                and (hi is None or (v < hi if hi_open else v <= hi)))
    return Rule(f"{'an integer' if integer else 'a number'} {_interval(lo, hi, lo_open, hi_open)}", test)


def count(minimum: int = 1) -> Rule:
    """An integer >= ``minimum``."""
    return number(minimum, integer=True)


def one_of(values) -> Rule:
    """One of ``values`` (strings)."""
    values = tuple(values)
    return Rule("one of " + ", ".join(repr(v) for v in values), lambda v: isinstance(v, str) and v in values)


def int_list(n: int | None = None, minimum: int = 1) -> Rule:
    """A list of integers >= ``minimum`` (of length ``n`` when given, else non-empty)."""
    def test(v: Any) -> bool:
        return (isinstance(v, (list, tuple)) and (len(v) == n if n else len(v) > 0)
                and all(_is_int(x) and x >= minimum for x in v))
    what = "positive integers" if minimum == 1 else f"integers >= {minimum}"
    return Rule(f"a list of {n} values, all {what}" if n else f"a non-empty list of {what}", test)


def ordered_pair(lo: float, hi: float) -> Rule:
    """Two numbers ``[a, b]`` with ``lo <= a <= b <= hi``."""
    def test(v: Any) -> bool:
        return (isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_number, v))
                and lo <= v[0] <= v[1] <= hi)
    return Rule(f"a list of 2 numbers [low, high] with {_num(lo)} <= low <= high <= {_num(hi)}", test)


def optional(rule: Rule) -> Rule:
    """null, or a value ``rule`` accepts."""
    return Rule(f"null or {rule.allowed}", lambda v: v is None or rule.test(v))


def _parses(parse: Callable[[Any], Any]) -> Callable[[Any], bool]:
    def test(v: Any) -> bool:
        try:
            parse(v)
        except ConfigError:
            return False
        return True
    return test


BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
COLUMN = Rule("a column name", lambda v: isinstance(v, str) and v != "")
STRINGS = Rule("a list of column names", lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v))
MAPPING = Rule("null or a mapping of preset parameters", lambda v: v is None or isinstance(v, dict))

RULES: dict[str, dict[str, Rule]] = {
    "diffusion": {
        "fit_missing": BOOLEAN,
        "b0_threshold": number(0),
        "shell_tolerance": number(0, lo_open=True),
        "dti_max_bval": number(0, lo_open=True),
        "dti_fit_method": one_of(DTI_FIT_METHODS),
        "noddi_dpar": number(1e-4, 5e-3),
        "noddi_diso": number(1e-4, 5e-3),
        "allow_fa_only": BOOLEAN,
    },
    "evaluation": {
        "roi_shape": int_list(3),
        "cnr_pairs": count(1),
        "background": one_of(BACKGROUNDS),
        "background_threshold": number(0, 1),
        "embedding_only": BOOLEAN,
    },
    "model": {
        "input_shape": optional(int_list(3)),
        "levels": count(1),
        "filters": int_list(),
        "kernel_size": int_list(3),
        "embedding_filters": count(1),
        "skip_connections": BOOLEAN,
        "separable": BOOLEAN,
        "dropout": number(0, 1, hi_open=True),
        "fusion_dropout": number(0, 1, hi_open=True),
        "kernel_initializer": one_of(KERNEL_INITIALIZERS),
        "l2": number(0),
        "depthwise_implementation": one_of(DEPTHWISE_IMPLEMENTATIONS),
        "sync_batchnorm": Rule("null, auto, true or false", _parses(parse_sync_batchnorm)),
    },
    "normalization": {
        "lower_percentile": number(0, 100),
        "upper_percentile": number(0, 100),
        "histogram_bins": count(2),
        "brain_mask": BOOLEAN,
    },
    "phenotypes": {
        "variables": optional(STRINGS),
        "exclude": STRINGS,
        "missing": one_of(MISSING_POLICIES),
        "eigenvalue_threshold": number(0),
        "loading_threshold": number(0, 1),
    },
    "spatial": {
        "preset": one_of(PRESETS),
        "registration_overrides": MAPPING,
        "registration_resolution": number(0, lo_open=True),
        "grid_voxel_size": Rule("'auto' or a number > 0",
                                lambda v: v == "auto" or number(0, lo_open=True).test(v)),
        "grid_shape": int_list(3),
        "grid_margin_mm": number(0),
        "n4": BOOLEAN,
        "brain_extraction": BOOLEAN,
        "brain_extraction_margin_mm": number(0),
        "template_iterations": count(1),
        "template_subjects": optional(count(1)),
        "keep_transforms": BOOLEAN,
        "random_seed": number(0, MAX_SEED, integer=True),
    },
    "stats": {
        "alpha": number(0, 1, lo_open=True, hi_open=True),
        "n_permutations": count(1),
    },
    "stratify": {
        "damping_n": count(1),
        "damping_min": number(*DAMPING_MIN_RANGE, hi_open=True),
        "preference_n": count(1),
        "preference_percentiles": ordered_pair(0, 100),
        "max_iter": count(1),
        "convergence_iter": count(1),
        "baseline_components": count(1),
        "subsamples": count(0),
        "subsample_fraction": number(0, 1, lo_open=True, hi_open=True),
        "stability_threshold": number(0, 1),
        "strata_from": one_of(STRATA_SOURCES),
        "harmonize_site": optional(COLUMN),
        "harmonize_covariates": STRINGS,
    },
    "training": {
        "epochs": count(1),
        "batch_size": count(1),
        "learning_rate": number(0, lo_open=True),
        "early_stopping_patience": count(0),
        "mixed_precision": BOOLEAN,
        "cv_folds": count(2),
        "n_reconstructions": count(0),
    },
}


# --------------------------------------------------------------------- between keys
# Each returns None, or (the keys involved, the first one named in the message; what is
# wrong and how to fix it). The first docstring line is shown in docs/configuration.md.
def _filters_per_level(cfg: dict):
    """`model.filters` has one value per level (`model.levels` values)."""
    m = cfg["model"]
    if len(m["filters"]) != m["levels"]:
        return ("model.filters", "model.levels"), (
            f"{m['filters']} has {len(m['filters'])} value(s) but model.levels is {m['levels']}: "
            "give one value per level")


def _shape_divisible(cfg: dict):
    """Every dimension of `model.input_shape` is divisible by 2**`model.levels`."""
    m = cfg["model"]
    step = 2 ** m["levels"]
    if any(d % step for d in m["input_shape"]):
        return ("model.input_shape", "model.levels"), (
            f"{m['input_shape']}: every dimension must be divisible by 2**levels = {step} "
            f"(model.levels: {m['levels']}); change input_shape or levels")


def _shape_is_grid(cfg: dict):
    """`model.input_shape` equals `spatial.grid_shape` (the shards' grid)."""
    shape, grid = list(cfg["model"]["input_shape"]), list(cfg["spatial"]["grid_shape"])
    if shape != grid:
        return ("model.input_shape", "spatial.grid_shape"), (
            f"{shape} differs from spatial.grid_shape {grid} (the shards' grid): set both to the same shape")


def _roi_fits(cfg: dict):
    """`evaluation.roi_shape` fits inside `model.input_shape`."""
    roi, shape = list(cfg["evaluation"]["roi_shape"]), list(cfg["model"]["input_shape"])
    if any(r > d for r, d in zip(roi, shape)):
        return ("evaluation.roi_shape", "model.input_shape"), (
            f"{roi} is larger than model.input_shape {shape}: use smaller ROIs")


def _percentiles_ordered(cfg: dict):
    """`normalization.lower_percentile` < `normalization.upper_percentile`."""
    lower, upper = cfg["normalization"]["lower_percentile"], cfg["normalization"]["upper_percentile"]
    if not lower < upper:
        return ("normalization.lower_percentile", "normalization.upper_percentile"), (
            f"{lower} must be below normalization.upper_percentile ({upper})")


def _convergence_within_max_iter(cfg: dict):
    """`stratify.convergence_iter` <= `stratify.max_iter`."""
    conv, most = cfg["stratify"]["convergence_iter"], cfg["stratify"]["max_iter"]
    if conv > most:
        return ("stratify.convergence_iter", "stratify.max_iter"), (
            f"{conv} exceeds stratify.max_iter ({most}): no fit could converge; lower it or raise max_iter")


def _b0_below_dti_shells(cfg: dict):
    """`diffusion.b0_threshold` < `diffusion.dti_max_bval`."""
    d = cfg["diffusion"]
    if not d["b0_threshold"] < d["dti_max_bval"]:
        return ("diffusion.b0_threshold", "diffusion.dti_max_bval"), (
            f"{d['b0_threshold']} must be below diffusion.dti_max_bval ({d['dti_max_bval']}): "
            "no diffusion-weighted shell would be left for the tensor fit")


def _overrides_known(cfg: dict):
    """The keys of `spatial.registration_overrides` are parameters of `spatial.preset`."""
    preset = cfg["spatial"]["preset"]
    unknown = sorted(set(cfg["spatial"]["registration_overrides"] or {}) - set(PRESETS[preset]))
    if unknown:
        return ("spatial.registration_overrides", "spatial.preset"), (
            f"unknown parameter(s) {', '.join(unknown)} of preset {preset!r}; valid: "
            f"{', '.join(sorted(PRESETS[preset]))} (docs/registration.md)")


MODEL_CROSS_RULES = (_filters_per_level, _shape_divisible)
CROSS_RULES = (*MODEL_CROSS_RULES, _shape_is_grid, _roi_fits, _percentiles_ordered,
               _convergence_within_max_iter, _overrides_known, _b0_below_dti_shells)


class _Sources:
    """Where each key was set: ``origins[key path]``, else ``default`` (the defaults)."""

    def __init__(self, origins: Mapping[str, str], default: str):
        self.origins, self.default = origins, default

    def of(self, *keys: str) -> str:
        """The places that set any of ``keys`` (joined by 'and'), else the default."""
        found = list(dict.fromkeys(self.origins[k] for k in keys if k in self.origins))
        return " and ".join(found) or self.default


def check_section(section: str, values: Mapping[str, Any], origins: Mapping[str, str] | None = None,
                  default: str = "config") -> None:
    """Check each key of one section against ``RULES`` (``origins``: see :func:`check_config`)."""
    sources = _Sources(origins or {}, default)
    for key, rule in RULES.get(section, {}).items():
        if key in values and not rule.test(values[key]):
            path = f"{section}.{key}"
            raise ConfigError(f"{sources.of(path)}: {path}: {values[key]!r} is not allowed; use {rule.allowed}")


def _check_cross(cfg: dict, rules, sources: _Sources) -> None:
    """Raise for the first rule between keys that fails; blame where its keys were set."""
    for rule in rules:
        found = rule(cfg)
        if found:
            keys, problem = found
            raise ConfigError(f"{sources.of(*keys)}: {keys[0]}: {problem}")


def check_config(cfg: dict, origins: Mapping[str, str] | None = None, default: str = "the defaults") -> None:
    """Every rule of every section, then the rules between keys, for a full config ``cfg``.

    ``origins`` maps a key path (``model.levels``) to where it was set (the config file,
    the command line); keys not in it are named by ``default``.
    """
    for section, values in cfg.items():
        check_section(section, values, origins, default)
    _check_cross(cfg, CROSS_RULES, _Sources(origins or {}, default))


def check_model(values: Mapping[str, Any], source: str = "config") -> None:
    """The ``model`` section alone (for :func:`mmfusion.model.autoencoder.build_autoencoder`)."""
    check_section("model", values, default=source)
    _check_cross({"model": values}, MODEL_CROSS_RULES, _Sources({}, source))
