"""Train stage: vocabulary in Spark, a bounded seeded sample to the driver, the encoder
trained self-supervised, saved as a versioned artifact (or an existing one reused)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from seqclust.core.compat import to_arrow
from seqclust.core.config import EmbedConfig, EncoderConfig, TokenizeConfig
from seqclust.core.errors import InputError
from seqclust.represent import behaviour
from seqclust.represent.encoder import Artifact, load_artifact, save_artifact, train
from seqclust.represent.features import featurize, input_columns
from seqclust.represent.tokens import build_vocab
from seqclust.runtime.context import RunContext
from seqclust.runtime.spark import ROWS_CACHE

log = logging.getLogger(__name__)


def training_sample(sessions: DataFrame, n: int, seed: int) -> pa.Table:
    """Up to ``n`` sessions chosen by a seeded hash of the session id: the same sessions
    whatever the partitioning, and never more than ``n`` rows reach the driver."""
    return to_arrow(
        sessions.select("session_id", *input_columns(sessions.columns))
        .withColumn("_h", F.xxhash64("session_id", F.lit(seed)))
        .orderBy("_h", "session_id")
        .limit(n)
        .drop("_h")
    )


@dataclass(frozen=True)
class TrainResult:
    encoder_id: str
    path: str
    trained: bool
    sample_sessions: int
    # with keep_counts: each user's behaviour-token counts (a row per user: user_id, tokens, n), cached
    token_counts: DataFrame | None = field(default=None, compare=False, repr=False)


def fit_token_model(
    sessions: DataFrame, vocab, embed: EmbedConfig, seed: int, interest: str, keep: bool = False
) -> tuple[behaviour.TokenModel, DataFrame | None]:
    """The behaviour-token representation fitted on this run's modelled sessions, and with
    ``keep`` the users' token counts it counted (cached: the embed and cluster stages of the
    same process use them instead of counting again; the caller unpersists them)."""
    counts = behaviour.token_counts(sessions, vocab, interest).persist(ROWS_CACHE)
    try:
        model = behaviour.fit(counts, embed.token_vocab, embed.token_min_df, embed.token_dim, embed.token_fit_users, seed, interest)
    except ValueError as e:
        counts.unpersist()
        raise InputError(str(e)) from None
    if not keep:
        counts.unpersist()
        return model, None
    return model, counts


def run(
    spark: SparkSession,
    ctx: RunContext,
    tok: TokenizeConfig,
    cfg: EncoderConfig,
    seed: int,
    embed: EmbedConfig | None = None,
    keep_counts: bool = False,
) -> tuple[TrainResult, Artifact]:
    """Train (or load with ``encoder.path``) the encoder for this run; with a representation
    that uses behaviour tokens (``embed.representation``), fit their model into the artifact."""
    if cfg.path:
        art = load_artifact(cfg.path)
        log.info("train: reusing encoder %s from %s", art.encoder_id, cfg.path)
        return TrainResult(art.encoder_id, str(art.path), False, 0), art
    sessions = ctx.store.read(spark, ctx.tables.sessions, ctx.run_id).where("is_modelled")
    sample = training_sample(sessions, cfg.train_sample, seed)
    if sample.num_rows < 10:
        raise InputError(f"only {sample.num_rows} sessions to train on; need at least 10")
    fields = tuple(tok.token_fields)
    interest = behaviour.interest_field(sessions)
    if "category" in fields and interest != "category":
        # measured on the persona family: swapping in the item made the encoder's vocabulary the
        # catalogue and its vectors lose the behaviour (real_sessions ARI 0.75 -> 0.38); the
        # behaviour tokens carry the items instead
        log.info("train: the events carry no category: the encoder's tokens are the event types; the behaviour tokens use the %s", interest)
    vocab = build_vocab(sessions, tok.max_len, tok.vocab_size, tok.min_count, tok.price_bands, fields, sample)
    if not vocab.tokens:
        raise InputError(f"no token occurs at least tokenize.min_count={tok.min_count} times; lower it or give more data")
    feats = featurize(sample, vocab)
    log.info("train: %s encoder on %d sessions (sample of at most %d)", cfg.architecture, sample.num_rows, cfg.train_sample)
    model_cfg, weights, metrics = train(
        feats,
        vocab,
        architecture=cfg.architecture,
        embedding_dim=cfg.embedding_dim,
        token_dim=cfg.token_dim,
        hidden=cfg.hidden,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        validation_fraction=cfg.validation_fraction,
        patience=cfg.patience,
        mask_prob=cfg.mask_prob,
        seed=seed,
        objective=cfg.objective,
    )
    token_model, counts = None, None
    if embed is not None and embed.representation != "encoder":
        token_model, counts = fit_token_model(sessions, vocab, embed, seed, interest, keep=keep_counts)
    art = save_artifact(ctx.artifacts_dir / "encoders", model_cfg, vocab, weights, metrics, token_model)
    log.info("train: encoder %s saved to %s", art.encoder_id, art.path)
    return TrainResult(art.encoder_id, str(art.path), True, sample.num_rows, counts), art
