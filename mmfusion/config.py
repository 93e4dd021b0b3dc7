"""The YAML configuration: defaults (= the paper, docs/method.md#8-deviations), user overrides, validation.

Defaults live in ``mmfusion/defaults/<section>.yaml``, one file per section (the file
stem is the section name, e.g. ``model.yaml`` -> ``cfg["model"]``). A user's
``--config FILE.yaml`` holds any subset of the same nested keys. Unknown sections or
keys are an error, and so is a value whose type does not match the default's
(an int is accepted where the default is a float; ``null`` defaults accept anything),
and so is any value that :mod:`mmfusion.config_rules` does not allow (ranges, choices,
list lengths, rules between keys). Command-line options that set config keys
(``--seed``) arrive as ``overrides`` and are checked the same way.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from mmfusion.errors import ConfigError

DEFAULTS_DIR = Path(__file__).resolve().parent / "defaults"


def default_config() -> dict[str, dict[str, Any]]:
    """Return the default configuration, a fresh nested dict ``{section: {key: value}}``
    (``model.input_shape`` resolved to ``spatial.grid_shape``, see :func:`resolve_input_shape`)."""
    return resolve_input_shape(_default_files())


def _default_files() -> dict[str, dict[str, Any]]:
    """The defaults as the YAML files in ``mmfusion/defaults/`` hold them."""
    cfg: dict[str, dict[str, Any]] = {}
    for path in sorted(DEFAULTS_DIR.glob("*.yaml")):
        with open(path) as fh:
            cfg[path.stem] = yaml.safe_load(fh) or {}
    return cfg


def resolve_input_shape(cfg: dict, origins: dict[str, str] | None = None) -> dict:
    """One source of truth for the model's input: ``model.input_shape: null`` (the default)
    becomes ``spatial.grid_shape``, the shards' grid. An explicit value stays, and
    :mod:`mmfusion.config_rules` refuses it if it differs from the grid. Returns ``cfg``."""
    if cfg["model"].get("input_shape") is None:
        cfg["model"]["input_shape"] = list(cfg["spatial"]["grid_shape"])
        if origins is not None:
            origins["model.input_shape"] = origins.get("spatial.grid_shape", "the defaults")
    return cfg


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None or default == "auto":  # 'auto' or a value: the key's rule decides
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _merge(base: dict, override: dict, where: str, source: str, origins: dict[str, str]) -> None:
    """Merge ``override`` into ``base`` in place, recording ``origins[key path] = source``."""
    for key, value in override.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in base:
            valid = ", ".join(sorted(map(str, base)))
            raise ConfigError(f"{source}: unknown config key '{path}' (valid keys here: {valid})")
        default = base[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{path}' must be a mapping of keys, got {value!r}")
            _merge(default, value, path, source, origins)
        elif not _type_ok(default, value):
            raise ConfigError(
                f"{source}: '{path}' must be of type {type(default).__name__} "
                f"(default {default!r}), got {value!r}"
            )
        else:
            base[key] = value
            origins[path] = source


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                override_source: str = "override") -> dict:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (if any),
    every value then checked against :mod:`mmfusion.config_rules`.

    Raises :class:`ConfigError` (exit code 64) naming where the offending key was set
    (the file, ``override_source`` or the defaults), the key, its value and what is allowed.
    """
    from mmfusion.config_rules import check_config

    cfg = _default_files()
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; pass an existing YAML file to --config")
        try:
            with open(path) as fh:
                user = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from exc
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: the config must be a YAML mapping of sections")
        _merge(cfg, user, "", str(path), origins)
    if overrides:
        _merge(cfg, copy.deepcopy(overrides), "", override_source, origins)
    resolve_input_shape(cfg, origins)
    check_config(cfg, origins, "the defaults")
    return cfg


#: spatial keys that shape nothing while brain extraction is off (kept out of the hash then,
#: so shards and templates made before the keys existed stay valid)
_BRAIN_EXTRACTION_KEYS = ("brain_extraction", "brain_extraction_margin_mm")


def spatial_hash(cfg: dict) -> str:
    """:func:`config_hash` of the ``spatial`` section (what shapes a shard or a study
    template), without the brain-extraction keys while ``brain_extraction`` is off."""
    spatial = dict(cfg["spatial"])
    if not spatial.get("brain_extraction"):
        for key in _BRAIN_EXTRACTION_KEYS:
            spatial.pop(key, None)
    return config_hash({"spatial": spatial})


def config_hash(cfg: dict, sections: list[str] | None = None) -> str:
    """sha256 (hex, first 16 chars) of the canonical JSON of ``cfg`` (or some sections)."""
    part = cfg if sections is None else {s: cfg[s] for s in sections}
    blob = json.dumps(part, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
