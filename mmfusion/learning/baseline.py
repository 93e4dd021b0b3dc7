"""The baseline every run is compared with: a PCA of the normalized input images.

docs/method.md#5-embeddings ("Baseline"). Each subject's normalized volumes (the same
[0, 1] scaling the autoencoder sees), restricted to the voxels inside the union of the
shards' brain masks and concatenated over modalities, form one row of an (n, V) matrix;
a PCA fitted on the training subjects (those of the fold, or all subjects for the final
baseline) maps every subject to ``stratify.baseline_components`` scores. The group level
clusters those scores with the same AP grid search as the learned embedding, so a user
can see whether the deep model adds anything over five or ten linear components.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mmfusion.learning import shard_data
from mmfusion.learning.intensity import PopulationNormalizer


def union_mask(paths: Sequence[Path]) -> np.ndarray:
    """bool (X, Y, Z): voxels inside the brain mask of at least one shard."""
    mask = None
    for p in paths:
        m = shard_data.read_mask(p)
        mask = m if mask is None else (mask | m)
    return mask


def image_matrix(paths: Sequence[Path], modalities: Sequence[str], normalizer: PopulationNormalizer,
                 mask: np.ndarray) -> np.ndarray:
    """float32 (n, V) with V = mask.sum() * len(modalities): normalized in-mask voxels of
    each shard, modalities concatenated in the given order."""
    rows = []
    for p in paths:
        vols = shard_data.load_subject(p, modalities, normalizer)
        rows.append(np.concatenate([vols[m][mask] for m in modalities]))
    return np.stack(rows).astype(np.float32)


def n_components(requested: int, n_train: int) -> int:
    """The PCA dimension actually used: at most n_train - 1 (at least 1)."""
    return max(1, min(int(requested), int(n_train) - 1))


def pca_scores(train: np.ndarray, everyone: np.ndarray, components: int, seed: int) -> np.ndarray:
    """float64 (n_everyone, c): PCA fitted on ``train`` (n_train, V), applied to
    ``everyone`` (n, V); c = :func:`n_components` (components, n_train)."""
    from sklearn.decomposition import PCA

    c = n_components(components, train.shape[0])
    pca = PCA(n_components=c, random_state=int(seed) % (2**32))  # float32; randomized SVD for large n
    pca.fit(train)
    return pca.transform(everyone).astype(np.float64)


def baseline_embeddings(train_paths: Sequence[Path], all_paths: Sequence[Path], modalities: Sequence[str],
                        normalizer: PopulationNormalizer, components: int, seed: int) -> np.ndarray:
    """(len(all_paths), c) baseline scores of every shard from a PCA of ``train_paths``."""
    mask = union_mask(all_paths)
    everyone = image_matrix(all_paths, modalities, normalizer, mask)
    index = {str(p): i for i, p in enumerate(all_paths)}
    train = everyone[[index[str(p)] for p in train_paths]]
    return pca_scores(train, everyone, components, seed)
