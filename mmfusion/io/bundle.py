"""The trained-model bundle: everything needed to apply a trained group run elsewhere.

Written by every training group run to ``output_dir/group/bundle/`` (atomically: built in
a temporary folder, then renamed), read by ``mmfusion ... group --model BUNDLE``. Layout
(schema ``BUNDLE_SCHEMA_VERSION``; docs/outputs.md)::

    manifest.json          bundle_schema_version, mmfusion_version, files: {relative path: sha256}
    bundle.json            modalities, template (hash, source), grid (shape, affine, voxel size),
                           shard spatial config hash, provenance (version, seed, config hash,
                           run id), strata (n, sizes, chosen AP fit, harmonized), novelty rule
    config.json            the training run's full config
    model/model.json, model/final.weights.h5, model/normalization.json   (group/model/)
    strata.h5              training participant_id, session (n,), embedding (n, D) float32,
                           stratum (n,), own_distance (n,); exemplar_index (K,),
                           exemplar_embedding (K, D) float64, exemplar_stratum (K,)
    model_card.json, MODEL_CARD.md
    template/              the study template and its brain mask, when the shards were registered
                           to one (``--template`` for the participant level of a new cohort)

Nothing inside refers to an absolute path: the folder can be copied anywhere.
:func:`read_bundle` verifies it (schema version, every file present, sha256) before
anything is loaded.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mmfusion.errors import InputDataError, MissingInputError, UsageError
from mmfusion.io.atomic import atomic_dir
from mmfusion.provenance import sha256_file

BUNDLE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILES = ("model.json", "final.weights.h5", "normalization.json")


# ------------------------------------------------------------------------- writing
def write_strata_h5(path: Path, ids, embeddings: np.ndarray, stratum: np.ndarray, own_distance: np.ndarray,
                    exemplar_index: np.ndarray, exemplar_embedding: np.ndarray) -> Path:
    """strata.h5 (see the module docstring): ``ids`` (participant_id, session) of the n
    training rows, ``embeddings`` (n, D) float32, ``stratum`` (n,), ``own_distance`` (n,)
    (embedding units), ``exemplar_index`` (K,), ``exemplar_embedding`` (K, D)."""
    text = h5py.string_dtype()
    with h5py.File(path, "w") as h5:
        h5.create_dataset("participant_id", data=np.asarray(ids["participant_id"], dtype=object), dtype=text)
        h5.create_dataset("session", data=np.asarray(ids["session"], dtype=object), dtype=text)
        h5.create_dataset("embedding", data=np.asarray(embeddings, dtype=np.float32))
        h5.create_dataset("stratum", data=np.asarray(stratum, dtype=np.int64))
        h5.create_dataset("own_distance", data=np.asarray(own_distance, dtype=np.float64))
        h5.create_dataset("exemplar_index", data=np.asarray(exemplar_index, dtype=np.int64))
        h5.create_dataset("exemplar_embedding", data=np.asarray(exemplar_embedding, dtype=np.float64))
        h5.create_dataset("exemplar_stratum", data=np.arange(len(exemplar_index), dtype=np.int64))
    return path


def write_manifest(root: Path, version: str) -> dict:
    """``root/manifest.json``: schema version, mmfusion version, sha256 of every other file."""
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    manifest = {"bundle_schema_version": BUNDLE_SCHEMA_VERSION, "mmfusion_version": version, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_bundle(path: Path, model_dir: Path, meta: dict, config: dict, strata: dict, card: dict,
                 card_md: str, version: str, extra_files: dict[str, Path] | None = None) -> Path:
    """Write the bundle folder ``path`` atomically (a temporary folder next to it, renamed
    at the end; an older bundle is replaced). ``model_dir``: group/model; ``meta``: the
    content of bundle.json; ``strata``: the keyword arguments of :func:`write_strata_h5`
    but ``path``; ``card``/``card_md``: the model card (JSON, Markdown); ``extra_files``:
    {path inside the bundle: file to copy} (the study template)."""
    with atomic_dir(path) as root:
        (root / "model").mkdir()
        for name in MODEL_FILES:
            shutil.copy2(Path(model_dir) / name, root / "model" / name)
        for rel, src in (extra_files or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
        write_strata_h5(root / "strata.h5", **strata)
        (root / "bundle.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        (root / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        (root / "model_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
        (root / "MODEL_CARD.md").write_text(card_md)
        write_manifest(root, version)
    return Path(path)


# ------------------------------------------------------------------------- reading
@dataclass
class Bundle:
    """A verified bundle: ``root`` its folder, ``meta`` bundle.json, ``config`` config.json,
    ``card`` model_card.json, ``manifest`` manifest.json; the strata arrays via :meth:`strata`."""

    root: Path
    meta: dict
    config: dict
    card: dict
    manifest: dict

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def modalities(self) -> list[str]:
        return list(self.meta["modalities"])

    def strata(self) -> dict:
        """strata.h5 as arrays: participant_id, session (n,) str, embedding (n, D)
        float32, stratum (n,), own_distance (n,), exemplar_index (K,), exemplar_embedding
        (K, D) float64, exemplar_stratum (K,)."""
        with h5py.File(self.root / "strata.h5", "r") as h5:
            out = {k: h5[k][...] for k in h5.keys()}
        for k in ("participant_id", "session"):
            out[k] = np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in out[k]], dtype=object)
        return out


def read_bundle(path: Path) -> Bundle:
    """Verify and open the bundle folder ``path``: exit 64 if it is not a folder, 66 if the
    manifest or a listed file is missing, 65 for another bundle schema, a file whose sha256
    differs from the manifest, or an unreadable JSON file. Loads nothing else."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{root}: --model must be a trained-model bundle folder (output_dir/group/bundle "
                         "of a training group run)")
    manifest = _read_json(root / MANIFEST, missing_hint="not a complete bundle; copy the whole bundle folder")
    schema = manifest.get("bundle_schema_version")
    if schema != BUNDLE_SCHEMA_VERSION:
        raise InputDataError(
            f"{root / MANIFEST}: bundle schema {schema} (written by mmfusion {manifest.get('mmfusion_version')}); "
            f"this mmfusion reads schema {BUNDLE_SCHEMA_VERSION}: apply it with the mmfusion version that wrote "
            "it, or retrain with this one")
    verify_files(root, manifest)
    return Bundle(root, _read_json(root / "bundle.json"), _read_json(root / "config.json"),
                  _read_json(root / "model_card.json"), manifest)


def verify_files(root: Path, manifest: dict) -> None:
    """Every file of ``manifest['files']`` present under ``root`` (else exit 66) with its
    sha256 (else exit 65); nothing required missing from the list."""
    files = manifest.get("files") or {}
    required = ["bundle.json", "config.json", "model_card.json", "strata.h5", *(f"model/{n}" for n in MODEL_FILES)]
    unlisted = [r for r in required if r not in files]
    if unlisted:
        raise InputDataError(f"{root / MANIFEST}: does not list {', '.join(unlisted)}; the bundle is incomplete: "
                             "copy the whole bundle folder again or retrain")
    for rel, digest in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise InputDataError(f"{root / MANIFEST}: file entry {rel!r} is not inside the bundle")
        p = root / rel
        if not p.is_file():
            raise MissingInputError(f"{p}: file of the bundle missing; copy the whole bundle folder again")
        if sha256_file(p) != digest:
            raise InputDataError(f"{p}: altered (sha256 differs from {MANIFEST}); copy the bundle again "
                                 "from its source, or retrain")


def _read_json(path: Path, missing_hint: str = "copy the whole bundle folder again") -> dict:
    if not path.is_file():
        raise MissingInputError(f"{path}: missing; {missing_hint}")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputDataError(f"{path}: not valid JSON ({exc}); copy the bundle again or retrain") from exc


# ---------------------------------------------------------------- shards vs bundle
def check_modalities(bundle: Bundle, requested: list[str]) -> None:
    """The requested modalities must be the model's (it takes one input per modality):
    exit 64 naming both lists otherwise."""
    have = bundle.modalities
    extra = [m for m in requested if m not in have]
    if extra:
        raise UsageError(f"{bundle.root / 'bundle.json'}: the model has no {' '.join(extra)} input (it takes "
                         f"{' '.join(have)}); pass --modalities {' '.join(have)}")
    if sorted(requested) != sorted(have):
        raise UsageError(f"{bundle.root / 'bundle.json'}: the model takes {' '.join(have)}, all of them; "
                         f"pass --modalities {' '.join(have)}")


def check_shard(attrs: dict, path: Path, bundle: Bundle) -> None:
    """One shard's attributes (:func:`mmfusion.io.shards.read_attrs`) against the bundle:
    same template (template_hash), grid shape and affine, and the model's modalities;
    exit 65 (66 for a missing modality) naming the shard and the fix."""
    grid, tpl = bundle.meta["grid"], bundle.meta["template"]
    fix = ("rerun the participant level of this dataset with the training cohort's template "
           "(--template) and the same spatial config")
    if str(attrs.get("template_hash")) != str(tpl["hash"]):
        raise InputDataError(f"{path}: made with template {attrs.get('template_hash')} "
                             f"({attrs.get('template_source')}), the model with template {tpl['hash']}; {fix}")
    if tuple(attrs["shape"]) != tuple(grid["shape"]):
        raise InputDataError(f"{path}: grid {tuple(attrs['shape'])}, the model's grid {tuple(grid['shape'])}; {fix}")
    if not np.allclose(np.asarray(attrs["affine"], dtype=np.float64), np.asarray(grid["affine"]), atol=1e-4):
        raise InputDataError(f"{path}: grid affine differs from the model's (voxel -> world); {fix}")
    absent = [m for m in bundle.modalities if m not in attrs["modalities"]]
    if absent:
        raise MissingInputError(f"{path}: no {' '.join(absent)} (the model needs {' '.join(bundle.modalities)}); "
                                "rerun the participant level with those inputs")
