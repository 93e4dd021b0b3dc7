"""Group level: which subjects are analysed when some shards are missing; phenotype-only rows."""
from types import SimpleNamespace

import pytest

from mmfusion.errors import MissingInputError
from mmfusion.report import group_report
from mmfusion.levels.group import check_shards, count_phenotype_only
from mmfusion.provenance import Provenance
from mmfusion.io.bids import subject_stem as shard_stem
from mmfusion.io.shards import split_stem


def _ctx(tmp_path, allow_missing, labels=()):
    bids, out = tmp_path / "bids", tmp_path / "out"
    for sub in ("01", "02", "03"):
        (bids / f"sub-{sub}").mkdir(parents=True)
    (out / "shards").mkdir(parents=True)
    for stem in ("sub-01", "sub-03_ses-1", "sub-03_ses-2"):
        (out / "shards" / f"{stem}.h5").write_bytes(stem.encode())
    return SimpleNamespace(bids_dir=bids, output_dir=out, participant_labels=list(labels),
                           allow_missing=allow_missing, provenance=Provenance("g", "group", [], {}, 0))


def test_missing_shards_are_refused_with_their_list(tmp_path):
    with pytest.raises(MissingInputError, match=r"no shard for 1 subject\(s\): sub-02; .*--allow-missing"):
        check_shards(_ctx(tmp_path, allow_missing=False))


def test_allow_missing_analyses_the_others_and_records_them(tmp_path):
    ctx = _ctx(tmp_path, allow_missing=True)
    assert check_shards(ctx) == ["01", "03"]
    assert ctx.provenance.extra["subjects_missing_shards"] == ["sub-02"]
    assert len(ctx.provenance.inputs) == 3  # every session's shard is hashed


def test_participant_labels_restrict_the_expected_subjects(tmp_path):
    assert check_shards(_ctx(tmp_path, allow_missing=False, labels=["03"])) == ["03"]


def test_phenotype_only_participants_are_counted_and_reported(tmp_path):
    ctx = _ctx(tmp_path, allow_missing=True)
    (ctx.bids_dir / "participants.tsv").write_text("participant_id\tage\nsub-01\t3\nsub-02\t4\nsub-03\t5\n"
                                                   "sub-04\t6\n05\t7\n")
    assert check_shards(ctx) == ["01", "03"]  # the phenotype-only 04, 05 are not expected to have shards
    assert count_phenotype_only(ctx) == ["sub-04", "sub-05"]
    assert ctx.provenance.extra["phenotype_only_participants"] == ["sub-04", "sub-05"]
    html = group_report._section_cohort(ctx.output_dir, {"n_embeddings": 2}, ctx.provenance.as_dict())
    assert "<th>phenotype only (in participants.tsv, never imaged)</th><td>2</td>" in html


def test_shard_stem_round_trip():
    for sub, ses in (("01", ""), ("A1", "pre"), ("7", "2")):
        assert split_stem(shard_stem(sub, ses)) == (sub, ses)
