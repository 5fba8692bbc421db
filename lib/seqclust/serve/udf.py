"""Segments in any Spark job: ``segments_of(events, folder)`` places every user of a DataFrame
of events with a model run's folder (``serve.bundle``), one ``applyInPandas`` group per user,
the model built once per Python worker — the request-time code (``serve.request``), so a Spark
job, a service and ``seqclust assign --model`` give the same answer.
"""

from __future__ import annotations

import logging
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from seqclust.core.errors import InputError
from seqclust.serve.request import OPTIONAL, OUTPUT, REQUIRED

log = logging.getLogger(__name__)

_SEGMENTERS: dict[str, Any] = {}  # per Python worker: folder -> Segmenter

KINDS = {
    "cluster_id": T.IntegerType(),
    "leaf_id": T.IntegerType(),
    "distance_to_centroid": T.DoubleType(),
    "confidence": T.DoubleType(),
    "leaf_confidence": T.DoubleType(),
    "sessions": T.LongType(),
    "events": T.LongType(),
}
SCHEMA = T.StructType([T.StructField(c, KINDS.get(c, T.StringType())) for c in OUTPUT])


def _segmenter(folder: str) -> Any:
    seg = _SEGMENTERS.get(folder)
    if seg is None:
        from seqclust.serve.request import Segmenter

        seg = _SEGMENTERS[folder] = Segmenter(folder)
    return seg


def segments_of(events: DataFrame, folder: str) -> DataFrame:
    """One row per user of ``events`` (canonical columns: ``user_id``, ``ts`` and any of
    ``event_type, item_id, category_id, price, event_id``) with the columns of
    ``request.OUTPUT``. ``folder`` must be readable from every executor (a shared path, a
    Unity Catalog volume). A user none of whose events is valid gets no row."""
    missing = [c for c in REQUIRED if c not in events.columns]
    if missing:
        raise InputError(f"segments_of: the events lack the column(s) {', '.join(missing)}")
    cols = [c for c in (*REQUIRED, *OPTIONAL) if c in events.columns]
    ts = events.schema["ts"].dataType
    frame = events.select(*cols)
    if isinstance(ts, (T.TimestampType, T.TimestampNTZType)):  # unambiguous text: UTC with its zone
        frame = frame.withColumn("ts", F.date_format(F.col("ts"), "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX"))
    for c in ("user_id", "event_type", "item_id", "category_id", "event_id"):
        if c in frame.columns:
            frame = frame.withColumn(c, F.col(c).cast("string"))

    def score(pdf: Any) -> Any:
        import pandas as pd

        from seqclust.serve.request import BadRequest

        try:
            return _segmenter(folder).score(pdf)
        except BadRequest as e:
            log.warning("segments_of: user %s left out (%s)", pdf["user_id"].iloc[0] if len(pdf) else "?", e)
            return pd.DataFrame({c: pd.Series(dtype=object) for c in OUTPUT})

    return frame.groupBy("user_id").applyInPandas(score, SCHEMA)
