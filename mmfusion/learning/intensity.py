"""Population robust min-max normalization (docs/method.md#2-intensity-normalization).

Per modality, the values at the ``lower_percentile`` (0.1) and ``upper_percentile``
(99.9) percentiles of ALL voxels of ALL training subjects map to 0 and 1; values are
clipped to [0, 1]. With ``brain_mask`` (the default, as the paper's code), "all voxels"
are those inside each shard's template brain mask, and every normalized volume is
multiplied by that mask (background exactly 0): the model, the percentiles and the
metrics see brain, not background. The parameters are fitted on the training subjects only, saved as
JSON next to the model and reused unchanged for validation and inference.

The percentiles are EXACT (identical to ``numpy.percentile`` with linear interpolation
over the concatenated voxels) yet need memory for one volume at a time: a streaming
histogram search. Pass 0 (shared with the shard scan) gives count, min and max; each
further pass histograms, into ``histogram_bins`` bins, only the values inside the
current window around each needed order statistic and narrows the window to the bin
that holds it. A window whose values are all equal, or that holds at most
``_COLLECT_MAX`` values (which are then sorted), resolves the order statistic. With
65536 bins this takes 2-3 passes over the training shards.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from mmfusion.io.atomic import write_json
from mmfusion.errors import InputDataError
from mmfusion.runlog import get_logger

log = get_logger(__name__)
_COLLECT_MAX = 1 << 22  # values per window sorted in memory (32 MiB of float64)
Reader = Callable[[str | Path, str], np.ndarray]


@dataclass
class _Window:
    """Search state for one order statistic ``rank`` (0-based) of one modality."""

    rank: int
    low: float
    high: float
    below: int = 0            # number of values < low
    closed: bool = True       # whether ``high`` itself belongs to the window
    count: int | None = None  # values inside the window (None = unknown)
    value: float | None = None
    _hist: np.ndarray | None = None
    _vmin: float = math.inf
    _vmax: float = -math.inf
    _collected: list = field(default_factory=list)

    def select(self, x: np.ndarray) -> np.ndarray:
        upper = x <= self.high if self.closed else x < self.high
        return x[(x >= self.low) & upper]

    def feed(self, x: np.ndarray, bins: int) -> None:
        inside = self.select(x)
        if inside.size == 0:
            return
        self._vmin = min(self._vmin, float(inside.min()))
        self._vmax = max(self._vmax, float(inside.max()))
        if self.collecting:
            self._collected.append(inside)
        else:
            hist, _ = np.histogram(inside, bins=bins, range=(self.low, self.high))
            self._hist = hist if self._hist is None else self._hist + hist

    @property
    def collecting(self) -> bool:
        return self.count is not None and self.count <= _COLLECT_MAX

    def finish_pass(self, bins: int) -> None:
        if self._vmin == self._vmax:  # every value in the window is the same
            self.value = self._vmin
        elif self.collecting:
            values = np.sort(np.concatenate(self._collected))
            self.value = float(values[self.rank - self.below])
        else:
            edges = np.linspace(self.low, self.high, bins + 1)
            cum = np.cumsum(self._hist)
            j = int(np.searchsorted(cum, self.rank - self.below, side="right"))
            self.below += int(cum[j - 1]) if j > 0 else 0
            self.count = int(self._hist[j])
            self.closed = self.closed and j == bins - 1
            self.low, self.high = float(edges[j]), float(edges[j + 1])
        self._hist, self._collected = None, []
        self._vmin, self._vmax = math.inf, -math.inf


def _linear_ranks(n: int, percentile: float) -> tuple[int, int, float]:
    """numpy 'linear' percentile: (lower rank, upper rank, fraction) for ``n`` values."""
    pos = percentile / 100.0 * (n - 1)
    lo = int(math.floor(pos))
    return lo, min(lo + 1, n - 1), pos - lo


def streaming_percentiles(
    chunks: Callable[[], Iterable[np.ndarray]],
    percentiles: Sequence[float],
    count: int,
    vmin: float,
    vmax: float,
    bins: int = 65536,
) -> list[float]:
    """Exact percentiles (numpy 'linear') of all values yielded by ``chunks()``.

    ``chunks`` is called once per pass and yields 1-D or N-D float arrays (e.g. one
    volume per subject); ``count``, ``vmin`` and ``vmax`` describe all values together.
    """
    if count <= 0:
        raise ValueError("no values to compute percentiles of")
    plan = [_linear_ranks(count, p) for p in percentiles]
    ranks = sorted({r for lo, hi, _ in plan for r in (lo, hi)})
    windows = {r: _Window(rank=r, low=float(vmin), high=float(vmax)) for r in ranks}
    for w in windows.values():
        if vmin == vmax:
            w.value = float(vmin)
    passes = 0
    while any(w.value is None for w in windows.values()):
        open_windows = [w for w in windows.values() if w.value is None]
        for chunk in chunks():
            flat = np.asarray(chunk, np.float64).ravel()
            for w in open_windows:
                w.feed(flat, bins)
        for w in open_windows:
            w.finish_pass(bins)
        passes += 1
    log.debug("exact percentiles %s in %d histogram passes", list(percentiles), passes)
    out = []
    for lo, hi, frac in plan:
        a, b = windows[lo].value, windows[hi].value
        out.append(a + (b - a) * frac)
    return out


@dataclass
class VolumeStats:
    """Count, min, max and non-finite count of one volume (pass 0 of the fit)."""

    count: int
    vmin: float
    vmax: float
    nonfinite: int = 0

    @classmethod
    def of(cls, image: np.ndarray) -> "VolumeStats":
        finite = np.isfinite(image)
        nonfinite = int(image.size - finite.sum())
        values = image[finite] if nonfinite else image
        if values.size == 0:
            return cls(0, math.inf, -math.inf, nonfinite)
        return cls(int(values.size), float(values.min()), float(values.max()), nonfinite)


class PopulationNormalizer:
    """Robust min-max to [0, 1] per modality, fitted across subjects.

    ``ranges[m] = (low, high)``: the population percentiles (input units of modality m).
    ``brain_mask``: percentiles over in-mask voxels, and :meth:`transform` zeroes the
    background when given the shard's mask (``mmfusion.learning.shard_data`` does).
    """

    def __init__(self, lower_percentile: float = 0.1, upper_percentile: float = 99.9,
                 histogram_bins: int = 65536, brain_mask: bool = False):
        if not 0 <= lower_percentile < upper_percentile <= 100:
            raise ValueError("need 0 <= lower_percentile < upper_percentile <= 100")
        self.lower_percentile = float(lower_percentile)
        self.upper_percentile = float(upper_percentile)
        self.histogram_bins = int(histogram_bins)
        self.brain_mask = bool(brain_mask)
        self.ranges: dict[str, tuple[float, float]] = {}
        self.fitted_on: list[str] = []
        self.n_voxels: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg: dict) -> "PopulationNormalizer":
        """From the ``normalization`` config section."""
        return cls(cfg["lower_percentile"], cfg["upper_percentile"], cfg["histogram_bins"], cfg["brain_mask"])

    def fit(self, paths: Sequence[Path], modalities: Sequence[str], reader: Reader,
            stats: dict[tuple[str, str], VolumeStats] | None = None) -> "PopulationNormalizer":
        """Fit on the shards ``paths`` (training subjects only), streaming volumes.

        ``reader(path, modality)`` returns one float32 volume, (X, Y, Z) or, with
        ``brain_mask``, its in-mask voxels (V,). ``stats`` maps ``(str(path), modality)``
        to precomputed :class:`VolumeStats` of what ``reader`` returns (saves a pass).
        Raises InputDataError if a modality is constant across the population.
        """
        stats = dict(stats or {})
        for path in paths:
            for m in modalities:
                if (str(path), m) not in stats:
                    stats[(str(path), m)] = VolumeStats.of(reader(path, m))
        for m in modalities:
            parts = [stats[(str(p), m)] for p in paths]
            count = sum(s.count for s in parts)
            vmin, vmax = min(s.vmin for s in parts), max(s.vmax for s in parts)

            def chunks(m=m):
                for p in paths:
                    yield reader(p, m)

            low, high = streaming_percentiles(chunks, [self.lower_percentile, self.upper_percentile],
                                              count, vmin, vmax, self.histogram_bins)
            if not high > low:
                raise InputDataError(
                    f"modality {m}: the {self.lower_percentile} and {self.upper_percentile} percentiles "
                    f"are equal ({low}) across {len(paths)} shards; the images are constant, check the participant level"
                )
            self.ranges[m] = (low, high)
            self.n_voxels[m] = count
            log.info("normalization %s: p%g=%.6g -> 0, p%g=%.6g -> 1 (%d subjects)", m,
                     self.lower_percentile, low, self.upper_percentile, high, len(paths))
        self.fitted_on = [Path(p).stem for p in paths]
        return self

    def transform(self, image: np.ndarray, modality: str, mask: np.ndarray | None = None) -> np.ndarray:
        """Map a volume (X, Y, Z) of ``modality`` to [0, 1], float32; with ``brain_mask``,
        voxels outside ``mask`` (bool (X, Y, Z), the shard's brain mask; required) are 0."""
        if modality not in self.ranges:
            raise KeyError(f"normalizer was not fitted for modality {modality!r}")
        low, high = self.ranges[modality]
        out = (np.asarray(image, np.float32) - np.float32(low)) / np.float32(high - low)
        np.clip(out, 0.0, 1.0, out=out)
        if self.brain_mask:
            if mask is None:
                raise ValueError("this normalizer masks the background: pass the shard's brain mask")
            out[~mask] = 0.0
        return out

    def to_dict(self) -> dict:
        return {
            "method": "population robust min-max, clipped to [0, 1]",
            "lower_percentile": self.lower_percentile,
            "upper_percentile": self.upper_percentile,
            "histogram_bins": self.histogram_bins,
            "brain_mask": self.brain_mask,
            "modalities": {m: {"low": lo, "high": hi, "n_voxels": self.n_voxels.get(m)}
                           for m, (lo, hi) in self.ranges.items()},
            "fitted_on": self.fitted_on,
        }

    def save(self, path: str | Path) -> Path:
        """Write the fitted parameters atomically as JSON."""
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "PopulationNormalizer":
        """Read parameters written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
            norm = cls(data["lower_percentile"], data["upper_percentile"], data["histogram_bins"],
                       data.get("brain_mask", False))  # files of 0.3.0 and before: unmasked
            norm.ranges = {m: (float(v["low"]), float(v["high"])) for m, v in data["modalities"].items()}
            norm.n_voxels = {m: v.get("n_voxels") for m, v in data["modalities"].items()}
            norm.fitted_on = list(data.get("fitted_on", []))
        except (OSError, KeyError, ValueError) as exc:
            raise InputDataError(f"{path}: not a readable normalization file ({exc}); refit the group level") from exc
        return norm
