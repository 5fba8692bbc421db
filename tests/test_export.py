"""`seqclust export`: audiences per segment in each format, the minimum-size rule, pseudonyms,
and clear errors for a run that does not exist or a folder that is not ours."""

from __future__ import annotations

import json

import pytest

from seqclust.core import tables
from seqclust.core.privacy import pseudonym_py

SALT = "a-test-salt-of-some-length"
SIZES = {0: 60, 1: 55, 2: 12}  # segment 2 is under the default minimum of 50
# the segment tree: segment 0 splits at its 30th user (leaves 0.0 and 0.1), 1 and 2 are leaves
LEAF = {(0, False): (0, "0.0"), (0, True): (1, "0.1"), (1, False): (2, "1"), (1, True): (2, "1"), (2, False): (3, "2"), (2, True): (3, "2")}


@pytest.fixture()
def exported_run(spark, ctx, store, monkeypatch):
    from seqclust.app.pipeline import save_record
    from seqclust.core.config import PipelineConfig, RunConfig
    from seqclust.core.tables import RunRecord

    monkeypatch.setenv("SEQCLUST_PSEUDONYM_SALT", SALT)
    rows = []
    for c, n in SIZES.items():
        # confidence: a tenth of each segment's users at each of 0.0, 0.1, ..., 0.9 (half that at the leaves)
        rows += [("user", f"u{c}-{i}", c, 0.5, "coarse", str(c), (i % 10) / 10) for i in range(n)]
        rows += [("user", f"u{c}-{i}", LEAF[(c, i >= 30)][0], 0.4, "leaf", LEAF[(c, i >= 30)][1], (i % 10) / 20) for i in range(n)]
    rows += [("user", "u0-0", 7, 0.1, "fine", None, 0.0)]  # fine segments are not audiences
    ctx.write(spark.createDataFrame(rows, tables.CLUSTERS), "clusters")
    prof = [
        (c, "coarse", str(c), n, n / 127, 1.0, {}, {}, 0.1, 3.0, 60.0, 10.0, None, None, [], f"segment {c} described")
        for c, n in SIZES.items()
    ]
    leaf_sizes = {(leaf, path): 0 for leaf, path in LEAF.values()}
    for (c, upper), key in LEAF.items():
        leaf_sizes[key] += sum(1 for i in range(SIZES[c]) if (i >= 30) == upper)
    prof += [
        (leaf, "leaf", path, n, n / 127, 1.0, {}, {}, 0.1, 3.0, 60.0, 10.0, None, None, [], f"leaf {path}")
        for (leaf, path), n in leaf_sizes.items()
    ]
    ctx.write(spark.createDataFrame(prof, tables.CLUSTER_PROFILES), "cluster_profiles")
    save_record(spark, ctx, RunRecord(status="succeeded", encoder_id="enc-1", config_json=json.dumps({"privacy": {"pseudonymize": False}})))
    return PipelineConfig(run=RunConfig(output=store.root))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "delta"])
def test_export_writes_one_audience_per_segment(spark, exported_run, tmp_path, fmt):
    from seqclust.serve.export import MARKER, export

    out = tmp_path / "aud"
    res = export(spark, exported_run, "t1", fmt, str(out))
    assert res.audiences == {0: 60, 1: 55} and res.withheld == {2: 12} and res.users == 115
    reader = spark.read.format("delta") if fmt == "delta" else spark.read.option("header", True) if fmt == "csv" else spark.read
    df = reader.format(fmt).load(str(out)) if fmt != "delta" else reader.load(str(out))
    got = {(r["user_id"], int(r["segment"])) for r in df.collect()}
    want = {(pseudonym_py(f"u{c}-{i}", SALT), c) for c in (0, 1) for i in range(SIZES[c])}
    assert got == want  # pseudonymised with the privacy salt; the small segment withheld
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("segment=")) == ["segment=0", "segment=1"]
    row = df.where("segment = 1").first()
    assert (
        row["description"] == "segment 1 described"
        and row["run_id"] == "t1"
        and row["model_run_id"] == "t1"
        and row["encoder_id"] == "enc-1"
    )
    manifest = json.loads((out / MARKER).read_text())
    assert manifest["withheld"] == {"2": 12} and manifest["audiences"] == {"0": 60, "1": 55}
    # again into the same folder: replaced, not appended
    export(spark, exported_run, "t1", fmt, str(out))
    df = reader.format(fmt).load(str(out)) if fmt != "delta" else reader.load(str(out))
    assert df.count() == 115


def test_min_size_and_raw_ids(spark, exported_run, tmp_path):
    from seqclust.serve.export import export

    res = export(spark, exported_run, "t1", "parquet", str(tmp_path / "a"), min_size=56, raw_ids=True)
    assert res.audiences == {0: 60} and res.withheld == {1: 55, 2: 12} and res.ids == "raw"
    ids = {r["user_id"] for r in spark.read.parquet(str(tmp_path / "a")).collect()}
    assert ids == {f"u0-{i}" for i in range(60)}
    assert "withheld 2 segment(s) under the minimum size: segment 1 (55 users), segment 2 (12 users)" in res.summary()


def test_export_refuses_what_it_should(spark, exported_run, tmp_path, monkeypatch, capsys):
    from seqclust.app.cli import main
    from seqclust.core.errors import ConfigError, InputError
    from seqclust.serve.export import export

    with pytest.raises(InputError, match=r"--run-id nope: no such run under .*latest runs there: t1"):
        export(spark, exported_run, "nope", "csv", str(tmp_path / "x"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not an earlier seqclust export"):
        export(spark, exported_run, "t1", "csv", str(mine))
    assert (mine / "notes.txt").read_text() == "keep me"
    monkeypatch.delenv("SEQCLUST_PSEUDONYM_SALT")
    with pytest.raises(ConfigError, match=r"kept raw user ids and \$SEQCLUST_PSEUDONYM_SALT is unset"):
        export(spark, exported_run, "t1", "csv", str(tmp_path / "y"))
    # through the command line: one line, non-zero exit
    code = main(["export", "--run-id", "nope", "--out", str(tmp_path / "z"), "--output", exported_run.run.output])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("seqclust: error: --run-id nope: no such run")
    with pytest.raises(SystemExit) as bad_format:  # argparse: usage and one line
        main(["export", "--run-id", "t1", "--out", str(tmp_path / "z"), "--output", exported_run.run.output, "--format", "xml"])
    assert bad_format.value.code == 2 and "invalid choice: 'xml'" in capsys.readouterr().err


def test_export_at_the_leaves_of_the_segment_tree(spark, exported_run, tmp_path):
    from seqclust.core.errors import ConfigError
    from seqclust.serve.export import export

    out = tmp_path / "leaves"
    res = export(spark, exported_run, "t1", "parquet", str(out), min_size=20, level="leaf")
    # leaf 0 = the first 30 users of segment 0, leaf 1 its other 30, leaf 2 = segment 1; leaf 3 (12 users) withheld
    assert res.audiences == {0: 30, 1: 30, 2: 55} and res.withheld == {3: 12}
    df = spark.read.parquet(str(out))
    got = {(r["user_id"], int(r["segment"]), r["segment_path"], r["description"]) for r in df.collect()}
    assert (pseudonym_py("u0-31", SALT), 1, "0.1", "leaf 0.1") in got and (pseudonym_py("u1-0", SALT), 2, "1", "leaf 1") in got
    assert len(got) == 115  # every exported user once
    top = export(spark, exported_run, "t1", "parquet", str(tmp_path / "top"))
    assert top.audiences == {0: 60, 1: 55}
    assert {r["segment_path"] for r in spark.read.parquet(str(tmp_path / "top")).collect()} == {"0", "1"}
    with pytest.raises(ConfigError, match="--level"):
        export(spark, exported_run, "t1", "parquet", str(tmp_path / "x"), level="middle")


def test_export_keeps_only_the_confident_members_when_asked(spark, exported_run, tmp_path):
    from seqclust.core.errors import ConfigError
    from seqclust.serve.export import export

    res = export(spark, exported_run, "t1", "parquet", str(tmp_path / "sure"), min_size=20, min_confidence=0.5)
    # users i % 10 >= 5: 30 of segment 0, 25 of segment 1 (i < 55), 5 of segment 2 (withheld)
    assert res.audiences == {0: 30, 1: 25} and res.withheld == {2: 5}
    df = spark.read.parquet(str(tmp_path / "sure"))
    assert df.count() == 55 and min(r["confidence"] for r in df.select("confidence").collect()) >= 0.5
    leaf = export(spark, exported_run, "t1", "parquet", str(tmp_path / "sure_leaf"), min_size=1, level="leaf", min_confidence=0.3)
    # at the leaves the confidence is half: i % 10 >= 6 -> 4 in 10
    assert sum(leaf.audiences.values()) + sum(leaf.withheld.values()) == 24 + 20 + 4
    with pytest.raises(ConfigError, match="--min-confidence"):
        export(spark, exported_run, "t1", "parquet", str(tmp_path / "x"), min_confidence=1.5)


def test_min_confidence_on_a_run_without_confidences_is_refused_clearly(spark, ctx, exported_run, tmp_path):
    from pyspark.sql import functions as F

    from seqclust.core.errors import InputError
    from seqclust.serve.export import export

    old = ctx.store.read(spark, ctx.tables.clusters, ctx.run_id).withColumn("confidence", F.lit(None).cast("double"))
    ctx.write(old.select(*tables.CLUSTERS.fieldNames()), "clusters")
    assert export(spark, exported_run, "t1", "parquet", str(tmp_path / "all")).users == 115
    with pytest.raises(InputError, match="no confidence per user"):
        export(spark, exported_run, "t1", "parquet", str(tmp_path / "x"), min_confidence=0.2)
