"""seqclust stream: live segments agree with a batch `assign` over the same events."""

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqclust.app.cli import main
from seqclust.datasets.generated import write_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.spark

SMALL = [
    "encoder.epochs=3",
    "encoder.batch_size=64",
    "encoder.train_sample=2000",
    "encoder.embedding_dim=16",
    "encoder.hidden=32",
    "cluster.k=4",
    "cluster.n_init=1",
    "cluster.fine_k=null",
    "evaluate.downstream=false",
    "spark.shuffle_partitions=2",
    "stream.max_files_per_trigger=1",
    # the stream run's own events and sessions too (compared below with the batch run's)
    "stream.keep_history=true",
    # a segment tree on 120 users (no thresholds): live users go down a real tree
    "cluster.split_max_depth=2",
    "cluster.split_min_users=30",
    "cluster.split_min_child_users=8",
    "cluster.split_min_gap=0",
    "cluster.split_min_stability=0",
    "cluster.split_min_temporal=-1",
]


def _cli(*args):
    argv = [*args, "--conf", str(REPO / "conf" / "local.yaml")]
    for s in SMALL:
        argv += ["--set", s]
    return main(argv)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A model run on generated data, and the same users' events cut into five file drops."""
    root = tmp_path_factory.mktemp("stream")
    write_dataset(root / "gen", users=120, seed=5, bad_rate=0.0)
    out = root / "out"
    assert _cli("run", "--input", str(root / "gen" / "events"), "--output", str(out), "--run-id", "m1") == 0
    return root, out


def _drops(events: pa.Table, folder: Path, n: int = 5, moved_minutes: float = 2.0) -> pa.Table:
    """``events`` in ``n`` files by time: each cut's last ``moved_minutes`` arrive with the next
    file (out of order, within the lateness), rows shuffled within a file, and some events
    twice (in their file, and a copy of a moved one in the file after that). Returns every row
    written (duplicates included)."""
    rng = np.random.default_rng(3)
    ts = events.column("ts").cast(pa.int64()).to_numpy()  # ms or us: only compared
    unit = 1000 if events.schema.field("ts").type.unit == "ms" else 1_000_000
    order = np.argsort(ts, kind="stable")
    cuts = np.quantile(ts, np.linspace(0, 1, n + 1)[1:-1])
    part = np.searchsorted(cuts, ts, side="right")
    moved = np.zeros(len(ts), bool)
    for i, c in enumerate(cuts):
        late = (part == i) & (ts >= c - moved_minutes * 60 * unit)
        part[late] = i + 1
        moved |= late
    folder.mkdir(parents=True)
    written = []
    for i in range(n):
        idx = order[part[order] == i]
        dup = rng.choice(idx, size=max(1, len(idx) // 50), replace=False)
        if i > 0:
            prev_moved = order[(part[order] == i) & moved[order]][:5]
            dup = np.concatenate([dup, prev_moved])
        rows = np.concatenate([idx, dup])
        rng.shuffle(rows)
        t = events.take(pa.array(rows))
        f = folder / f"drop-{i}.parquet"
        pq.write_table(t, f)
        os.utime(f, (1_800_000_000 + i * 10, 1_800_000_000 + i * 10))  # the file source's order
        written.append(t)
    return pa.concat_tables(written)


def _stream_args(root: Path, out: Path, run_id: str, checkpoint: str) -> list[str]:
    return [
        "stream",
        "--model",
        "m1",
        "--input",
        str(root / "drops"),
        "--checkpoint",
        str(root / checkpoint),
        "--output",
        str(out),
        "--run-id",
        run_id,
    ]


@pytest.fixture(scope="module")
def streamed(model):
    """The drops, an uninterrupted stream over them (run id live-m1), and their rows."""
    root, out = model
    events = pq.read_table(root / "gen" / "events")
    every = _drops(events, root / "drops")
    assert every.num_rows > events.num_rows  # duplicates are in the drops
    assert _cli(*_stream_args(root, out, "live-m1", "ck"), "--available-now", "--flush") == 0
    return root, out, every


def _table(spark, out, name, run_id):
    from pyspark.sql import functions as F

    return spark.read.format("delta").load(str(out / name)).where(F.col("run_id") == run_id)


def test_live_segments_agree_with_a_batch_assign_over_the_same_events(spark, streamed):
    from pyspark.sql import functions as F

    root, out, every = streamed
    assert _cli("assign", "--model", "m1", "--input", str(root / "drops"), "--output", str(out), "--run-id", "a1") == 0

    def table(name, run_id):
        return _table(spark, out, name, run_id)

    prog = table("live_progress", "live-m1")
    batches = prog.where("batch_id >= 0")
    assert batches.count() >= 5  # one file per micro-batch
    totals = batches.agg(F.sum("input_rows"), F.sum("late"), F.sum("quarantined")).first()
    assert totals[0] == every.num_rows and totals[1] == 0 and totals[2] == 0
    # the sessions: exactly the batch run's
    cols = ["session_id", "user_id", "start_ts", "end_ts", "n_events", "tokens", "is_modelled"]
    live_s = {r["session_id"]: tuple(r) for r in table("sessions", "live-m1").select(*cols).collect()}
    batch_s = {r["session_id"]: tuple(r) for r in table("sessions", "a1").select(*cols).collect()}
    assert live_s == batch_s and len(live_s) > 200
    # every modelled session closed once, with the batch's vector
    live_v = {r["session_id"]: np.array(r["embedding"]) for r in table("live_sessions", "live-m1").collect()}
    batch_v = {r["entity_id"]: np.array(r["embedding"]) for r in table("embeddings", "a1").where("entity_type = 'session'").collect()}
    assert live_v.keys() == batch_v.keys()
    assert max(float(np.abs(live_v[s] - batch_v[s]).max()) for s in live_v) < 1e-5
    # every user in the segment assign gives, at the same distance from its centre
    live = {r["user_id"]: r for r in table("live_segments", "live-m1").collect()}
    batch = {r["entity_id"]: r for r in table("clusters", "a1").where("entity_type = 'user' AND granularity = 'coarse'").collect()}
    assert live.keys() == batch.keys() and len(live) == 120
    assert all(live[u]["cluster_id"] == batch[u]["cluster_id"] for u in live)
    assert max(abs(live[u]["distance_to_centroid"] - batch[u]["distance_to_centroid"]) for u in live) < 1e-5
    assert max(abs(live[u]["confidence"] - batch[u]["confidence"]) for u in live) < 1e-5
    # ... and down the model's segment tree to the same leaf, as sure of it
    leaf = {r["entity_id"]: r for r in table("clusters", "a1").where("entity_type = 'user' AND granularity = 'leaf'").collect()}
    assert any("." in r["segment_path"] for r in leaf.values())  # the model's tree splits
    assert all((live[u]["leaf_id"], live[u]["segment_path"]) == (leaf[u]["cluster_id"], leaf[u]["segment_path"]) for u in live)
    assert max(abs(live[u]["leaf_confidence"] - leaf[u]["confidence"]) for u in live) < 1e-5
    n_modelled = sum(1 for v in batch_s.values() if v[-1])
    assert sum(r["sessions_counted"] for r in live.values()) == n_modelled
    assert {r["model_run_id"] for r in live.values()} == {"m1"}


def test_a_stream_killed_mid_merge_resumes_from_its_checkpoint_exactly_once(spark, streamed):
    """SIGKILL the whole stream process while a micro-batch's live_segments MERGE runs (its
    live_sessions are committed, its Spark batch is not); the restarted stream re-runs that
    batch: nothing counted twice or lost, the tables equal the uninterrupted stream's."""
    import sys

    from test_crash import _env, _run_and_kill

    root, out, _ = streamed
    base = [
        sys.executable,
        "-m",
        "seqclust.app.cli",
        *_stream_args(root, out, "live-k", "ck-k"),
        "--conf",
        str(REPO / "conf" / "local.yaml"),
    ]
    # three files, then two, per micro-batch (other cuts than the uninterrupted stream's: the
    # result must not depend on them, and two batches keep the test short)
    base += [x for s in [*SMALL, "stream.max_files_per_trigger=3"] for x in ("--set", s)]
    trigger = "table live_segments: merging recomputed rows into run live-k"
    lines = _run_and_kill([*base, "--available-now"], trigger, 0.3, timeout=900, after="stream: batch 0:")
    assert any("stream: batch 0:" in x for x in lines)  # killed in the second batch, after a whole one
    import subprocess

    done = subprocess.run([*base, "--available-now", "--flush"], capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    def rows(name, run_id, cols):
        return sorted(tuple(r) for r in _table(spark, out, name, run_id).select(*cols).collect())

    seg = ["user_id", "cluster_id", "sessions_counted", "last_session_id", "model_run_id"]
    assert rows("live_segments", "live-k", seg) == rows("live_segments", "live-m1", seg)
    # the killed batch had committed its users' state: the re-run started from the state before it
    state = ["user_id", "sessions", "last_session_id", "token_counts"]
    killed_state = rows("live_user_state", "live-k", state)
    assert killed_state == rows("live_user_state", "live-m1", state) and len(killed_state) == 120
    # (not cluster_id: a closed session's row keeps its user's segment right after its batch,
    # which depends on how the files were cut into micro-batches)
    sess = ["session_id", "user_id", "n_events", "start_ts", "end_ts"]
    killed, whole = rows("live_sessions", "live-k", sess), rows("live_sessions", "live-m1", sess)
    assert killed == whole and len({r[0] for r in killed}) == len(killed)  # each session once
    assert rows("sessions", "live-k", ["session_id", "n_events"]) == rows("sessions", "live-m1", ["session_id", "n_events"])
    assert rows("events", "live-k", ["event_id", "user_id", "ts"]) == rows("events", "live-m1", ["event_id", "user_id", "ts"])


def test_without_history_the_stream_writes_only_its_live_tables(spark, streamed):
    """The default (``stream.keep_history`` off): the same live segments and closed sessions as
    the stream that keeps its history, no rows of its own in ``events`` or ``sessions``, and no
    open session's events left after the flush."""
    root, out, _ = streamed
    # (after SMALL's sets: the last --set wins)
    argv = [*_stream_args(root, out, "live-lean", "ck-lean"), "--available-now", "--flush", "--conf", str(REPO / "conf" / "local.yaml")]
    argv += [x for s in [*SMALL, "stream.keep_history=false"] for x in ("--set", s)]
    assert main(argv) == 0

    def rows(name, run_id, cols):
        return sorted(tuple(r) for r in _table(spark, out, name, run_id).select(*cols).collect())

    seg = ["user_id", "cluster_id", "leaf_id", "sessions_counted", "last_session_id"]
    assert rows("live_segments", "live-lean", seg) == rows("live_segments", "live-m1", seg)
    sess = ["session_id", "user_id", "n_events", "start_ts", "end_ts"]
    assert rows("live_sessions", "live-lean", sess) == rows("live_sessions", "live-m1", sess)
    assert _table(spark, out, "events", "live-lean").count() == 0
    assert _table(spark, out, "sessions", "live-lean").count() == 0
    # open events: the flush closed every session, so its generation (what a later step would
    # read) is empty, and every older generation but the last micro-batch's was removed
    last = _table(spark, out, "live_progress", "live-lean").where("batch_id >= 0").agg({"batch_id": "max"}).first()[0]
    gens = {r["batch_id"] for r in _table(spark, out, "live_open_events", "live-lean").select("batch_id").distinct().collect()}
    assert last >= 4 and gens <= {last}


def test_stream_refuses_a_missing_model_and_an_unwritable_checkpoint(model, tmp_path, capsys):
    root, out = model
    code = _cli(
        "stream", "--model", "nope", "--input", str(root / "gen" / "events"), "--checkpoint", str(tmp_path / "ck"), "--output", str(out)
    )
    assert code != 0 and "--model nope: no such run" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = _cli(
        "stream", "--model", "m1", "--input", str(root / "gen" / "events"), "--checkpoint", str(blocker / "ck"), "--output", str(out)
    )
    assert code != 0 and "--checkpoint" in capsys.readouterr().err


def test_a_kafka_topic_streams_into_the_same_live_segments_as_the_files(spark, streamed, tmp_path):
    """A real broker (Kafka's own jars from Maven Central, KRaft mode) holds the drops' rows as
    JSON messages, keyed by user over two partitions, plus one message that is not JSON;
    ``seqclust stream --format kafka --available-now --flush`` gives the file stream's sessions
    and segments, and quarantines the bad message with its topic/partition@offset."""
    import datetime as dt
    import json
    import subprocess
    import sys

    from kafka_broker import Broker, kafka_jars
    from test_crash import _env

    root, out, every = streamed
    rows = every.to_pylist()

    def value(r: dict) -> str:
        return json.dumps({k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in r.items()})

    messages = [(r["user_id"], value(r)) for r in rows]
    messages.insert(len(messages) // 2, ("u-bad", "{this is not json"))
    with Broker(tmp_path / "kafka", kafka_jars()) as broker:
        broker.produce("events", messages)
        cmd = [sys.executable, "-m", "seqclust.app.cli", "stream", "--model", "m1", "--format", "kafka"]
        cmd += ["--checkpoint", str(tmp_path / "ck"), "--output", str(out), "--run-id", "live-kafka", "--available-now", "--flush"]
        cmd += ["--conf", str(REPO / "conf" / "local.yaml")] + [x for s in SMALL for x in ("--set", s)]
        cmd += ["--set", f"source.kafka.bootstrap_servers={broker.bootstrap}", "--set", "source.kafka.topic=events"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(messages)} input rows" in done.stdout

    def rows_of(name, run_id, cols):
        return sorted(tuple(r) for r in _table(spark, out, name, run_id).select(*cols).collect())

    seg = ["user_id", "cluster_id", "sessions_counted", "last_session_id", "model_run_id"]
    assert rows_of("live_segments", "live-kafka", seg) == rows_of("live_segments", "live-m1", seg)
    sess = ["session_id", "user_id", "n_events", "tokens"]
    assert rows_of("sessions", "live-kafka", sess) == rows_of("sessions", "live-m1", sess)
    q = _table(spark, out, "quarantine", "live-kafka").collect()
    assert [r["reason"] for r in q] == ["malformed"]
    assert q[0]["raw"] == "{this is not json" and q[0]["source_file"].startswith("kafka:events/")
    prog = _table(spark, out, "live_progress", "live-kafka").where("batch_id >= 0").collect()
    assert sum(r["input_rows"] for r in prog) == len(messages) and all(r["source"].startswith("kafka://") for r in prog)


def test_kafka_without_spark_s_kafka_source_says_which_package_to_add(spark):
    """The suite's session has no Kafka jar: reading a topic is one error naming the package."""
    from seqclust.core.config import load_config
    from seqclust.core.errors import InputError
    from seqclust.runtime.spark import kafka_package
    from seqclust.serve.stream import read_kafka

    cfg = load_config(None, overrides=["source.format=kafka", "source.kafka.bootstrap_servers=127.0.0.1:9", "source.kafka.topic=t"])
    with pytest.raises(InputError, match="Spark has no Kafka source") as e:
        read_kafka(spark, cfg)
    assert kafka_package() in str(e.value)
