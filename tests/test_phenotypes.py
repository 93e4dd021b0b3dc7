"""Phenotype tables: BIDS join, encodings, bad input, missing values, PCA + varimax."""
import numpy as np
import pandas as pd
import pytest

from mmfusion.strata import phenotypes as ph
from mmfusion.config import default_config

CFG = default_config()["phenotypes"]


def _write(path, df):
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, sep="\t", index=False, na_rep="n/a")


def test_bids_tables_are_joined_on_participant_id(tmp_path):
    _write(tmp_path / "participants.tsv", pd.DataFrame({"participant_id": ["sub-01", "sub-02", "03"],
                                                        "age": [20, 30, 40]}))
    _write(tmp_path / "phenotype" / "mood.tsv", pd.DataFrame({"participant_id": ["sub-02", "sub-01"],
                                                              "score": [5, 6], "age": [31, 21]}))
    raw, files = ph.load_phenotypes(tmp_path)
    assert [f.name for f in files] == ["participants.tsv", "mood.tsv"]
    assert list(raw.index) == ["sub-01", "sub-02", "sub-03"]
    assert raw.loc["sub-02", "score"] == "5" and raw.loc["sub-02", "mood_age"] == "31"
    assert pd.isna(raw.loc["sub-03", "score"])


def test_user_csv_table(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame({"participant_id": ["sub-1", "sub-2"], "x": [1.5, 2.5]}).to_csv(path, index=False)
    raw, _ = ph.load_phenotypes(phenotypes_file=path)
    assert raw.loc["sub-2", "x"] == "2.5"


def test_table_without_participant_id_is_refused(tmp_path):
    path = tmp_path / "p.tsv"
    _write(path, pd.DataFrame({"subject": ["sub-1"], "x": [1]}))
    with pytest.raises(ph.PhenotypeError, match="p.tsv: no 'participant_id' column"):
        ph.load_phenotypes(phenotypes_file=path)


def _raw(**cols):
    n = len(next(iter(cols.values())))
    df = pd.DataFrame({k: [None if v is None else str(v) for v in vals] for k, vals in cols.items()})
    df.index = pd.Index([f"sub-{i:02d}" for i in range(n)], name="participant_id")
    return df


def test_junk_in_a_numeric_column_is_an_error():
    raw = _raw(a=[1, 2, 3, 4, 5], b=[1, 2, "abc", 4, 5], c=[3, 1, 2, 5, 4])
    with pytest.raises(ph.PhenotypeError, match=r"column 'b' .* 'abc' \(participant sub-02"):
        ph.prepare_variables(raw, CFG, source="pheno.tsv")


def test_zero_variance_and_unencodable_text_are_dropped_and_reported():
    raw = _raw(a=[1, 2, 3, 4, 5], const=[7, 7, 7, 7, 7], site=["x", "y", "z", "x", "y"], c=[3, 1, 2, 5, 4])
    table = ph.prepare_variables(raw, CFG)
    assert list(table.data.columns) == ["a", "c"]
    assert table.summary["variables_dropped"] == {"site": "text with 3 levels (not encodable)",
                                                  "const": "zero variance"}


def test_documented_categorical_encodings():
    raw = _raw(sex=["M", "F", "female", "male", "m"], hand=["R", "L", "A", "right", "left"],
               group=["ctl", "pat", "ctl", "pat", "pat"])
    data = ph.prepare_variables(raw, CFG).data
    assert data["sex"].tolist() == [1, 0, 0, 1, 1]
    assert data["hand"].tolist() == [1, -1, 0, 1, -1]
    assert data["group"].tolist() == [0, 1, 0, 1, 1]


def test_missing_values_median_and_listwise_are_counted():
    raw = _raw(a=[1, None, 3, 4, 10, 2], b=[2, 1, None, None, 5, 3], c=[1, 2, 3, 4, 6, 5])
    med = ph.prepare_variables(raw, dict(CFG, missing="median"))
    assert med.data.loc["sub-01", "a"] == 3.0 and med.data.loc["sub-02", "b"] == 2.5
    assert med.missing.set_index("variable")["n_missing"].to_dict() == {"a": 1, "b": 2, "c": 0}
    assert med.summary["cells_imputed"] == 3
    drop = ph.prepare_variables(raw, dict(CFG, missing="drop"))
    assert list(drop.data.index) == ["sub-00", "sub-04", "sub-05"]
    assert drop.summary["subjects_dropped_missing"] == ["sub-01", "sub-02", "sub-03"]


def test_listwise_deletion_refuses_too_few_subjects():
    raw = _raw(a=[1, None, 3, 4], b=[2, 1, None, None], c=[1, 2, 3, 4])
    with pytest.raises(ph.PhenotypeError, match="listwise deletion left 1"):
        ph.prepare_variables(raw, dict(CFG, missing="drop"))


def test_subject_alignment_counts_both_directions():
    common, counts = ph.align_subjects(["sub-1", "sub-2", "sub-3"], ["sub-2", "sub-3", "sub-4", "sub-5"])
    assert common == ["sub-2", "sub-3"]
    assert counts["only_embeddings"] == ["sub-1"] and counts["only_phenotypes"] == ["sub-4", "sub-5"]


def _varimax_reference(L, iters=5000, tol=1e-15):
    """Kaiser's varimax (the classic SVD iteration), written independently of statsmodels."""
    p, k = L.shape
    R = np.eye(k)
    d = 0.0
    for _ in range(iters):
        Lr = L @ R
        u, s, vt = np.linalg.svd(L.T @ (Lr ** 3 - Lr @ np.diag((Lr ** 2).sum(0)) / p))
        R = u @ vt
        if s.sum() < d * (1 + tol):
            break
        d = s.sum()
    return L @ R


def _two_block_data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((n, 2))
    cols = {}
    for b in range(2):
        for v in range(4):
            cols[f"b{b}v{v}"] = 0.85 * f[:, b] + 0.5 * rng.standard_normal(n)
    return pd.DataFrame(cols, index=[f"sub-{i}" for i in range(n)]), f


def test_factor_scores_match_an_independent_computation():
    data, _ = _two_block_data()
    fa = ph.factor_analysis(data, 1.0)
    assert fa.loadings.shape == (8, 2)
    Z = (data - data.mean()) / data.std(ddof=0)
    corr = np.corrcoef(Z.to_numpy(), rowvar=False)
    w, V = np.linalg.eigh(corr)
    w, V = w[::-1][:2], V[:, ::-1][:, :2]
    L_ref = _varimax_reference(V * np.sqrt(w))
    # closed form of the regression scores for PCA: Z V diag(1/sqrt(w)) T, T = the rotation
    T = np.linalg.lstsq(V * np.sqrt(w), L_ref, rcond=None)[0]
    S_ref = Z.to_numpy() @ V @ np.diag(1 / np.sqrt(w)) @ T
    for j in range(2):   # match columns up to order and sign
        c = [abs(np.corrcoef(fa.scores.iloc[:, j], S_ref[:, m])[0, 1]) for m in range(2)]
        m = int(np.argmax(c))
        sign = np.sign(np.dot(fa.scores.iloc[:, j], S_ref[:, m]))
        np.testing.assert_allclose(fa.scores.iloc[:, j], sign * S_ref[:, m], atol=1e-5)
        np.testing.assert_allclose(fa.loadings.iloc[:, j], sign * L_ref[:, m], atol=1e-5)
    # regression scores of an orthogonal rotation of PCA are standardized and uncorrelated
    np.testing.assert_allclose(np.cov(fa.scores.to_numpy(), rowvar=False, ddof=0), np.eye(2), atol=1e-8)


def test_two_block_structure_is_recovered():
    data, f = _two_block_data(seed=1)
    fa = ph.factor_analysis(data, 1.0)
    big = fa.loadings.abs() >= 0.3
    blocks = {c: set(big.index[big[c]]) for c in big.columns}
    assert sorted(map(sorted, blocks.values())) == [[f"b0v{i}" for i in range(4)], [f"b1v{i}" for i in range(4)]]
    assert (fa.loadings.max() > 0).all()                         # sign convention
    assert abs(np.corrcoef(fa.scores.iloc[:, 0], f[:, 0])[0, 1]) > 0.9 or \
        abs(np.corrcoef(fa.scores.iloc[:, 0], f[:, 1])[0, 1]) > 0.9
    ratio = fa.factors["explained_variance_ratio"]
    assert ratio.is_monotonic_decreasing and 0.5 < ratio.sum() < 1


def test_write_outputs(tmp_path):
    data, _ = _two_block_data(n=50)
    table = ph.prepare_variables(data.astype(str), CFG)
    fa = ph.factor_analysis(table.data)
    paths = ph.write_outputs(table, fa, tmp_path, 0.3)
    assert paths["loadings_png"].read_bytes()[:4] == b"\x89PNG"
    scores = pd.read_csv(paths["scores"], sep="\t")
    assert list(scores.columns) == ["participant_id", "F1", "F2"] and len(scores) == 50
