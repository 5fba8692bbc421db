import numpy as np
import pyarrow as pa

from seqclust.represent.features import MASK, OOV, PAD, TOKEN_OFFSET, Vocab, featurize, price_edges_from_ratios


def _vocab(max_len=3):
    return Vocab(
        tokens=("view:c1", "cart:c1"),
        categories=("c1",),
        category_median_price=(10.0,),
        global_median_price=100.0,
        price_edges=(-0.5, 0.5),
        max_len=max_len,
    )


def test_featurize_exact_ids_truncation_and_padding():
    batch = pa.table(
        {
            "tokens": [["view:c1", "cart:c1", "buy:zz", "view:c1"], ["cart:c1"]],
            "event_types": [["view", "cart", "weird", "view"], ["cart"]],
            "categories": [["c1", "c1", "zz", "c1"], ["c1"]],
            "prices": [[10.0, 30.0, 100.0, None], [1.0]],
            "gaps_s": [[0.0, 4.0, 70.0, 2000.0], [0.0]],
        }
    )
    f = featurize(batch, _vocab(max_len=3))
    # newest 3 events of row 0 kept, left-aligned; row 1 padded at the end
    np.testing.assert_array_equal(f["tok"], [[TOKEN_OFFSET + 1, OOV, TOKEN_OFFSET + 0], [TOKEN_OFFSET + 1, PAD, PAD]])
    np.testing.assert_array_equal(f["etype"], [[3, 6, 1], [3, 0, 0]])  # unknown type -> other (6)
    # gap ids: 1 = session start, else 2 + bucket; the kept window starts mid-session
    np.testing.assert_array_equal(f["gap"], [[2, 6, 10], [1, 0, 0]])  # 4s, 70s, 2000s
    # price bands vs category median (c1: 10, unknown category: global 100): ratio logs
    # log(3) > 0.5 -> band 2+2; log(100/100)=0 -> 2+1; None -> 1 (no price); log(0.1) -> 2
    np.testing.assert_array_equal(f["price"], [[4, 3, 1], [2, 0, 0]])
    assert all(m.dtype == np.int32 for m in f.values())


def test_featurize_accepts_sliced_batches():
    batch = (
        pa.table(
            {
                "tokens": [["view:c1"], ["cart:c1", "view:c1"]],
                "event_types": [["view"], ["cart", "view"]],
                "categories": [["c1"], ["c1", "c1"]],
                "prices": [[1.0], [1.0, 2.0]],
                "gaps_s": [[0.0], [0.0, 1.0]],
            }
        )
        .to_batches()[0]
        .slice(1, 1)
    )
    f = featurize(batch, _vocab())
    np.testing.assert_array_equal(f["tok"], [[TOKEN_OFFSET + 1, TOKEN_OFFSET, PAD]])


def test_vocab_sizes_masks_and_json_round_trip():
    v = _vocab()
    assert v.sizes == {"tok": 5, "etype": 8, "gap": 12, "price": 6}
    assert v.mask_ids == {"tok": MASK, "etype": 7, "gap": 11, "price": 5}
    assert Vocab.from_json(v.to_json()) == v


def test_price_edges_are_quantiles():
    edges = price_edges_from_ratios(np.arange(100, dtype=float), 4)
    np.testing.assert_allclose(edges, [24.75, 49.5, 74.25])


def test_token_fields_compose_tokens_the_same_way_everywhere():
    from seqclust.represent.features import compose_tokens, event_parts

    batch = pa.table(
        {
            "tokens": [["view:c1", "cart:c1"], ["view:zz"]],
            "event_types": [["view", "cart"], ["view"]],
            "categories": [["c1", "c1"], ["zz"]],
            "items": [["i1", "i2"], ["i9"]],
            "prices": [[10.0, 30.0], [None]],
            "gaps_s": [[0.0, 70.0], [0.0]],
        }
    )
    v = _vocab()
    parts = event_parts(batch, v)
    assert compose_tokens(parts, ("event_type", "category")).to_pylist() == ["view:c1", "cart:c1", "view:zz"]
    assert compose_tokens(parts, ("item",)).to_pylist() == ["i1", "i2", "i9"]
    # price band ids (1 = no price) and pace bucket ids (1 = first event) as p<id>, g<id>
    assert compose_tokens(parts, ("event_type", "price_band", "gap_bucket")).to_pylist() == ["view:p3:g1", "cart:p4:g6", "view:p1:g1"]
    import dataclasses

    # featurize looks the composed tokens up in the vocabulary of the same fields
    vi = dataclasses.replace(v, tokens=("i2", "i1"), token_fields=("item",))
    np.testing.assert_array_equal(featurize(batch, vi)["tok"], [[TOKEN_OFFSET + 1, TOKEN_OFFSET + 0, PAD], [OOV, PAD, PAD]])
    assert Vocab.from_json(vi.to_json()) == vi


def test_vocab_of_other_token_fields_is_counted_in_spark(spark):
    from seqclust.represent.tokens import build_vocab

    rows = [
        (["view:c1", "cart:c1"], ["view", "cart"], ["c1", "c1"], ["i1", "i2"], [1.0, 2.0], [0.0, 5.0]),
        (["view:c2"], ["view"], ["c2"], ["i1"], [None], [0.0]),
    ]
    df = spark.createDataFrame(
        rows,
        "tokens array<string>, event_types array<string>, categories array<string>, items array<string>, "
        "prices array<double>, gaps_s array<double>",
    )
    v = build_vocab(df, 5, 100, 1, 4, ("item",))
    assert dict(zip(v.tokens, v.token_counts)) == {"i1": 2, "i2": 1} and v.token_fields == ("item",)
    v = build_vocab(df, 5, 100, 1, 4)
    assert dict(zip(v.tokens, v.token_counts)) == {"view:c1": 1, "cart:c1": 1, "view:c2": 1}
