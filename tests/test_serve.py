"""Segments at request time (``seqclust.serve``): a model run's folder, scored without Spark,
gives every user the segment, leaf, distance and confidence that ``seqclust assign --model``
gives the same events; bad requests get one clear reason."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from seqclust.app.cli import main
from seqclust.core.config import load_config
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
    # a segment tree on 120 users (no thresholds): users go down a real tree
    "cluster.split_max_depth=2",
    "cluster.split_min_users=20",
    "cluster.split_min_child_users=5",
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
def served(tmp_path_factory):
    """A model run (m1) on 120 generated users, 40 other users' events assigned to it by the
    batch path (a1), and the model run's folder."""
    from seqclust.runtime.spark import get_spark
    from seqclust.serve.bundle import write_bundle

    root = tmp_path_factory.mktemp("serve")
    write_dataset(root / "gen", users=120, seed=5, bad_rate=0.0)
    write_dataset(root / "new", users=40, seed=9, bad_rate=0.0)
    out = root / "out"
    # tracking.mlflow: the model run logs and registers its segments model
    run = ("run", "--input", str(root / "gen" / "events"), "--output", str(out), "--run-id", "m1", "--set", "tracking.mlflow=true")
    assert _cli(*run) == 0
    assert _cli("assign", "--model", "m1", "--input", str(root / "new" / "events"), "--output", str(out), "--run-id", "a1") == 0
    cfg = load_config(REPO / "conf" / "local.yaml", [*SMALL, f"run.output={out}"])
    folder = write_bundle(get_spark(), cfg, "m1", root / "model")
    return root, out, folder


def _events(root: Path) -> pd.DataFrame:
    t = pq.read_table(root / "new" / "events")
    return t.select(
        [c for c in ("user_id", "ts", "event_type", "item_id", "category_id", "price", "event_id") if c in t.column_names]
    ).to_pandas()


def test_a_request_gets_the_segments_assign_gives(spark, served):
    from pyspark.sql import functions as F

    from seqclust.serve.request import OUTPUT, Limits, Segmenter

    root, out, folder = served
    seg = Segmenter(folder, Limits(window_days=None))
    got = seg.score(_events(root)).set_index("user_id")
    assert list(got.reset_index().columns) == list(OUTPUT)
    clusters = spark.read.format("delta").load(str(out / "clusters")).where((F.col("run_id") == "a1") & (F.col("entity_type") == "user"))
    top = {r["entity_id"]: r for r in clusters.where("granularity = 'coarse'").collect()}
    leaf = {r["entity_id"]: r for r in clusters.where("granularity = 'leaf'").collect()}
    assert set(got.index) == set(top) and len(top) == 40
    assert any("." in p for p in got["segment_path"])  # the model's tree splits: users went down it
    for u, r in got.iterrows():
        assert r["cluster_id"] == top[u]["cluster_id"], u
        assert (r["leaf_id"], r["segment_path"]) == (leaf[u]["cluster_id"], leaf[u]["segment_path"]), u
        assert abs(r["distance_to_centroid"] - top[u]["distance_to_centroid"]) < 1e-5
        assert abs(r["confidence"] - top[u]["confidence"]) < 1e-5
        assert abs(r["leaf_confidence"] - leaf[u]["confidence"]) < 1e-5
    assert set(got["model_run_id"]) == {"m1"} and got["description"].str.len().min() > 0
    sessions = spark.read.format("delta").load(str(out / "sessions")).where("run_id = 'a1' AND is_modelled")
    n_sessions = {r["user_id"]: r["count"] for r in sessions.groupBy("user_id").count().collect()}
    assert got["sessions"].to_dict() == n_sessions


def test_a_spark_job_gets_the_same_segments_from_the_model_folder(spark, served):
    from seqclust.serve.request import Limits, Segmenter
    from seqclust.serve.udf import segments_of

    root, _, folder = served
    events = spark.read.parquet(str(root / "new" / "events"))
    got = {r["user_id"]: r for r in segments_of(events, str(folder)).collect()}
    want = Segmenter(folder, Limits(window_days=None)).score(_events(root)).set_index("user_id")
    assert set(got) == set(want.index) and len(got) == 40
    for u, r in want.iterrows():
        assert (got[u]["cluster_id"], got[u]["segment_path"], got[u]["sessions"]) == (r["cluster_id"], r["segment_path"], r["sessions"])
        assert abs(got[u]["distance_to_centroid"] - r["distance_to_centroid"]) < 1e-5


def test_one_user_alone_gets_the_same_answer_as_in_a_crowd(served):
    from seqclust.serve.request import Limits, Segmenter

    root, _, folder = served
    seg = Segmenter(folder, Limits(window_days=None))
    ev = _events(root)
    crowd = seg.score(ev).set_index("user_id")
    u = crowd.index[3]
    alone = seg.score(ev[ev["user_id"] == u].sample(frac=1.0, random_state=1)).set_index("user_id")  # any row order
    assert list(alone.index) == [u]
    assert alone.loc[u, "segment_path"] == crowd.loc[u, "segment_path"]
    assert alone.loc[u, "distance_to_centroid"] == pytest.approx(crowd.loc[u, "distance_to_centroid"], abs=1e-6)


def test_events_older_than_the_window_are_ignored(served):
    """A user's events more than ``window_days`` before their newest one do not count: the
    answer is the one for the recent events alone; within the window they count."""
    from seqclust.serve.request import Limits, Segmenter

    root, _, folder = served
    ev = _events(root)
    when = pd.to_datetime(ev["ts"], utc=True)
    span = when.groupby(ev["user_id"]).agg(lambda t: t.max() - t.min())
    u = ev[ev["user_id"].isin(span[span < pd.Timedelta(days=30)].index)]["user_id"].value_counts().index[0]
    mine = ev[ev["user_id"] == u]
    ts = pd.to_datetime(mine["ts"], utc=True)

    def older(days: int) -> pd.DataFrame:
        return mine.assign(ts=(ts - pd.Timedelta(days=days)).astype(str), event_id=None)

    windowed, whole = Segmenter(folder, Limits(window_days=90)), Segmenter(folder, Limits(window_days=None))
    recent = windowed.score(mine).set_index("user_id").loc[u]
    with_old = windowed.score(pd.concat([older(200), mine])).set_index("user_id").loc[u]
    assert (with_old["sessions"], with_old["events"], with_old["segment_path"]) == (
        recent["sessions"],
        recent["events"],
        recent["segment_path"],
    )
    assert with_old["distance_to_centroid"] == pytest.approx(recent["distance_to_centroid"], abs=1e-9)
    # without the window, and with copies inside it (31 days before: after the user's own span
    # of under 30 days, within 90 of the newest), the older events are sessions of their own
    assert whole.score(pd.concat([older(200), mine])).set_index("user_id").loc[u, "sessions"] == 2 * recent["sessions"]
    assert windowed.score(pd.concat([older(31), mine])).set_index("user_id").loc[u, "sessions"] == 2 * recent["sessions"]


def test_bad_requests_get_one_clear_reason(served):
    from seqclust.serve.request import BadRequest, Limits, Segmenter

    root, _, folder = served
    seg = Segmenter(folder, Limits(window_days=None, max_events_per_user=500, max_events=5000))
    ev = _events(root)
    cases = {
        "the events lack the column(s) ts": ev.drop(columns=["ts"]),
        "unknown column(s) colour": ev.assign(colour="red"),
        "no events in the request": ev.iloc[:0],
        "no valid events: ": ev.assign(ts="yesterday-ish"),
        "at most 5,000 (serve.max_events)": pd.concat([ev] * 3),
        "at most 500 per user": pd.DataFrame(
            {"user_id": "u1", "ts": pd.date_range("2026-10-01", periods=600, freq="min", tz="UTC"), "event_type": "view"}
        ),
    }
    for want, frame in cases.items():
        with pytest.raises(BadRequest) as e:
            seg.score(frame)
        assert want in str(e.value), (want, str(e.value))
        assert "\n" not in str(e.value)
    # rows that fail validation are left out, the rest scored
    mixed = pd.concat([ev, pd.DataFrame({"user_id": ["zz"], "ts": ["not a time"], "event_type": ["view"]})])
    assert "zz" not in set(seg.score(mixed)["user_id"])


ROWS = pd.DataFrame(
    {
        "user_id": ["a", "a", "a", "b", "b", " ", "c", "c", "d", "e"],
        "ts": [
            "2026-10-01T10:00:00Z",
            "1790000000",
            "2026-10-01 10:00:05",
            "2026-10-01T10:00:00+02:00",
            "bad",
            "2026-10-01T10:00:00Z",
            "1999-01-01T00:00:00Z",
            "2027-06-01T00:00:00Z",
            "1790000000000",
            "2026-10-01T11:00:00Z",
        ],
        "event_type": ["view", "CART", "teleport", "view", "view", "view", "view", "view", " Purchase ", "view"],
        "price": ["1.5", "x", None, "-3", "2", "1", "1", "1", "20000000", "NaN"],
    }
)
NOW = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)


def test_request_rows_are_refused_for_the_reasons_ingest_gives():
    from seqclust.core.config import SourceConfig
    from seqclust.serve.request import validate_events

    clean, refused = validate_events(ROWS, SourceConfig(), NOW)
    assert refused == {
        "bad_type": 1,
        "unknown_event_type": 1,
        "bad_price": 3,
        "bad_ts": 1,
        "null_user_id": 1,
        "ts_too_old": 1,
        "ts_in_future": 1,
    }
    assert clean.num_rows == 1 and clean.column("ts")[0].as_py() == dt.datetime(2026, 10, 1, 10, tzinfo=dt.timezone.utc)
    assert np.isclose(clean.column("price")[0].as_py(), 1.5)


def test_request_validation_equals_ingest_s_on_the_same_rows(spark):
    """The pandas rules against ``ingest.stage.validate`` (Spark) row by row: the same reason,
    and for valid rows the same time, type and price."""
    from seqclust.core.config import SourceConfig
    from seqclust.ingest.stage import validate
    from seqclust.serve.request import validate_events

    cfg = SourceConfig()
    frame = ROWS.assign(row=[str(i) for i in range(len(ROWS))]).rename(columns={"row": "event_id"})
    theirs = validate(spark.createDataFrame(frame.astype(object).where(frame.notna(), None)), cfg, NOW).collect()
    clean, refused = validate_events(frame, cfg, NOW)
    assert refused == {k: sum(1 for r in theirs if r["reason"] == k) for k in refused}
    assert sum(refused.values()) == sum(1 for r in theirs if r["reason"] is not None)
    mine = {r["event_id"]: r for r in clean.to_pylist()}
    for r in theirs:
        if r["reason"] is None:
            m = mine[r["event_id"]]
            spark_ts = r["ts"] if r["ts"].tzinfo else r["ts"].replace(tzinfo=dt.timezone.utc)  # collected as naive UTC (TZ=UTC)
            assert m["ts"] == spark_ts
            assert (m["event_type"], m["price"]) == (r["event_type"], r["price"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: bytes) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_the_registered_model_is_served_over_http_with_the_same_segments(served, capsys):
    """The model run registered a version (tracking.mlflow); `seqclust promote` names it
    champion; `mlflow models serve -m models:/seqclust_segments@champion` answers a POST of the
    events with the segments the model folder gives in process, a malformed request with a 400
    and one line, and keeps serving."""
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    from seqclust.serve.request import Segmenter

    root, out, folder = served
    assert _cli("promote", "--run-id", "m1", "--output", str(out)) == 0
    assert "seqclust_segments@champion -> version 1 (run m1)" in capsys.readouterr().out
    assert _cli("promote", "--run-id", "nosuch", "--output", str(out)) == 2
    port = _free_port()
    # the server runs uvicorn from the environment's bin folder (an activated venv has it on PATH)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": f"sqlite:///{out / '_mlflow' / 'mlflow.db'}"}
    log_file = open(root / "serve.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/seqclust_segments@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log_file, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, (root / "serve.log").read_text()[-3000:]
            time.sleep(1)
        ev = _events(root)
        ev = ev.assign(ts=ev["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        status, body = _post(port, json.dumps({"dataframe_records": json.loads(ev.to_json(orient="records"))}).encode())
        assert status == 200, body
        served_rows = {r["user_id"]: r for r in body["predictions"]}
        local = Segmenter(folder).score(ev).set_index("user_id")
        assert set(served_rows) == set(local.index) and len(local) == 40
        for u, r in local.iterrows():
            assert served_rows[u]["segment_path"] == r["segment_path"] and served_rows[u]["cluster_id"] == r["cluster_id"]
            assert abs(served_rows[u]["distance_to_centroid"] - r["distance_to_centroid"]) < 1e-5
        bad = {
            "missing ts": {"dataframe_records": [{"user_id": "u1", "event_type": "view"}]},
            "unparseable ts": {"dataframe_records": [{"user_id": "u1", "ts": "soon", "event_type": "view"}]},
            "not a frame": {"nonsense": 1},
        }
        for what, payload in bad.items():
            status, answer = _post(port, json.dumps(payload).encode())
            assert 400 <= status < 500, (what, status, answer)
            msg = answer.get("message", "")
            assert msg and "Traceback" not in msg, (what, answer)
        status, answer = _post(port, b"")
        assert 400 <= status < 500, answer
        status, again = _post(port, json.dumps({"dataframe_records": json.loads(ev.head(50).to_json(orient="records"))}).encode())
        assert status == 200 and again["predictions"]  # still serving
    finally:
        server.terminate()
        server.wait(30)
        log_file.close()


SCORE_THERE = """
import json, sys
import pandas as pd
from seqclust.serve.request import Limits, Segmenter
events = pd.read_parquet(sys.argv[2])
out = Segmenter(sys.argv[1], Limits(window_days=None)).score(events)
import keras
print(json.dumps({"backend": keras.backend.backend(), "rows": out.to_dict(orient="records")}, default=str))
"""


def _sets() -> list[str]:
    return sorted(p.stem for p in (REPO / ".ci" / "compat").glob("*.txt"))


@pytest.mark.parametrize("libset", _sets())
def test_the_model_folder_scores_the_same_on_each_runtime_set(served, libset):
    """The request-time code on the runtime library sets CI tests (Spark 3.5 with pandas 1.5,
    Spark 4.0, Spark 4.2 with PyTorch and no TensorFlow): the model folder made here gives every
    user the same segment, leaf and distance (1e-5)."""
    import json
    import subprocess

    from test_e2e import _clean_env, _compat_env

    from seqclust.serve.request import Limits, Segmenter

    root, _, folder = served
    env = _compat_env(libset)
    proc = subprocess.run(
        [str(env / "bin" / "python"), "-c", SCORE_THERE, str(folder), str(root / "new" / "events")],
        capture_output=True,
        text=True,
        timeout=900,
        env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert there["backend"] == ("torch" if "torch" in libset else "tensorflow")
    here = Segmenter(folder, Limits(window_days=None)).score(_events(root)).set_index("user_id")
    rows = {r["user_id"]: r for r in there["rows"]}
    assert set(rows) == set(here.index) and len(rows) == 40
    for u, r in here.iterrows():
        assert (rows[u]["cluster_id"], rows[u]["segment_path"]) == (r["cluster_id"], r["segment_path"]), (libset, u)
        assert abs(rows[u]["distance_to_centroid"] - r["distance_to_centroid"]) < 1e-5
