"""An independent implementation of the sessionization rules in DuckDB SQL.

Not used by the pipeline: it is the oracle the tests hold both Spark engines to (on a
million-event dataset) and the baseline ``bench/sessionize.py`` measures against. It follows
the written rules, not the Spark code: inactivity gap, runaway sessions (rate and size),
cuts by max duration from the session's start then by max events, deterministic ids
``sha256(user|start µs[|piece])``. Needs ``duckdb`` (the ``dev`` extra).
"""

from __future__ import annotations

from seqclust.core.config import SessionizeConfig

US_PER_MIN = 60_000_000


def sessions_sql(source: str, cfg: SessionizeConfig) -> str:
    """A query over ``source`` (a DuckDB table expression with the clean event columns) that
    returns one row per session piece and runaway session with the columns of the ``sessions``
    table plus ``reason`` (runaway sessions: the reason, and empty lists)."""
    if cfg.midnight_split:
        raise ValueError("the DuckDB reference implements the rules without midnight_split")
    gap_us = cfg.gap_minutes * US_PER_MIN
    dur_us = cfg.max_duration_minutes * US_PER_MIN
    return f"""
WITH e AS (
    SELECT CAST(user_id AS VARCHAR) AS user_id, ts, epoch_us(ts) AS m, event_type,
           coalesce(category_id, '') AS category_id, coalesce(item_id, '') AS item_id,
           coalesce(event_id, '') AS event_id, CAST(price AS DOUBLE) AS price
    FROM {source}
), o AS (
    SELECT *, row_number() OVER w AS rn, m - lag(m) OVER w AS dm
    FROM e WINDOW w AS (PARTITION BY user_id ORDER BY m, event_type, category_id, item_id, event_id, price NULLS FIRST)
), s AS (
    SELECT *, sum(CASE WHEN dm <= {gap_us} THEN 0 ELSE 1 END) OVER (PARTITION BY user_id ORDER BY rn ROWS UNBOUNDED PRECEDING) AS sess
    FROM o
), st AS (
    SELECT *, count(*) OVER p AS n, min(m) OVER p AS first_m, max(m) OVER p AS last_m
    FROM s WINDOW p AS (PARTITION BY user_id, sess)
), b AS (
    SELECT *,
        CASE WHEN n >= {cfg.bot_min_events} AND n / greatest((last_m - first_m) / 6e7, 1.0) > {cfg.bot_events_per_minute}
                  THEN 'too_fast'
             WHEN n > {cfg.bot_max_events} THEN 'too_many_events' END AS reason,
        CAST(floor((m - first_m) / {dur_us}) AS BIGINT) AS win
    FROM st
), c AS (
    SELECT *, CASE WHEN reason IS NULL
                   THEN win * 1000000 + (row_number() OVER (PARTITION BY user_id, sess, win ORDER BY rn) - 1) // {cfg.max_events}
                   ELSE 0 END AS piece
    FROM b
)
SELECT
    substr(sha256(user_id || '|' || CAST(min(m) AS VARCHAR) || CASE WHEN piece = 0 THEN '' ELSE '|' || CAST(piece AS VARCHAR) END),
           1, 32) AS session_id,
    user_id,
    min(ts) AS start_ts,
    max(ts) AS end_ts,
    (max(m) - min(m)) / 1e6 AS duration_s,
    CAST(count(*) AS INTEGER) AS n_events,
    CASE WHEN reason IS NULL THEN histogram(event_type) END AS event_counts,
    CASE WHEN reason IS NULL THEN list(event_type ORDER BY rn) ELSE [] END AS event_types,
    CASE WHEN reason IS NULL THEN list(category_id ORDER BY rn) ELSE [] END AS categories,
    CASE WHEN reason IS NULL THEN list(item_id ORDER BY rn) ELSE [] END AS items,
    CASE WHEN reason IS NULL THEN list(price ORDER BY rn) ELSE [] END AS prices,
    -- the gap before each event; 0 for a piece's first event
    CASE WHEN reason IS NULL THEN list_concat([0.0], (list(coalesce(dm, 0) / 1e6 ORDER BY rn))[2:]) ELSE [] END AS gaps_s,
    CASE WHEN reason IS NULL THEN list(event_type || ':' || category_id ORDER BY rn) ELSE [] END AS tokens,
    count(*) >= {cfg.min_events} AND reason IS NULL AS is_modelled,
    reason
FROM c
GROUP BY user_id, sess, piece, reason
"""


def sessionize_parquet(events_glob: str, out_path: str, cfg: SessionizeConfig, threads: int | None = None) -> int:
    """Sessionize Parquet events into one Parquet file with DuckDB; return the rows written."""
    import duckdb

    con = duckdb.connect()
    try:
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        con.execute("SET TimeZone = 'UTC'")
        src = f"read_parquet('{events_glob}')"
        con.execute(f"COPY ({sessions_sql(src, cfg)}) TO '{out_path}' (FORMAT parquet)")
        return int(con.execute(f"SELECT count(*) FROM read_parquet('{out_path}')").fetchone()[0])
    finally:
        con.close()
