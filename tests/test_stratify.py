"""AP grid search: labels bit-identical to scikit-learn, silhouette, selection, failures."""
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import silhouette_score

from mmfusion.strata import ap_grid as st
from mmfusion.strata import ap_kernel as apk
from mmfusion.config import default_config
from mmfusion.errors import InputDataError


def _blobs(n=60, d=8, centers=4, std=2.0, seed=1):
    X, y = make_blobs(n, d, centers=centers, cluster_std=std, random_state=seed)
    return X, y


def _grid(X, n_d=3, n_p=5, perc=(1.0, 50.0)):
    S = st.similarity_matrix(X)
    dd, pp = np.meshgrid(st.damping_grid(n_d, 0.5), st.preference_grid(S, n_p, perc), indexing="ij")
    return S, dd.ravel(), pp.ravel()


def test_labels_identical_to_sklearn_including_non_converged():
    X, _ = _blobs(n=70, std=4.0)
    S, dd, pp = _grid(X, n_d=3, n_p=5)
    dd, pp = np.append(dd, 0.95), np.append(pp, pp[0])
    Sn, zd = apk.noised_similarity(S, seed=3)
    labels, n_iter, conv = apk.ap_fits(Sn, zd, dd, pp, max_iter=40, convergence_iter=15, n_threads=2)
    n_clusters = set()
    for k in range(dd.size):
        ref, ref_conv, ref_iter = st.sklearn_reference_labels(X, dd[k], pp[k], 3, 40, 15)
        assert conv[k] == ref_conv, k
        assert n_iter[k] == ref_iter, k
        if ref_conv:
            np.testing.assert_array_equal(labels[k], ref)
            n_clusters.add(int(ref.max()) + 1)
        else:
            assert (labels[k] == -1).all()
    assert conv.sum() >= 5 and (~conv).sum() >= 1      # both kinds of fit were exercised
    assert len(n_clusters) >= 2                          # and several partitions


def test_numpy_fallback_gives_the_same_labels():
    X, _ = _blobs(n=40, seed=5)
    S, dd, pp = _grid(X, n_d=2, n_p=3)
    Sn, zd = apk.noised_similarity(S, seed=0)
    a = apk.ap_fits(Sn, zd, dd, pp, 200, 15, 2, use_numba=True)
    b = apk.ap_fits(Sn, zd, dd, pp, 200, 15, 2, use_numba=False)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_batched_silhouette_equals_sklearn_with_singletons():
    X, _ = _blobs(n=30, seed=2)
    D = st.distance_matrix(st.similarity_matrix(X))
    rng = np.random.default_rng(0)
    labels = np.stack([rng.integers(0, k, 30) for k in (2, 3, 7)])
    labels[2, 0] = 7                                      # a singleton cluster
    labels[2] = np.unique(labels[2], return_inverse=True)[1]
    got = st.silhouette_scores(D, labels)
    want = [silhouette_score(D, lab, metric="precomputed") for lab in labels]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert np.isnan(st.silhouette_scores(D, np.zeros((1, 30), int))[0])


def test_damping_grid_excludes_one():
    g = st.damping_grid(10, 0.5)
    assert g.size == 10 and g[0] == 0.5 and g[-1] < 1.0
    np.testing.assert_allclose(np.diff(g), 0.05)


def test_grid_search_recovers_blobs_and_writes_outputs(tmp_path):
    X, y = _blobs(n=60, centers=3, std=1.0, d=6)
    cfg = dict(default_config()["stratify"], damping_n=2, preference_n=8)
    res = st.grid_search(X, cfg, seed=0)
    assert len(res.grid) == 16
    best = res.grid.loc[res.best["grid_index"]]
    assert best["silhouette"] == res.grid["silhouette"].max()
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(y, res.labels) == 1.0
    ids = pd.DataFrame({"participant_id": [f"sub-{i:02d}" for i in range(60)], "session": [""] * 60})
    paths = st.write_outputs(res, ids, tmp_path)
    lab = pd.read_csv(paths["labels"], sep="\t", keep_default_na=False)
    assert list(lab.columns) == ["participant_id", "session", "cluster"]
    assert lab["session"].eq("n/a").all()
    grid = pd.read_csv(paths["grid"], sep="\t")
    assert {"damping", "preference", "n_clusters", "silhouette", "converged"} <= set(grid.columns)
    assert paths["heatmap"].read_bytes()[:4] == b"\x89PNG"


def test_every_grid_point_failing_gives_a_clear_error():
    X, _ = _blobs(n=40, std=5.0)
    cfg = dict(default_config()["stratify"], damping_n=2, preference_n=3, max_iter=3)
    with pytest.raises(InputDataError) as err:
        st.grid_search(X, cfg, seed=0, source="emb.tsv")
    msg = str(err.value)
    assert "emb.tsv" in msg and "did not converge" in msg and "damping_min" in msg and "\n" not in msg


def test_identical_embeddings_are_refused():
    with pytest.raises(st.ClusteringError, match="identical"):
        st.grid_search(np.ones((10, 4)), default_config()["stratify"], source="emb.tsv")


def test_single_cluster_everywhere_is_reported():
    # one blob, preference = the lowest similarity: every fit converges to one cluster
    X, _ = make_blobs(30, 8, centers=1, cluster_std=1.0, random_state=1)
    cfg = dict(default_config()["stratify"], damping_n=3, preference_n=3, preference_percentiles=[0.0, 0.0])
    with pytest.raises(st.ClusteringError, match="9 gave 1 or n clusters"):
        st.grid_search(X, cfg, source="emb.tsv")


def test_tie_breaking_is_deterministic():
    grid = pd.DataFrame({"damping": [0.6, 0.5, 0.5, 0.5], "preference": [-1.0, -2.0, -1.0, -3.0],
                         "n_clusters": [3, 3, 3, 4], "silhouette": [0.5, 0.5, 0.5, 0.5],
                         "valid": [True, True, True, True]})
    assert st.select_best(grid) == 1


def _sklearn_messages(S, damping, n_iter):
    """A and R after ``n_iter`` iterations of scikit-learn's AP loop (S has the
    preferences on its diagonal already)."""
    n = S.shape[0]
    A, R, tmp = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n))
    for _ in range(n_iter):
        apk.sklearn_iteration(A, R, S, tmp, damping)
    return A, R


@pytest.mark.parametrize("ties", [False, True])
def test_kernel_messages_bit_identical_after_each_iteration(ties):
    # n = 150 is not a multiple of the vector width; with ties, A + S has many equal
    # maxima per row (integer similarities), which exercises the tie handling
    X, _ = _blobs(n=150, d=6, std=3.0, seed=4)
    S = st.similarity_matrix(X)
    Sn, zd = apk.noised_similarity(S, seed=0)
    if ties:
        Sn = np.round(Sn / 4.0)
    for damping, q in [(0.5, 5), (0.7, 50), (0.93, 95)]:
        sdiag = apk.noised_diagonal(np.percentile(S, q), zd)
        if ties:
            sdiag = np.round(sdiag / 4.0)
        full = Sn.copy()
        np.fill_diagonal(full, sdiag)
        AR = np.empty((150, 2, 150))
        for n_iter in (1, 2, 9):
            E = np.zeros(150, dtype=bool)
            it, conv = apk._ap_run(Sn, sdiag, damping, n_iter, n_iter + 1, E, AR)
            A, R = _sklearn_messages(full, damping, n_iter)
            assert (it, conv) == (n_iter, False)
            assert np.array_equal(AR[:, 0], A) and np.array_equal(AR[:, 1], R), (damping, q, n_iter)
            np.testing.assert_array_equal(E, np.diag(A) + np.diag(R) > 0)


def test_n150_labels_and_iterations_identical_to_sklearn():
    X, _ = _blobs(n=150, d=10, centers=6, std=3.0, seed=7)
    S = st.similarity_matrix(X)
    Sn, zd = apk.noised_similarity(S, seed=11)
    pairs = [(0.5, 10.0), (0.5, 50.0), (0.66, 30.0), (0.8, 2.0), (0.9, 50.0), (0.97, 20.0)]
    dd = np.array([d for d, _ in pairs])
    pp = np.array([np.percentile(S, q) for _, q in pairs])
    labels, n_iter, conv = apk.ap_fits(Sn, zd, dd, pp, max_iter=300, convergence_iter=15, n_threads=2)
    for k in range(len(pairs)):
        ref, ref_conv, ref_iter = st.sklearn_reference_labels(X, dd[k], pp[k], 11, 300, 15)
        assert (conv[k], n_iter[k]) == (ref_conv, ref_iter), pairs[k]
        if ref_conv:
            np.testing.assert_array_equal(labels[k], ref)
    assert conv.sum() >= 4


def test_exemplars_of_one_fit_equal_sklearn_centers():
    """ap_exemplars (the refit the bundle uses): scikit-learn's labels and cluster centers."""
    from sklearn.cluster import AffinityPropagation

    X, _ = _blobs(n=40, std=2.0)
    S = st.similarity_matrix(X)
    pref = float(np.median(S[~np.eye(len(X), dtype=bool)]))
    Sn, zd = apk.noised_similarity(S, seed=5)
    labels, centers = apk.ap_exemplars(Sn, zd, 0.6, pref, 200, 15)
    ref = AffinityPropagation(damping=0.6, preference=pref, max_iter=200, convergence_iter=15, random_state=5).fit(X)
    np.testing.assert_array_equal(labels, ref.labels_)
    np.testing.assert_array_equal(centers, ref.cluster_centers_indices_)


def test_stalled_fits_are_skipped_where_one_would_have_won():
    # The demo's final-model embedding (tests/data: 18 subjects on their 17 principal axes).
    # With the demo's grid, one fit at damping 0.95 stops at the first convergence check
    # (16 iterations) with a pair split off the rest; scikit-learn calls it converged and
    # its silhouette beats every settled fit, so before the rule it was the clustering.
    from pathlib import Path

    from mmfusion.config import load_config

    X = np.loadtxt(Path(__file__).parent / "data" / "demo_embedding_stalled_ap.tsv", comments="#")
    cfg = load_config(Path(__file__).parents[1] / "scripts" / "demo_config.yaml")["stratify"]
    res = st.grid_search(X, cfg, seed=1, quiet=True)
    g = res.grid
    stalled = g.converged & (g.n_iter == cfg["convergence_iter"] + 1)
    assert res.counts["stalled"] == int(stalled.sum()) > 0
    assert not g.loc[stalled, "valid"].any() and g.loc[stalled, "silhouette"].isna().all()
    assert res.best["n_iter"] > cfg["convergence_iter"] + 1 and res.best["n_clusters"] >= 3
    winner = g.loc[stalled].index[0]
    labels, converged, n_iter = st.sklearn_reference_labels(X, g.loc[winner, "damping"], g.loc[winner, "preference"], 1)
    assert converged and n_iter == cfg["convergence_iter"] + 1
    assert sorted(np.bincount(labels)) == [2, 16]
    assert silhouette_score(X, labels) > res.best["silhouette"] + 0.03
    assert st.stalled_fits(np.array([15, 16, 17]), 15).tolist() == [True, True, False]
