"""The stream's per-user update (``live_state.live_updater``): state rows, new sessions' sums and
token counts combined per user — also when a user's rows straddle Arrow batches — equal a
plain-Python oracle, and each user is placed at the nearest centre of its pooled vector."""

import datetime as dt
from types import SimpleNamespace

import numpy as np
import pytest
from pyspark.sql import types as T

from seqclust.core.config import EmbedConfig
from seqclust.serve.live_state import UPDATED, live_updater
from seqclust.serve.placement import Model

pytestmark = pytest.mark.spark

ROWS = T.StructType(
    [
        T.StructField("user_id", T.StringType()),
        T.StructField("kind", T.IntegerType()),
        T.StructField("sessions", T.LongType()),
        T.StructField("vec", T.ArrayType(T.DoubleType())),
        T.StructField("tokens", T.ArrayType(T.StringType())),
        T.StructField("n", T.ArrayType(T.LongType())),
        T.StructField("last_end_ts", T.TimestampType()),
        T.StructField("last_session_id", T.StringType()),
    ]
)


def _rows(seed: int = 3):
    rng = np.random.default_rng(seed)
    t0 = dt.datetime(2026, 1, 1)
    rows = []
    for u in range(40):
        uid = f"u{u:03d}"
        ts = lambda h: t0 + dt.timedelta(hours=int(h))  # noqa: E731
        if u % 3:  # stored state (kind 0)
            rows.append(
                (uid, 0, int(rng.integers(1, 5)), rng.normal(size=3).tolist(), ["a", "b"], [2, 1], ts(rng.integers(0, 50)), f"s{u}-old")
            )
        rows.append((uid, 1, int(rng.integers(1, 4)), rng.normal(size=3).tolist(), [], [], ts(rng.integers(0, 100)), f"s{u}-new"))
        for _ in range(int(rng.integers(0, 3))):  # token counts of several Arrow batches (kind 2)
            toks = list(rng.choice(["a", "b", "c", "d"], size=int(rng.integers(1, 4)), replace=False))
            rows.append((uid, 2, 0, None, toks, [int(x) for x in rng.integers(1, 5, size=len(toks))], None, None))
    return rows


def _oracle(rows, centers):
    out = {}
    for r in sorted(rows, key=lambda r: (r[0], r[1])):
        o = out.setdefault(r[0], {"sessions": 0, "vec": np.zeros(3), "tok": {}, "last": None, "prev": None})
        if r[1] == 0:
            o["prev"] = r
        o["sessions"] += r[2]
        if r[3] is not None:
            o["vec"] = o["vec"] + np.asarray(r[3])
        for t, n in zip(r[4], r[5]):
            o["tok"][t] = o["tok"].get(t, 0) + n
        if r[6] is not None and (o["last"] is None or (r[6], r[7]) > o["last"]):
            o["last"] = (r[6], r[7])
    for o in out.values():
        v = o["vec"] / np.linalg.norm(o["vec"])
        d = np.linalg.norm(np.asarray(centers) - v.astype(np.float32), axis=1)
        o["cluster"], o["dist"] = int(d.argmin()), float(d.min())
    return out


def test_users_straddling_arrow_batches_are_combined_and_placed_like_the_oracle(spark):
    rows = _rows()
    centers = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]
    model = Model("m", SimpleNamespace(token_model=None), centers, None)
    fn = live_updater(model, EmbedConfig(representation="encoder"))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "3")  # most users span two batches
    try:
        df = spark.createDataFrame(rows, ROWS).repartition(4, "user_id").sortWithinPartitions("user_id", "kind")
        got = {r["user_id"]: r for r in df.mapInArrow(fn, UPDATED).collect()}
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    want = _oracle(rows, centers)
    assert got.keys() == want.keys() and len(got) == 40
    for u, w in want.items():
        g = got[u]
        assert g["sessions"] == w["sessions"]
        np.testing.assert_allclose(g["vector_sum"], w["vec"], rtol=1e-12)
        assert dict(zip(g["tokens"], g["n"])) == w["tok"]
        assert (g["last_end_ts"], g["last_session_id"]) == w["last"]
        assert (g["cluster_id"], round(g["distance_to_centroid"], 6)) == (w["cluster"], round(w["dist"], 6))
        prev = w["prev"]
        if prev is None:
            assert g["prev_sessions"] is None and g["prev_vector_sum"] is None and g["prev_tokens"] is None
        else:
            assert (g["prev_sessions"], g["prev_vector_sum"], g["prev_last_session_id"]) == (prev[2], prev[3], prev[7])
            assert dict(zip(g["prev_tokens"], g["prev_n"])) == dict(zip(prev[4], prev[5]))
