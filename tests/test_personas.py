"""The persona benchmark family: each generator plants personas an oracle can recover from the
features it planted them in, and only there (no Spark: pandas sessions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import cross_val_score

from seqclust.datasets import personas as P

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
USERS = 1200


def sessions(events) -> pd.DataFrame:
    df = events.to_pandas()
    df["t"] = (pd.to_datetime(df["ts"]) - pd.Timestamp("1970-01-01", tz="UTC")).dt.total_seconds()
    df = df.sort_values(["user_id", "t", "event_id"]).reset_index(drop=True)
    gap = df.groupby("user_id")["t"].diff()
    df["new"] = gap.isna() | (gap > 1800)
    df["sid"] = df["new"].cumsum()
    df["gap"] = gap.where(~df["new"])
    return df


def labels_of(personas, index) -> np.ndarray:
    lab = personas.to_pandas().set_index("user_id")["persona"]
    return lab.loc[index].to_numpy()


def kmeans_ari(X: np.ndarray, y: np.ndarray, k: int) -> float:
    return adjusted_rand_score(y, KMeans(k, n_init=5, random_state=0).fit(X).labels_)


def test_with_mix_keeps_the_stationary_mix_and_the_structure():
    rng = np.random.default_rng(0)
    kernel = rng.dirichlet(np.full(P.N_T, 0.3), size=P.N_T) + 1e-3
    m = P.with_mix(kernel, P.BASE_MIX)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(P.stationary(m), P.BASE_MIX, atol=1e-6)
    chains = P.distinct_chains(4, np.random.default_rng(1))
    for c in chains:
        np.testing.assert_allclose(P.stationary(c), P.BASE_MIX, atol=1e-6)
    # different successors: every pair of chains differs somewhere by a wide margin
    assert min(np.abs(a - b).max() for i, a in enumerate(chains) for b in chains[i + 1 :]) > 0.3


def test_activity_is_heavy_tailed_with_many_one_session_users():
    events, personas = P.pace_price(USERS, 3)
    df = sessions(events)
    per_user = df.groupby("user_id")["sid"].nunique()
    assert len(per_user) == USERS
    assert 0.25 <= (per_user == 1).mean() <= 0.45
    assert per_user.max() >= 8 * per_user.median()
    assert set(events.column_names) == {"event_id", "user_id", "ts", "event_type", "item_id", "category_id", "price"}


def test_interests_personas_live_in_departments_only():
    events, personas = P.interests(USERS, 3, 8)
    df = sessions(events)
    dept = df["category_id"].str[1:].astype(int) // P.CATS_PER_DEPT
    shares = pd.crosstab(df["user_id"], dept, normalize="index")
    y = labels_of(personas, shares.index)
    assert kmeans_ari(np.sqrt(shares.to_numpy()), y, 8) > 0.8
    # the event-type mix does not tell the personas apart
    mix = pd.crosstab(df["user_id"], df["event_type"], normalize="index")
    assert kmeans_ari(mix.to_numpy(), labels_of(personas, mix.index), 8) < 0.05


def test_dynamics_personas_share_the_mix_and_differ_in_what_follows_what():
    events, personas = P.dynamics(USERS, 3, 5)
    df = sessions(events)
    lab = personas.to_pandas().set_index("user_id")["persona"]
    per_persona = pd.crosstab(lab.loc[df["user_id"]].to_numpy(), df["event_type"], normalize="index")
    assert (per_persona.max() - per_persona.min()).max() < 0.04  # the mix barely differs
    # oracle: the likelihood of each user's transitions under each persona's chain
    chains = P.dynamics_chains(5)
    code = {t: i for i, t in enumerate(P.TYPES)}
    df["e"] = df["event_type"].map(code)
    df["p"] = df.groupby("sid")["e"].shift()
    d = df.dropna(subset=["p"])
    logp = np.log(chains + 0.02)
    ll = d.groupby("user_id")[["p", "e"]].apply(lambda x: logp[:, x["p"].astype(int).to_numpy(), x["e"].to_numpy()].sum(axis=1))
    pred = np.stack(ll.to_numpy()).argmax(axis=1)
    assert adjusted_rand_score(lab.loc[ll.index].to_numpy(), pred) > 0.85


def test_pace_price_personas_are_pace_and_price_level():
    events, personas = P.pace_price(USERS, 3, 6)
    df = sessions(events)
    df["ratio"] = np.log(df["price"] / df.groupby("category_id")["price"].transform("median"))
    feats = pd.DataFrame(
        {"pace": np.log(df.groupby("user_id")["gap"].median().fillna(30.0)), "price": df.groupby("user_id")["ratio"].mean().fillna(0.0)}
    )
    X = ((feats - feats.mean()) / feats.std()).to_numpy()
    assert kmeans_ari(X, labels_of(personas, feats.index), 6) > 0.85


def test_mixture_personas_are_recoverable_from_the_planted_signals():
    events, personas = P.mixture(USERS, 3, 10)
    df = sessions(events)
    dept = df["category_id"].str[1:].astype(int) // P.CATS_PER_DEPT
    prev = df.groupby("sid")["event_type"].shift().fillna("^")
    start = pd.to_datetime(df.loc[df["new"], "ts"])
    hour = start.dt.hour.groupby(df.loc[df["new"], "user_id"]).median()
    df["ratio"] = np.log(df["price"] / df.groupby("category_id")["price"].transform("median"))
    feats = pd.concat(
        [
            pd.crosstab(df["user_id"], dept, normalize="index"),
            pd.crosstab(df["user_id"], prev + ">" + df["event_type"], normalize="index"),
            np.log(df.groupby("user_id")["gap"].median().fillna(30.0)).rename("pace"),
            df.groupby("user_id")["ratio"].mean().fillna(0.0).rename("price"),
            hour.rename("hour"),
        ],
        axis=1,
    ).fillna(0.0)
    feats.columns = feats.columns.astype(str)
    X = ((feats - feats.mean()) / feats.std().replace(0, 1)).to_numpy()
    y = labels_of(personas, feats.index)
    assert len(set(y)) == 10
    acc = cross_val_score(LogisticRegression(max_iter=3000), X, y, cv=3).mean()
    assert acc > 0.9


def test_mixture_refuses_more_personas_than_its_pools_allow():
    with pytest.raises(ValueError, match="differ in two signals"):
        P.mixture(50, 1, 60)


@pytest.mark.skipif(not (DATA_ROOT / "retailrocket_subset").is_dir(), reason=f"the RetailRocket subset is not at {DATA_ROOT}")
def test_real_sessions_are_real_and_personas_follow_their_session_kinds():
    real = P.read_retailrocket(DATA_ROOT / "retailrocket_subset")
    assert len(real.offsets) - 1 == 15877  # PROVENANCE.md: 15,877 sessions with a 30-minute gap
    events, personas = P.real_sessions(USERS, 3, DATA_ROOT / "retailrocket_subset")
    df = sessions(events)
    assert df["category_id"].isna().all() and df["price"].isna().all()
    # every item id is a real one
    assert set(df["item_id"].astype(int)) <= set(real.item.tolist())
    off = np.append(np.nonzero(df["new"].to_numpy())[0], len(df))
    kind = P.session_kinds(off, df["event_type"].to_numpy(), df["t"].to_numpy())
    names = list(P.REAL_PERSONAS)
    logp = np.log(np.stack([P.REAL_PERSONAS[n] for n in names]) + 0.02)
    ll = pd.DataFrame(logp[:, kind].T, index=df["user_id"].to_numpy()[off[:-1]]).groupby(level=0).sum()
    pred = ll.to_numpy().argmax(axis=1)
    assert adjusted_rand_score(labels_of(personas, ll.index), pred) > 0.8


def test_bayes_labels_read_the_dynamics_personas_at_least_as_well_as_the_plug_in_oracle():
    events, personas = P.dynamics(USERS, 3, 5)
    lab = P.bayes_labels("dynamics", events, 5)
    truth = personas.to_pandas().set_index("user_id")["persona"]
    assert set(lab) == set(truth.index)  # every user, one-event users too (the prior's argmax)
    users = sorted(lab)
    bayes = adjusted_rand_score(truth.loc[users].to_numpy(), [lab[u] for u in users])
    # the plug-in oracle of the test above: the chains' likelihood without the per-user jitter
    df = sessions(events)
    code = {t: i for i, t in enumerate(P.TYPES)}
    df["e"] = df["event_type"].map(code)
    df["p"] = df.groupby("sid")["e"].shift()
    d = df.dropna(subset=["p"])
    logp = np.log(P.dynamics_chains(5) + 0.02)
    ll = d.groupby("user_id")[["p", "e"]].apply(lambda x: logp[:, x["p"].astype(int).to_numpy(), x["e"].to_numpy()].sum(axis=1))
    plug = np.stack(ll.to_numpy()).argmax(axis=1)
    plug_ari = adjusted_rand_score(truth.loc[ll.index].to_numpy(), [f"p{i}" for i in plug])
    assert bayes > 0.85
    assert bayes >= plug_ari - 0.01


def test_bayes_labels_only_where_the_likelihood_is_closed_form():
    events, _ = P.pace_price(60, 1)
    assert P.bayes_labels("pace_price", events, 6) is None


@pytest.mark.skipif(not (DATA_ROOT / "retailrocket_subset").is_dir(), reason=f"the RetailRocket subset is not at {DATA_ROOT}")
def test_bayes_labels_of_real_sessions_follow_the_session_kinds():
    events, personas = P.real_sessions(USERS, 3, DATA_ROOT / "retailrocket_subset")
    lab = P.bayes_labels("real_sessions", events, 5)
    truth = personas.to_pandas().set_index("user_id")["persona"]
    users = sorted(lab)
    assert set(lab.values()) <= set(P.REAL_PERSONAS)
    assert adjusted_rand_score(truth.loc[users].to_numpy(), [lab[u] for u in users]) > 0.8


def test_write_member_and_unknown_names(tmp_path):
    info = P.write_member(tmp_path / "d", "dynamics", 50, seed=2)
    assert info["planted_k"] == 5 and (tmp_path / "d" / "events").is_dir() and (tmp_path / "d" / "personas").is_dir()
    with pytest.raises(ValueError, match="choose from"):
        P.write_member(tmp_path / "x", "nope", 10)
    with pytest.raises(ValueError, match="needs the real log"):
        P.write_member(tmp_path / "y", "real_sessions", 10, data_root=tmp_path)


def _nested_features(df: pd.DataFrame) -> pd.DataFrame:
    """Per user: price level within the category, hour and weekend share of session starts,
    breadth (distinct categories per session), revisits, session length, departments, pace and
    what follows what: every signal the nested generators plant."""
    first = df.loc[df["new"]]
    start = pd.to_datetime(first["ts"])
    by_sess = df.groupby("sid")
    per_sess = pd.DataFrame(
        {
            "user_id": by_sess["user_id"].first(),
            "len": by_sess.size(),
            "breadth": by_sess["category_id"].nunique() / by_sess.size(),
            "revisit": 1.0 - by_sess["item_id"].nunique() / by_sess["item_id"].count().clip(lower=1),
        }
    )
    df = df.assign(ratio=np.log(df["price"] / df.groupby("category_id")["price"].transform("median")))
    dept = df["category_id"].str[1:].astype(int) // P.CATS_PER_DEPT
    prev = df.groupby("sid")["event_type"].shift().fillna("^")
    feats = pd.concat(
        [
            df.groupby("user_id")["ratio"].mean().rename("price"),
            start.dt.hour.groupby(first["user_id"]).median().rename("hour"),
            (start.dt.dayofweek >= 5).groupby(first["user_id"]).mean().rename("weekend"),
            per_sess.groupby("user_id")[["len", "breadth", "revisit"]].mean(),
            np.log(df.groupby("user_id")["gap"].median().fillna(30.0)).rename("pace"),
            pd.crosstab(df["user_id"], dept, normalize="index"),
            pd.crosstab(df["user_id"], prev + ">" + df["event_type"], normalize="index"),
        ],
        axis=1,
    ).fillna(0.0)
    feats.columns = feats.columns.astype(str)
    return feats


@pytest.mark.parametrize("name, groups, group_signal", [("nested_price", 3, "price"), ("nested_interests", 2, "departments")])
def test_nested_personas_are_recoverable_and_their_groups_are_planted_in_their_own_signal(name, groups, group_signal):
    events, personas = P.member(name).make(USERS, 3)
    table = personas.to_pandas().set_index("user_id")
    assert table["group"].nunique() == groups and table["persona"].nunique() == 6
    # every persona sits in exactly one group, and its name says which
    assert (table.groupby("persona")["group"].nunique() == 1).all()
    assert all(p.split(".")[0] == g for p, g in zip(table["persona"], table["group"]))
    df = sessions(events)
    feats = _nested_features(df)
    active = df.groupby("user_id")["sid"].nunique().loc[feats.index] >= 3  # the planted signals need a few sessions to show
    X = ((feats - feats.mean()) / feats.std().replace(0, 1)).to_numpy()[active.to_numpy()]
    y = table.loc[feats.index, "persona"].to_numpy()[active.to_numpy()]
    g = table.loc[feats.index, "group"].to_numpy()[active.to_numpy()]
    # an oracle that knows the personas reads them from the planted signals ...
    assert cross_val_score(LogisticRegression(max_iter=3000), X, y, cv=3).mean() > 0.9
    # ... and the groups are planted in a signal of their own: k-means on it alone finds them
    cols = ["price"] if group_signal == "price" else [c for c in feats.columns if c.isdigit()]
    G = feats[cols].to_numpy()[active.to_numpy()]
    assert kmeans_ari((G - G.mean(0)) / G.std(0).clip(1e-9), g, groups) > 0.9
