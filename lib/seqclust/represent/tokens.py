"""Tokenize: the vocabulary and the price reference, built in Spark from sessions.

Tokens are ``event_type:category`` by default (written by sessionize), or any combination of
event type, category, item, price band and pace bucket (``tokenize.token_fields``); the vocabulary keeps the
``vocab_size`` most frequent tokens seen at least ``min_count`` times (ties by token), with
PAD, OOV and MASK ids in front. Category median prices are the reference for price bands.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from seqclust.represent.features import DEFAULT_TOKEN_FIELDS, Vocab, compose_tokens, event_parts, input_columns, price_edges_from_ratios
from seqclust.runtime.store import one_row

log = logging.getLogger(__name__)

MAX_PRICE_CATEGORIES = 50_000


def build_vocab(
    sessions: DataFrame,
    max_len: int,
    vocab_size: int,
    min_count: int,
    price_bands: int,
    token_fields: tuple[str, ...] = DEFAULT_TOKEN_FIELDS,
    sample: pa.Table | None = None,
) -> Vocab:
    """Category median prices, price-band edges (from ``sample``, a driver-side sample of
    sessions, when given) and token counts over ``sessions``; only aggregates reach the driver.

    Default tokens are counted from the sessions' ``tokens`` column; other ``token_fields``
    are composed on the executors by the same code that featurises (``compose_tokens``).
    """
    events = (
        sessions.select(F.explode(F.arrays_zip("categories", "prices")).alias("e"))
        .select(F.col("e.categories").alias("c"), F.col("e.prices").alias("p"))
        .where(F.col("p") > 0)
    )
    cats = (
        events.groupBy("c")
        .agg(F.percentile_approx("p", 0.5, 1000).alias("m"), F.count("*").alias("n"))
        .orderBy(F.desc("n"), "c")
        .limit(MAX_PRICE_CATEGORIES)
        .collect()
    )
    global_median = one_row(events.agg(F.percentile_approx("p", 0.5, 1000)))[0]
    vocab = Vocab(
        tokens=(),
        categories=tuple(r["c"] for r in cats),
        category_median_price=tuple(float(r["m"]) for r in cats),
        global_median_price=float(global_median) if global_median is not None else 1.0,
        price_edges=tuple(np.linspace(-1.0, 1.0, price_bands - 1).tolist()),
        max_len=max_len,
        token_fields=tuple(token_fields),
    )
    if sample is not None:
        vocab = with_price_edges(vocab, sample, price_bands)
    if tuple(token_fields) == DEFAULT_TOKEN_FIELDS:
        flat = sessions.select(F.explode("tokens").alias("t"))
    else:
        flat = sessions.select(*input_columns(sessions.columns, token_fields)).mapInArrow(_token_stream(vocab), "t string")
    tokens = flat.groupBy("t").count().where(F.col("count") >= min_count).orderBy(F.desc("count"), "t").limit(vocab_size).collect()
    vocab = replace(vocab, tokens=tuple(r["t"] for r in tokens), token_counts=tuple(int(r["count"]) for r in tokens))
    log.info(
        "tokenize: vocabulary of %d tokens (%s), %d categories with a median price",
        len(vocab.tokens),
        ":".join(token_fields),
        len(vocab.categories),
    )
    return vocab


def _token_stream(vocab: Vocab):
    def fn(batches):
        for b in batches:
            if b.num_rows:
                yield pa.RecordBatch.from_arrays([compose_tokens(event_parts(b, vocab), vocab.token_fields)], names=["t"])

    return fn


def with_price_edges(vocab: Vocab, sample: pa.Table, price_bands: int) -> Vocab:
    """Return ``vocab`` with price-band edges at quantiles of log(price / category median)
    computed on a driver-side sample (an Arrow table with ``categories`` and ``prices``)."""
    cats = pc.list_flatten(sample.column("categories"))
    prices = pc.list_flatten(sample.column("prices")).cast("double").to_numpy(zero_copy_only=False)
    idx = pc.fill_null(pc.index_in(cats, value_set=pa.array(vocab.categories, pa.string())), len(vocab.categories)).to_numpy()
    med = np.asarray(vocab.category_median_price + (vocab.global_median_price,))[idx]
    ok = np.isfinite(prices) & (prices > 0)
    ratios = np.log(prices[ok] / np.maximum(med[ok], 1e-9))
    return replace(vocab, price_edges=price_edges_from_ratios(ratios, price_bands))
