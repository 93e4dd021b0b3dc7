"""Input discovery: raw T1w and derivative FA/NDI maps, one record per subject/session."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: The BIDS version the datasets mmfusion writes declare (derivatives, ``mmfusion simulate``).
BIDS_VERSION = "1.10.0"
#: Image modalities a shard may hold; the group level's ``--modalities`` chooses among them.
MODALITIES = ("t1", "jac", "fa", "ndi")


def subject_stem(subject: str, session: str = "") -> str:
    """``sub-X`` or ``sub-X_ses-Y``: the BIDS entities prefix of one subject (and session),
    the stem of its shard and its id at the group level (labels without ``sub-``/``ses-``)."""
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def subject_folder(subject: str, session: str = "") -> Path:
    """``sub-X`` or ``sub-X/ses-Y``: the folder of one subject (and session), relative to
    the dataset root (labels without ``sub-``/``ses-``)."""
    return Path(f"sub-{subject}") / (f"ses-{session}" if session else "")


@dataclass(frozen=True)
class DwiInputs:
    """One preprocessed DWI series to fit FA/NDI from: ``dwi`` (4D NIfTI), ``bval``/``bvec``
    (FSL text files), ``mask`` (its brain mask; None: computed from the b=0 volumes) and
    ``source``: 'qsiprep' (derivative naming) or 'bids' (a raw-BIDS dwi/ image the user
    declared preprocessed with --dwi-preprocessed). ``btable``: QSIPrep's MRtrix ``.b``
    gradient table (N x 4: x, y, z, b in world coordinates), used when the ``.bval``/``.bvec``
    are absent (FA and NDI do not depend on the gradients' frame)."""

    dwi: Path
    bval: Path
    bvec: Path
    mask: Path | None
    source: str
    btable: Path | None = None

    def uses_btable(self) -> bool:
        return self.btable is not None and not (self.bval.is_file() and self.bvec.is_file())

    def files(self) -> dict[str, Path]:
        """The files by role: {'dwi', 'bval', 'bvec' (or 'btable')[, 'dwi_mask']}."""
        grads = (("btable", self.btable),) if self.uses_btable() else (("bval", self.bval), ("bvec", self.bvec))
        return {k: v for k, v in (("dwi", self.dwi), *grads, ("dwi_mask", self.mask)) if v is not None}


@dataclass(frozen=True)
class SubjectRecord:
    """Everything the participant level needs for one subject (and session).

    ``subject``/``session`` are labels without ``sub-``/``ses-`` (session '' if the
    dataset has none). ``t1w`` is the raw T1w; ``fa``/``ndi`` are derivative maps in the
    subject's T1w space (None when absent; ``missing`` then says which pattern was
    expected). ``choices`` holds, per modality that had several candidates, all of them
    in :func:`choice_key` order (the one used first). ``dwi``: a preprocessed DWI series
    (QSIPrep naming, or raw BIDS with --dwi-preprocessed) from which the participant level
    fits the maps that are absent; fitted maps, when present, win.
    """

    subject: str
    session: str
    t1w: Path | None
    fa: Path | None = None
    ndi: Path | None = None
    missing: dict = field(default_factory=dict)  # modality -> expected filename pattern
    choices: dict = field(default_factory=dict)  # modality -> all candidates, the used one first
    dwi: DwiInputs | None = None

    @property
    def key(self) -> str:
        return subject_stem(self.subject, self.session)

    def inputs(self) -> dict[str, Path]:
        """Present inputs by modality name: {'t1w': ..., 'fa': ..., 'ndi': ...}."""
        return {k: v for k, v in (("t1w", self.t1w), ("fa", self.fa), ("ndi", self.ndi)) if v is not None}


# --------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------
import json
import re

from mmfusion.errors import (MissingInputError, NoFilesSelectedError,
                             UsageError, ValidationError)
from mmfusion.runlog import get_logger

log = get_logger(__name__)

#: QSIRecon (``param-``) and older QSIPrep (``mdp-``) spellings, T1w or ACPC space.
DERIVATIVE_PATTERNS = {
    "fa": re.compile(r"_space-(T1w|ACPC)_(?:.*_)?model-tensor_(?:.*_)?(param|mdp)-fa_(?:.*_)?dwimap\.nii(\.gz)?$"),
    "ndi": re.compile(r"_space-(T1w|ACPC)_(?:.*_)?model-noddi_(?:.*_)?(param|mdp)-icvf_(?:.*_)?dwimap\.nii(\.gz)?$"),
}
#: QSIPrep's preprocessed DWI in T1w space (its brain mask: same stem, ``_desc-brain_mask``).
QSIPREP_DWI = re.compile(r"_space-T1w_(?:.*_)?desc-preproc_dwi\.nii(\.gz)?$")
EXPECTED_NAMES = {
    "t1w": "sub-<label>[_ses-<label>]_T1w.nii[.gz] in sub-<label>/[ses-<label>/]anat/",
    "fa": "sub-<label>[_ses-<label>]_space-T1w_model-tensor_param-fa_dwimap.nii.gz "
          "(or mdp-fa, space-ACPC) in a --derivatives dataset",
    "ndi": "sub-<label>[_ses-<label>]_space-T1w_model-noddi_param-icvf_dwimap.nii.gz "
           "(or mdp-icvf, space-ACPC) in a --derivatives dataset",
    "dwi": "sub-<label>[_ses-<label>][_acq-<label>]_space-T1w_desc-preproc_dwi.nii.gz with .bval/.bvec "
           "(QSIPrep) in a --derivatives dataset, or a raw dwi/ image with --dwi-preprocessed",
}


def strip_prefix(label: str, prefix: str) -> str:
    """'sub-01' -> '01', '01' -> '01'."""
    return label[len(prefix):] if label.startswith(prefix) else label


def generated_by(dataset: Path) -> list[str]:
    """``GeneratedBy[].Name`` of the dataset_description.json in ``dataset`` ([] if none/unreadable)."""
    try:
        desc = json.loads((Path(dataset) / "dataset_description.json").read_text())
        return [g["Name"] for g in desc.get("GeneratedBy", []) if isinstance(g, dict) and "Name" in g]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def is_own_output(dataset: Path, output_dir: Path | None) -> bool:
    """True for ``output_dir`` and a dataset holding it, and for any dataset GeneratedBy mmfusion."""
    dataset = Path(dataset).resolve()
    holds_output = output_dir is not None and dataset in (out := Path(output_dir).resolve(), *out.parents)
    return holds_output or "mmfusion" in generated_by(dataset)


def find_derivative_datasets(bids_dir: Path, given: list[Path] | None,
                             output_dir: Path | None = None) -> list[Path]:
    """``--derivatives`` paths, or every dataset under ``bids_dir/derivatives/`` except
    mmfusion's own outputs (``output_dir`` and datasets GeneratedBy mmfusion)."""
    if given:
        for path in given:
            if not (Path(path) / "dataset_description.json").is_file():
                raise MissingInputError(
                    f"{path}: not a BIDS derivatives dataset (no dataset_description.json); "
                    "pass the folder that holds dataset_description.json to --derivatives")
            if is_own_output(path, output_dir):
                raise UsageError(f"{path}: is (or holds) mmfusion's own output, not an input; give --derivatives "
                                 "the datasets holding FA/NDI maps (e.g. QSIRecon outputs)")
        return [Path(p).resolve() for p in given]
    root = bids_dir / "derivatives"
    if not root.is_dir():
        return []
    found = sorted(p.resolve() for p in root.iterdir() if (p / "dataset_description.json").is_file())
    own = [p for p in found if is_own_output(p, output_dir)]
    if own:
        log.info("not searching mmfusion's own outputs for FA/NDI: %s", " ".join(str(p) for p in own))
    return [p for p in found if p not in own]


def load_filter_file(path: Path | None) -> dict:
    """Read ``--bids-filter-file``: JSON ``{"t1w"|"fa"|"ndi": {entity: value}}``."""
    if path is None:
        return {}
    try:
        filters = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the BIDS filter file ({exc}); give a JSON file like "
                         '{"t1w": {"acquisition": "mprage"}}') from exc
    unknown = set(filters) - set(EXPECTED_NAMES)
    if not isinstance(filters, dict) or unknown:
        raise UsageError(f"{path}: filter keys must be among {sorted(EXPECTED_NAMES)} (got {sorted(unknown)})")
    return filters


def _layout(bids_dir: Path, derivatives: list[Path]):
    from bids import BIDSLayout  # slow import: only when discovering

    try:
        return BIDSLayout(str(bids_dir), validate=False, derivatives=[str(d) for d in derivatives] or False)
    except Exception as exc:  # pybids raises several types for broken datasets
        raise ValidationError(f"{bids_dir}: pybids cannot index the dataset ({exc}); run the BIDS validator on it") from exc


def _entities_query(filters: dict, key: str) -> dict:
    query = dict(filters.get(key, {}))
    return {k: v for k, v in query.items() if k not in ("subject", "session")}


def discover(
    bids_dir: Path,
    derivatives: list[Path] | None = None,
    participant_labels: list[str] | None = None,
    session_labels: list[str] | None = None,
    filters: dict | None = None,
    output_dir: Path | None = None,
    dwi_preprocessed: bool = False,
) -> list[SubjectRecord]:
    """One :class:`SubjectRecord` per selected subject/session that has a T1w or derivatives.

    Each record also gets a preprocessed DWI series when there is one: QSIPrep's
    ``space-T1w_desc-preproc_dwi`` in a derivative dataset, else, only with
    ``dwi_preprocessed`` (--dwi-preprocessed), the raw ``dwi/`` image (raw data are never
    fitted otherwise).

    Subjects are those with imaging data (participants.tsv rows without a ``sub-*``
    folder are phenotype only and ignored). Without ``session_labels``, sessions with no
    T1w image at all are skipped (INFO) unless no session of the subject has one.
    ``output_dir`` (mmfusion's own outputs) is never searched for FA/NDI.

    Raises NoFilesSelectedError (exit 18) if a requested participant/session label does
    not exist (the message lists those that do) or the filters select no T1w at all, and
    MissingInputError (exit 66) if a session requested by label has no T1w image.
    """
    bids_dir = Path(bids_dir).resolve()
    filters = filters or {}
    deriv = find_derivative_datasets(bids_dir, derivatives, output_dir)
    layout = _layout(bids_dir, deriv)
    subjects = _select_subjects(layout, bids_dir, participant_labels)
    records: list[SubjectRecord] = []
    for sub in subjects:
        sessions = sorted(layout.get_sessions(subject=sub, scope="raw")) or [""]
        if session_labels and sessions != [""]:
            chosen = _select_labels(sessions, session_labels, "ses-", f"session (of sub-{sub})", bids_dir)
            records += _require_anat([_record(layout, sub, ses, filters, dwi_preprocessed) for ses in chosen],
                                     layout, bids_dir)
        else:
            records += _skip_sessions_without_anat([_record(layout, sub, ses, filters, dwi_preprocessed)
                                                    for ses in sessions], layout)
    if not any(r.t1w for r in records):
        raise NoFilesSelectedError(f"{bids_dir}: the selection (labels/filters) matched no T1w image; "
                                   f"expected {EXPECTED_NAMES['t1w']}")
    log.info("discovered %d subject/session record(s) in %s (%d derivative dataset(s))",
             len(records), bids_dir, len(deriv))
    return records


def participants_tsv_labels(bids_dir: Path) -> list[str]:
    """``participant_id`` labels (without 'sub-') of ``bids_dir/participants.tsv``, [] if none."""
    table = Path(bids_dir) / "participants.tsv"
    lines = table.read_text(encoding="utf-8-sig").splitlines() if table.is_file() else []
    header = lines[0].split("\t") if lines else []
    if "participant_id" not in header:
        return []
    col = header.index("participant_id")
    rows = [line.split("\t") for line in lines[1:] if line.strip()]
    return sorted({strip_prefix(row[col].strip(), "sub-") for row in rows if len(row) > col and row[col].strip()})


def imaged_subjects(bids_dir: Path, layout=None) -> list[str]:
    """Subjects with a ``sub-*`` folder (and, given a pybids ``layout``, with raw files)."""
    found = {p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir()}
    if layout is not None:
        found |= set(layout.get_subjects(scope="raw"))
    return sorted(found)


def phenotype_only_subjects(bids_dir: Path, imaged: list[str] | None = None) -> list[str]:
    """participants.tsv labels not among ``imaged`` (default: the ``sub-*`` folders):
    phenotype-only rows, never imaged."""
    imaged = imaged_subjects(bids_dir) if imaged is None else imaged
    return sorted(set(participants_tsv_labels(bids_dir)) - set(imaged))


def _select_subjects(layout, bids_dir: Path, wanted: list[str] | None) -> list[str]:
    """The imaged subjects, restricted to ``wanted``; phenotype-only rows are logged, and
    asking for one by label is an error (exit 18) that says so."""
    existing = imaged_subjects(bids_dir, layout)
    pheno_only = phenotype_only_subjects(bids_dir, existing)
    if pheno_only:
        log.info("%d participant(s) of participants.tsv have no imaging folder (phenotype only), ignored: %s",
                 len(pheno_only), " ".join(f"sub-{s}" for s in pheno_only[:20]))
    asked = [f"sub-{strip_prefix(w, 'sub-')}" for w in wanted or [] if strip_prefix(w, "sub-") in pheno_only]
    if asked:
        raise NoFilesSelectedError(f"{bids_dir}: {' '.join(asked)}: listed in participants.tsv but has no "
                                   "imaging folder (phenotype only); leave it out of --participant-label")
    return _select_labels(existing, wanted, "sub-", "participant", bids_dir)


def _select_labels(existing: list[str], wanted: list[str] | None, prefix: str, what: str,
                   bids_dir: Path) -> list[str]:
    if not wanted:
        return existing
    wanted = [strip_prefix(w, prefix) for w in wanted]
    unknown = [w for w in wanted if w not in existing]
    if unknown:
        listed = " ".join(existing[:50]) + (" ..." if len(existing) > 50 else "")
        raise NoFilesSelectedError(
            f"{bids_dir}: {what} label(s) {' '.join(unknown)} not found; existing labels: {listed or '(none)'}")
    return [e for e in existing if e in wanted]


def _has_anat(layout, record: SubjectRecord) -> bool:
    """Whether the record's session holds any T1w image (whatever the filters select)."""
    return record.t1w is not None or bool(_t1w_files(layout, record.subject, record.session, {}))


def _skip_sessions_without_anat(records: list[SubjectRecord], layout) -> list[SubjectRecord]:
    """Drop sessions without any T1w (INFO), unless that leaves the subject with none:
    a subject with no T1w at all stays, to be reported as missing its T1w."""
    has_anat = [_has_anat(layout, r) for r in records]
    if records[0].session == "" or not any(has_anat):
        return records
    for rec in (r for r, ok in zip(records, has_anat) if not ok):
        log.info("%s: skipped, the session has no T1w image (e.g. MEG, behavioural or functional "
                 "data only); select it with --session-label to make this an error", rec.key)
    return [r for r, ok in zip(records, has_anat) if ok]


def _require_anat(records: list[SubjectRecord], layout, bids_dir: Path) -> list[SubjectRecord]:
    """Sessions asked for with --session-label must hold a T1w image (exit 66 otherwise)."""
    bad = [r.key for r in records if not _has_anat(layout, r)]
    if bad:
        raise MissingInputError(f"{bids_dir}: {' '.join(bad)}: no T1w image in the session given with "
                                "--session-label (expected anat/<...>_T1w.nii[.gz]); leave it out of "
                                "--session-label")
    return records


#: entities that decide between several images of one subject/session, in this order
CHOICE_ENTITIES = ("acq", "ce", "rec", "run", "echo", "part")


def choice_key(path: str | Path) -> tuple:
    """Sort key of the several-images rule: for each of :data:`CHOICE_ENTITIES` in turn, an
    image without the entity comes first, then numeric labels in numeric order, then text
    labels alphabetically; the file name breaks ties."""
    name = Path(path).name
    ents = dict(re.findall(r"(?:^|_)([a-zA-Z]+)-([a-zA-Z0-9]+)(?=_)", name))
    key = []
    for entity in CHOICE_ENTITIES:
        value = ents.get(entity)
        key.append((0, 0, 0, "") if value is None else
                   (1, 0, int(value), value) if value.isdigit() else (1, 1, 0, value))
    return (*key, name)


def _one(files: list[str], what: str, key: str) -> tuple[Path | None, tuple[Path, ...]]:
    """The chosen file by :func:`choice_key` and, when there were several, all candidates
    (chosen first); a warning names the choice."""
    files = sorted(files, key=choice_key)
    if len(files) > 1:
        log.warning("%s: %d candidate %s images (%s), using %s by the choice rule (docs/inputs.md); "
                    "select another with --bids-filter-file", key, len(files), what,
                    ", ".join(Path(f).name for f in files), Path(files[0]).name)
    return (Path(files[0]) if files else None), (tuple(Path(f) for f in files) if len(files) > 1 else ())


def _t1w_files(layout, sub: str, ses: str, query: dict) -> list[str]:
    """Raw T1w NIfTIs of one subject/session matching the pybids ``query``."""
    ses_q = {"session": ses} if ses else {}
    files = layout.get(subject=sub, suffix="T1w", datatype="anat", extension=[".nii", ".nii.gz"],
                       scope="raw", return_type="file", invalid_filters="allow", **ses_q, **query)
    return [f for f in files if f"ses-{ses}" in Path(f).name] if ses else files


def _companion(path: Path, ext: str) -> Path:
    """``x_dwi.nii.gz`` -> ``x_dwi<ext>`` (same folder)."""
    return path.with_name(re.sub(r"\.nii(\.gz)?$", ext, path.name))


def _dwi_series(layout, sub: str, ses: str, filters: dict, key: str, raw_preprocessed: bool) -> DwiInputs | None:
    """The preprocessed DWI series of one subject/session (see :func:`discover`), or None."""
    ses_q = {"session": ses} if ses else {}
    found = layout.get(subject=sub, suffix="dwi", extension=[".nii", ".nii.gz"], scope="derivatives",
                       return_type="file", invalid_filters="allow", **ses_q)
    hits = [f for f in found if QSIPREP_DWI.search(Path(f).name)
            and (not ses or f"_ses-{ses}_" in Path(f).name)]
    hits = _apply_name_filters(hits, filters.get("dwi", {}))
    chosen, _ = _one(hits, "preprocessed DWI", key)
    if chosen is not None:
        masks = [chosen.with_name(re.sub(r"desc-preproc_dwi\.nii(\.gz)?$", f"desc-brain_mask{ext}", chosen.name))
                 for ext in (".nii.gz", ".nii")]
        mask = next((m for m in masks if m.is_file()), masks[0])
        btable = _companion(chosen, ".b")
        return DwiInputs(chosen, _companion(chosen, ".bval"), _companion(chosen, ".bvec"),
                         mask if mask.is_file() else None, "qsiprep", btable if btable.is_file() else None)
    raw = [f for f in layout.get(subject=sub, suffix="dwi", datatype="dwi", extension=[".nii", ".nii.gz"],
                                 scope="raw", return_type="file", invalid_filters="allow", **ses_q)
           if not ses or f"ses-{ses}" in Path(f).name]
    raw = _apply_name_filters(raw, filters.get("dwi", {}))
    if not raw:
        return None
    if not raw_preprocessed:
        log.info("%s: a raw dwi/ image is not fitted unless declared preprocessed (--dwi-preprocessed)", key)
        return None
    chosen, _ = _one(raw, "raw DWI", key)
    try:
        bval, bvec = Path(layout.get_bval(str(chosen))), Path(layout.get_bvec(str(chosen)))
    except Exception:  # pybids raises when no .bval/.bvec applies; the fit then names the file it expected
        bval, bvec = _companion(chosen, ".bval"), _companion(chosen, ".bvec")
    return DwiInputs(chosen, bval, bvec, None, "bids")


def _record(layout, sub: str, ses: str, filters: dict, dwi_preprocessed: bool = False) -> SubjectRecord:
    key = subject_stem(sub, ses)
    ses_q = {"session": ses} if ses else {}
    chosen, choices = {}, {}
    chosen["t1w"], choices["t1w"] = _one(_t1w_files(layout, sub, ses, _entities_query(filters, "t1w")), "T1w", key)
    candidates = layout.get(subject=sub, suffix="dwimap", extension=[".nii", ".nii.gz"],
                            scope="derivatives", return_type="file", invalid_filters="allow", **ses_q)
    for modality, pattern in DERIVATIVE_PATTERNS.items():
        hits = [f for f in candidates if pattern.search(Path(f).name)]
        if ses:
            hits = [f for f in hits if f"_ses-{ses}_" in Path(f).name]
        hits = _apply_name_filters(hits, filters.get(modality, {}))
        chosen[modality], choices[modality] = _one(hits, modality.upper(), key)
    dwi = None
    if chosen["fa"] is None or chosen["ndi"] is None:
        dwi = _dwi_series(layout, sub, ses, filters, key, dwi_preprocessed)
    missing = {}
    if chosen["t1w"] is None:
        missing["t1w"] = EXPECTED_NAMES["t1w"].replace("<label>", sub, 1)
    for modality in ("fa", "ndi"):
        if chosen[modality] is None:
            missing[modality] = EXPECTED_NAMES[modality] + ("" if dwi is None else f" (to be fitted from {dwi.dwi.name})")
    return SubjectRecord(sub, ses, chosen["t1w"], chosen["fa"], chosen["ndi"], missing,
                         {m: c for m, c in choices.items() if c}, dwi)


def choices_summary(records: list[SubjectRecord]) -> dict:
    """For provenance: ``{key: {modality: {"used": name, "not_used": [names]}}}`` where a
    record had several candidates."""
    return {r.key: {m: {"used": c[0].name, "not_used": [p.name for p in c[1:]]} for m, c in r.choices.items()}
            for r in records if r.choices}


_ENTITY_KEYS = {"acquisition": "acq", "reconstruction": "rec", "run": "run", "space": "space",
                "desc": "desc", "model": "model", "param": "param"}


def _apply_name_filters(files: list[str], query: dict) -> list[str]:
    """Keep files whose names carry every ``entity-value`` of ``query``."""
    out = files
    for entity, value in query.items():
        short = _ENTITY_KEYS.get(entity, entity)
        out = [f for f in out if f"_{short}-{value}_" in Path(f).name]
    return out


def check_is_bids(bids_dir: Path) -> None:
    """Cheap sanity check before anything else: a folder with dataset_description.json."""
    if not bids_dir.is_dir():
        raise MissingInputError(f"{bids_dir}: bids_dir does not exist; give the path of a BIDS dataset")
    if not (bids_dir / "dataset_description.json").is_file():
        raise MissingInputError(f"{bids_dir}: no dataset_description.json, so not a BIDS dataset; "
                                "point bids_dir at the dataset root")


def run_validator(bids_dir: Path) -> None:
    """Run the official BIDS validator (bids-validator-deno); raise ValidationError on errors."""
    import os
    import shutil
    import subprocess
    import sys

    # next to this Python first: a venv's mmfusion called by its full path (batch scripts)
    # has its bin/ off PATH
    beside = Path(sys.executable).parent / "bids-validator-deno"
    exe = str(beside) if os.access(beside, os.X_OK) else shutil.which("bids-validator-deno")
    if exe is None:
        raise ValidationError("bids-validator-deno is not installed (a dependency of mmfusion): reinstall with "
                              "`python -m pip install -c requirements.lock -e .`, or pass --skip-bids-validation")
    proc = subprocess.run([exe, "--json", str(bids_dir)], capture_output=True, text=True)
    try:
        issues = json.loads(proc.stdout).get("issues", {}).get("issues", [])
    except json.JSONDecodeError:
        issues = None
    if issues is None:
        if proc.returncode != 0:
            raise ValidationError(f"{bids_dir}: BIDS validation failed (validator exit {proc.returncode}); "
                                  "run bids-validator-deno on it, or pass --skip-bids-validation")
        return
    errors = [i for i in issues if i.get("severity") == "error"]
    if errors:
        codes = sorted({i.get("code", "?") for i in errors})
        first = errors[0]
        where = first.get("location", "")
        raise ValidationError(f"{bids_dir}: BIDS validation found {len(errors)} error(s) ({', '.join(codes[:5])}; "
                              f"first at {where}); fix them or pass --skip-bids-validation")
