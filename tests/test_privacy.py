"""Pseudonymisation: user ids never reach a table in clear; labels still join; a missing salt
stops the run before any work."""

from pathlib import Path

import pytest
from pyspark.sql import functions as F

from seqclust.app.cli import main
from seqclust.core.config import PrivacyConfig, SourceConfig, TablesConfig
from seqclust.core.errors import ConfigError
from seqclust.core.privacy import pseudonym, pseudonym_py
from seqclust.datasets.generated import write_dataset
from seqclust.ingest import stage as ingest
from seqclust.runtime.context import RunContext

REPO = Path(__file__).resolve().parents[1]
SALT = "a-test-salt-of-some-length"


def test_spark_and_python_pseudonyms_agree(spark):
    got = spark.createDataFrame([("u1",), ("u2",), (None,)], "u string").select(pseudonym(F.col("u"), SALT).alias("p")).collect()
    assert [r["p"] for r in got] == [pseudonym_py("u1", SALT), pseudonym_py("u2", SALT), None]
    assert pseudonym_py("u1", SALT) != pseudonym_py("u1", SALT + "x") and len(pseudonym_py("u1", SALT)) == 32


def test_salt_from_environment_only(monkeypatch):
    monkeypatch.delenv("SEQCLUST_PSEUDONYM_SALT", raising=False)
    assert PrivacyConfig().salt() is None
    with pytest.raises(ConfigError, match=r"\$SEQCLUST_PSEUDONYM_SALT is unset"):
        PrivacyConfig(pseudonymize=True).salt()
    monkeypatch.setenv("SEQCLUST_PSEUDONYM_SALT", "short")
    with pytest.raises(ConfigError, match="too short"):
        PrivacyConfig(pseudonymize=True).salt()
    monkeypatch.setenv("SEQCLUST_PSEUDONYM_SALT", SALT)
    assert PrivacyConfig(pseudonymize=True).salt() == SALT


def test_quarantine_keeps_no_clear_user_id(spark, store, tmp_path):
    import datetime as dt

    p = tmp_path / "ev.jsonl"
    p.write_text(
        '{"user_id": "alice@example.com", "ts": "2026-10-01T10:00:00Z", "event_type": "view", "price": 3}\n'
        '{"user_id": "bob@example.com", "ts": \n'
        '{"user_id": "carol@example.com", "ts": "2026-10-01T10:00:00Z", "event_type": "hover"}\n'
    )
    ctx = RunContext("p1", store, TablesConfig(), dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc), str(p))
    r = ingest.run(spark, ctx, SourceConfig(format="json"), salt=SALT)
    assert (r.input_rows, r.clean_rows, r.quarantined_rows) == (3, 1, 2)
    assert [x["user_id"] for x in store.read(spark, "events", "p1").collect()] == [pseudonym_py("alice@example.com", SALT)]
    raws = {x["reason"]: x["raw"] for x in store.read(spark, "quarantine", "p1").collect()}
    assert not any("@example.com" in v for v in raws.values()), raws
    assert raws["malformed"].startswith("<redacted: ")
    assert pseudonym_py("carol@example.com", SALT) in raws["unknown_event_type"]


def test_pipeline_with_pseudonyms_joins_labels(spark, tmp_path, capsys, monkeypatch):
    data = tmp_path / "gen"
    write_dataset(data, users=40, seed=5)
    out = tmp_path / "out"
    base = [
        "--conf",
        str(REPO / "conf" / "local.yaml"),
        "--input",
        str(data / "events"),
        "--output",
        str(out),
        "--labels",
        str(data / "personas"),
    ]
    small = [
        "encoder.epochs=2",
        "encoder.train_sample=500",
        "encoder.embedding_dim=8",
        "encoder.hidden=8",
        "cluster.k=3",
        "privacy.pseudonymize=true",
        # also the path of non-default tokens (composed on the executors), at no extra cost
        "tokenize.token_fields=[event_type, price_band, gap_bucket]",
        "tokenize.min_count=1",
        "evaluate.downstream=false",
    ]
    args = ["run", "--run-id", "pseudo-1", *base, *[x for s in small for x in ("--set", s)]]

    monkeypatch.delenv("SEQCLUST_PSEUDONYM_SALT", raising=False)
    assert main(args) == 2
    assert "SEQCLUST_PSEUDONYM_SALT is unset" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (out / "events").exists()  # nothing was written before the check

    monkeypatch.setenv("SEQCLUST_PSEUDONYM_SALT", SALT)
    assert main(args) == 0, capsys.readouterr().err[-2000:]
    clear = {r["user_id"] for r in spark.read.parquet(str(data / "personas")).collect()}
    expected = {pseudonym_py(u, SALT) for u in clear}
    for table, col in (("events", "user_id"), ("sessions", "user_id"), ("clusters", "entity_id")):
        got = {r[0] for r in spark.read.format("delta").load(str(out / table)).select(col).distinct().collect()}
        assert got and got <= expected and not (got & clear), table
    m = {
        r["metric"]: r["value"]
        for r in spark.read.format("delta").load(str(out / "metrics")).where("method = 'encoder' AND family = 'external'").collect()
    }
    assert m["labelled_users"] == 40 and "ari" in m
    run = spark.read.format("delta").load(str(out / "runs")).first()
    assert SALT not in run["config_json"]
    import json

    vocab = json.loads((Path(run["encoder_path"]) / "vocab.json").read_text())
    assert vocab["token_fields"] == ["event_type", "price_band", "gap_bucket"]
    assert all(len(t.split(":")) == 3 and t.split(":")[1][0] == "p" and t.split(":")[2][0] == "g" for t in vocab["tokens"])
