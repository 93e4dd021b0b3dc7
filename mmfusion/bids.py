"""Input discovery: raw T1w and derivative FA/NDI maps, one record per subject/session."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SubjectRecord:
    """Everything the participant level needs for one subject (and session).

    ``subject``/``session`` are labels without ``sub-``/``ses-`` (session '' if the
    dataset has none). ``t1w`` is the raw T1w; ``fa``/``ndi`` are derivative maps in the
    subject's T1w space (None when absent; ``missing`` then says which pattern was
    expected).
    """

    subject: str
    session: str
    t1w: Path | None
    fa: Path | None = None
    ndi: Path | None = None
    missing: dict = field(default_factory=dict)  # modality -> expected filename pattern

    @property
    def key(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    def inputs(self) -> dict[str, Path]:
        """Present inputs by modality name: {'t1w': ..., 'fa': ..., 'ndi': ...}."""
        return {k: v for k, v in (("t1w", self.t1w), ("fa", self.fa), ("ndi", self.ndi)) if v is not None}


# --------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------
import json
import re

from mmfusion.errors import (InputDataError, MissingInputError, NoFilesSelectedError,
                             UsageError, ValidationError)
from mmfusion.runlog import get_logger

log = get_logger(__name__)

#: QSIRecon (``param-``) and older QSIPrep (``mdp-``) spellings, T1w or ACPC space.
DERIVATIVE_PATTERNS = {
    "fa": re.compile(r"_space-(T1w|ACPC)_(?:.*_)?model-tensor_(?:.*_)?(param|mdp)-fa_(?:.*_)?dwimap\.nii(\.gz)?$"),
    "ndi": re.compile(r"_space-(T1w|ACPC)_(?:.*_)?model-noddi_(?:.*_)?(param|mdp)-icvf_(?:.*_)?dwimap\.nii(\.gz)?$"),
}
EXPECTED_NAMES = {
    "t1w": "sub-<label>[_ses-<label>]_T1w.nii[.gz] in sub-<label>/[ses-<label>/]anat/",
    "fa": "sub-<label>[_ses-<label>]_space-T1w_model-tensor_param-fa_dwimap.nii.gz "
          "(or mdp-fa, space-ACPC) in a --derivatives dataset",
    "ndi": "sub-<label>[_ses-<label>]_space-T1w_model-noddi_param-icvf_dwimap.nii.gz "
           "(or mdp-icvf, space-ACPC) in a --derivatives dataset",
}


def strip_prefix(label: str, prefix: str) -> str:
    """'sub-01' -> '01', '01' -> '01'."""
    return label[len(prefix):] if label.startswith(prefix) else label


def find_derivative_datasets(bids_dir: Path, given: list[Path] | None) -> list[Path]:
    """``--derivatives`` paths, or every dataset under ``bids_dir/derivatives/`` if none given."""
    if given:
        for path in given:
            if not (Path(path) / "dataset_description.json").is_file():
                raise MissingInputError(
                    f"{path}: not a BIDS derivatives dataset (no dataset_description.json); "
                    "pass the folder that holds dataset_description.json to --derivatives")
        return [Path(p).resolve() for p in given]
    root = bids_dir / "derivatives"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "dataset_description.json").is_file())


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
) -> list[SubjectRecord]:
    """One :class:`SubjectRecord` per selected subject/session that has a T1w or derivatives.

    Raises NoFilesSelectedError (exit 18) if a requested participant/session label does
    not exist (the message lists those that do) or the filters select no T1w at all.
    """
    bids_dir = Path(bids_dir).resolve()
    filters = filters or {}
    deriv = find_derivative_datasets(bids_dir, derivatives)
    layout = _layout(bids_dir, deriv)
    all_subjects = _all_subjects(layout, bids_dir)
    subjects = _select_labels(all_subjects, participant_labels, "sub-", "participant", bids_dir)
    records: list[SubjectRecord] = []
    for sub in subjects:
        sessions = sorted(layout.get_sessions(subject=sub, scope="raw")) or [""]
        chosen = _select_labels(sessions, session_labels, "ses-", f"session (of sub-{sub})", bids_dir) \
            if session_labels and sessions != [""] else sessions
        for ses in chosen:
            records.append(_record(layout, sub, ses, filters))
    if not any(r.t1w for r in records):
        raise NoFilesSelectedError(f"{bids_dir}: the selection (labels/filters) matched no T1w image; "
                                   f"expected {EXPECTED_NAMES['t1w']}")
    log.info("discovered %d subject/session record(s) in %s (%d derivative dataset(s))",
             len(records), bids_dir, len(deriv))
    return records


def _all_subjects(layout, bids_dir: Path) -> list[str]:
    """Subjects with raw files, a ``sub-*`` folder, or a row in participants.tsv."""
    found = set(layout.get_subjects(scope="raw"))
    found |= {p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir()}
    table = bids_dir / "participants.tsv"
    if table.is_file():
        lines = table.read_text().splitlines()
        if lines and lines[0].split("\t")[0] == "participant_id":
            found |= {strip_prefix(line.split("\t")[0], "sub-") for line in lines[1:] if line.strip()}
    return sorted(found)


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


def _one(files: list[str], what: str, key: str) -> Path | None:
    files = sorted(files)
    if len(files) > 1:
        log.warning("%s: %d candidate %s images, using %s (select one with --bids-filter-file)",
                    key, len(files), what, Path(files[0]).name)
    return Path(files[0]) if files else None


def _record(layout, sub: str, ses: str, filters: dict) -> SubjectRecord:
    key = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    ses_q = {"session": ses} if ses else {}
    t1w = layout.get(subject=sub, suffix="T1w", datatype="anat", extension=[".nii", ".nii.gz"],
                     scope="raw", return_type="file", invalid_filters="allow",
                     **ses_q, **_entities_query(filters, "t1w"))
    if ses:
        t1w = [f for f in t1w if f"ses-{ses}" in Path(f).name]
    maps = {}
    candidates = layout.get(subject=sub, suffix="dwimap", extension=[".nii", ".nii.gz"],
                            scope="derivatives", return_type="file", invalid_filters="allow", **ses_q)
    for modality, pattern in DERIVATIVE_PATTERNS.items():
        hits = [f for f in candidates if pattern.search(Path(f).name)]
        if ses:
            hits = [f for f in hits if f"_ses-{ses}_" in Path(f).name]
        hits = _apply_name_filters(hits, filters.get(modality, {}))
        maps[modality] = _one(hits, modality.upper(), key)
    missing = {}
    t1w_path = _one(t1w, "T1w", key)
    if t1w_path is None:
        missing["t1w"] = EXPECTED_NAMES["t1w"].replace("<label>", sub, 1)
    for modality in ("fa", "ndi"):
        if maps[modality] is None:
            missing[modality] = EXPECTED_NAMES[modality]
    return SubjectRecord(sub, ses, t1w_path, maps["fa"], maps["ndi"], missing)


_ENTITY_KEYS = {"acquisition": "acq", "reconstruction": "rec", "run": "run", "space": "space",
                "desc": "desc", "model": "model", "param": "param"}


def _apply_name_filters(files: list[str], query: dict) -> list[str]:
    """Keep files whose names carry every ``entity-value`` of ``query``."""
    out = files
    for entity, value in query.items():
        short = _ENTITY_KEYS.get(entity, entity)
        out = [f for f in out if f"_{short}-{value}_" in Path(f).name]
    return out


def require_modalities(records: list[SubjectRecord], modalities: list[str]) -> None:
    """Raise MissingInputError listing each subject that lacks one of ``modalities``.

    ``modalities`` uses input names: 't1w', 'fa', 'ndi'.
    """
    problems = [f"{r.key}: no {m.upper()} (expected {r.missing[m]})"
                for r in records for m in modalities if m in r.missing]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise MissingInputError("; ".join(problems[:5]) + more)


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
