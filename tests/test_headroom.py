"""bench/headroom.py against fills and bounds worked out by hand on three users (no Spark)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

deltalake = pytest.importorskip("deltalake", reason="deltalake (the dev extra) writes the run's tables here")

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path) -> None:
    t = [dt.datetime(2026, 1, 1, h, tzinfo=dt.timezone.utc) for h in range(2)]
    rows = [  # (session, user, start, items, purchases)
        ("s1", "a", t[0], ["x", "y"], 1),
        ("s2", "a", t[1], ["z"], 0),
        ("s3", "b", t[0], ["x", "z"], 0),
        ("s4", "b", t[1], ["y"], 1),
        ("s5", "c", t[0], ["w"], 1),
        ("s6", "c", t[1], ["w"], 1),
        ("s7", "d", t[0], ["x"], 0),  # one session: not scored
    ]
    sessions = pa.table(
        {
            "run_id": ["r"] * len(rows),
            "session_id": [r[0] for r in rows],
            "user_id": [r[1] for r in rows],
            "start_ts": pa.array([r[2] for r in rows], pa.timestamp("us", tz="UTC")),
            "is_modelled": [True] * len(rows),
            "items": [r[3] for r in rows],
            "event_counts": pa.array([[("view", 1), ("purchase", r[4])] for r in rows], pa.map_(pa.string(), pa.int64())),
        }
    )
    deltalake.write_deltalake(str(tmp_path / "sessions"), sessions)
    users = ["a", "b", "c", "d"]
    clusters = pa.table(
        {
            "run_id": ["r"] * 8,
            "entity_type": ["user"] * 8,
            "entity_id": users * 2,
            "cluster_id": [0, 0, 1, 0, 0, 0, 1, 1],
            "granularity": ["coarse"] * 4 + ["fine"] * 4,
        }
    )
    deltalake.write_deltalake(str(tmp_path / "clusters"), clusters)


def test_fills_bounds_and_conversion_by_hand(tmp_path):
    _write(tmp_path)
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "headroom.py"), "--output", str(tmp_path), "--run-id", "r", "--n", "3", "--replicates", "50"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["users"] == 3 and res["fine_segments"] == 2
    # own lists: a [x, y], b [x, z], c [w]; targets: a {z}, b {y}, c {w}; global: x, w, y, z
    assert res["own"][1] == pytest.approx(1 / 3, abs=1e-3)
    assert res["own_global"][1] == pytest.approx(1 / 3, abs=1e-3)  # a [x, y, w], b [x, z, w] miss; c hits
    assert res["own_fine"][1] == pytest.approx(1.0, abs=1e-3)  # a, b share segment 0: x, y, z
    assert res["own_cooc"][1] == pytest.approx(1.0, abs=1e-3)  # x co-occurs with y and z
    assert res["fill_upper_bound"] == pytest.approx(1.0, abs=1e-3)
    assert res["gain_cooc_vs_global"][1] == pytest.approx(2 / 3, abs=1e-3)
    # conversion: a bought before and not after, b the reverse, c both; own rates a 1, b 0, c 1
    assert res["conversion_next_given_bought_before"] == pytest.approx(0.5, abs=1e-3)
    assert res["conversion_next_given_not_bought_before"] == pytest.approx(1.0, abs=1e-3)
    assert res["conversion_auc_own_history"] == pytest.approx(0.25, abs=1e-3)


def test_refuses_a_run_that_is_not_there(tmp_path):
    _write(tmp_path)
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "headroom.py"), "--output", str(tmp_path), "--run-id", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "no modelled sessions of run 'nope'" in out.stderr
