"""The core computations against independent implementations, without Spark (seconds, so the
mutation check in ``make mutation`` can run them once per mutant):

- the external agreement scores from a contingency table against scikit-learn's, on random
  label pairs of every shape (the Spark tests build the same tables from DataFrames);
- the Arrow sessionizer, fed in small batches so that users run across batch boundaries, against
  the DuckDB implementation of the written rules (``tests/sessionize_duckdb.py``): every session
  boundary, id, list and runaway reason identical.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import sklearn.metrics as skm

from seqclust.core.config import SessionizeConfig
from seqclust.core.sampling import bootstrap_ci
from seqclust.evaluate.metrics import external_scores


def _table(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    t = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(t, (a, b), 1)
    return t


@pytest.mark.parametrize("seed", range(12))
def test_external_scores_equal_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    ka, kb = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    a = rng.integers(0, ka, n)
    # from independent to almost identical labels
    b = np.where(rng.random(n) < rng.random(), a % kb, rng.integers(0, kb, n))
    got = external_scores(_table(a, b))
    h, c, v = skm.homogeneity_completeness_v_measure(a, b)
    assert got["ari"] == pytest.approx(skm.adjusted_rand_score(a, b), abs=1e-12)
    assert got["nmi"] == pytest.approx(skm.normalized_mutual_info_score(a, b), abs=1e-12)
    assert got["homogeneity"] == pytest.approx(h, abs=1e-12)
    assert got["completeness"] == pytest.approx(c, abs=1e-12)
    assert got["v_measure"] == pytest.approx(v, abs=1e-12)


def test_external_scores_of_identical_and_of_single_labels():
    a = np.array([0, 0, 1, 1, 2])
    same = external_scores(_table(a, a))
    assert same == pytest.approx({"ari": 1.0, "nmi": 1.0, "homogeneity": 1.0, "completeness": 1.0, "v_measure": 1.0})
    one = external_scores(_table(a, np.zeros(5, dtype=np.int64)))
    assert one["ari"] == pytest.approx(skm.adjusted_rand_score(a, [0] * 5))
    assert one["homogeneity"] == pytest.approx(0.0) and one["completeness"] == pytest.approx(1.0)


def test_external_scores_of_degenerate_tables_equal_scikit_learns():
    """An empty table, a single pair, one label against many clusters and many against one."""
    for a, b in (([], []), ([0], [0]), ([0, 0, 0], [0, 1, 2]), ([0, 1, 2], [0, 0, 0]), ([0, 0, 1], [1, 1, 0])):
        a, b = np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)
        t = _table(a, b) if len(a) else np.zeros((0, 0), dtype=np.int64)
        got = external_scores(t)
        h, c, v = skm.homogeneity_completeness_v_measure(a, b)
        want = {
            "ari": skm.adjusted_rand_score(a, b),
            "nmi": skm.normalized_mutual_info_score(a, b),
            "homogeneity": h,
            "completeness": c,
            "v_measure": v,
        }
        assert got == pytest.approx(want, abs=1e-12), (a, b)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_values():
    rng = np.random.default_rng(0)
    small = rng.normal(3.0, 1.0, 30)
    big = rng.normal(3.0, 1.0, 3000)
    m, lo, hi = bootstrap_ci(small, seed=1)
    assert lo < m < hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = bootstrap_ci(big, seed=1)
    assert hi2 - lo2 < (hi - lo) / 5 and lo2 < 3.0 < hi2
    assert bootstrap_ci([2.0]) == (2.0, 2.0, 2.0)
    assert all(np.isnan(bootstrap_ci([])))


RULES = SessionizeConfig(
    gap_minutes=30, max_duration_minutes=20, max_events=12, bot_events_per_minute=3, bot_min_events=20, bot_max_events=35, min_events=2
)
# every column the reference writes; a runaway piece's lists are empty there (``LISTS``)
KEY = ["session_id", "user_id", "start_ts", "end_ts", "duration_s", "n_events", "event_types", "categories", "items", "prices",
       "gaps_s", "tokens", "is_modelled", "reason"]  # fmt: skip
LISTS = range(6, 12)


@pytest.fixture(scope="module")
def small_log(tmp_path_factory):
    from seqclust.datasets.generated import write_dataset

    root = tmp_path_factory.mktemp("small")
    write_dataset(root, users=300, seed=11, bad_rate=0.0, files=2)
    return root


@pytest.mark.parametrize("batch_rows", [97, 100_000])
def test_the_arrow_sessionizer_equals_the_duckdb_rules(small_log, batch_rows):
    pytest.importorskip("duckdb", reason="duckdb (the dev extra) is the independent implementation")
    from sessionize_duckdb import sessionize_parquet

    from seqclust.sessionize.arrow_engine import SORT_COLUMNS, _partition_fn

    ref = small_log / f"duck{batch_rows}.parquet"
    sessionize_parquet(str(small_log / "events" / "*.parquet"), str(ref), RULES, threads=1)
    ev = pq.read_table(small_log / "events")
    cols = {
        "user_id": pc.cast(ev["user_id"], pa.string()),
        "ts": ev["ts"],
        "event_type": ev["event_type"],
        **{c: pc.fill_null(ev[c], "") for c in ("category_id", "item_id", "event_id")},
        "price": pc.cast(ev["price"], pa.float64()),
    }
    t = pa.table(cols).sort_by([(c, "ascending") for c in SORT_COLUMNS])
    rules = dataclasses.replace(RULES, engine="arrow")
    out = pa.Table.from_batches(list(_partition_fn(rules)(iter(t.to_batches(max_chunksize=batch_rows)))))
    theirs = pq.read_table(ref).select(KEY)
    ours = out.select(KEY)

    def rows(tab: pa.Table) -> list[tuple]:
        d = tab.to_pydict()
        out = []
        for i in range(tab.num_rows):
            r = [d[c][i] for c in KEY]
            if r[-1] is not None:  # runaway pieces: the reference leaves the lists empty
                for j in LISTS:
                    r[j] = []
            r[2], r[3], r[4] = r[2].timestamp(), r[3].timestamp(), round(r[4], 6)
            r[10] = [round(g, 6) for g in r[10] or []]
            r[9] = [None if p is None or p != p else round(p, 9) for p in r[9] or []]
            out.append(tuple(tuple(x) if isinstance(x, list) else x for x in r))
        return sorted(out, key=repr)

    mine, ref_rows = rows(ours), rows(theirs)
    assert len(mine) == len(ref_rows) > 500
    assert sum(r[-1] is not None for r in ref_rows) > 0  # the runaway rules fired
    assert sum(r[5] == RULES.max_events for r in ref_rows) > 0  # and the size cut
    assert sum(not r[12] for r in ref_rows if r[-1] is None) > 0  # sessions too short to model
    assert mine == ref_rows
