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
