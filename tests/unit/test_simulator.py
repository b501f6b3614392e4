"""Traffic simulator: contract, position bias, oracle vs random, bots, cold start, ids."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

import numpy as np
import pandas as pd
import pytest

from shoprank.data.contracts import EVENT_TYPES, FEEDBACK
from shoprank.data.simulator import (
    oracle_rank_fn,
    pseudonymise,
    random_rank_fn,
    simulate_day,
    write_day,
)
from shoprank.data.synthetic import generate_marketplace

START = dt.date(2026, 11, 1)
DAY = START + dt.timedelta(days=1)
KEY = b"test-key"
N = 150
BOTS = 0.04


@pytest.fixture(scope="module")
def mp():
    return generate_marketplace(seed=11)


@pytest.fixture(scope="module")
def random_events(mp):
    return simulate_day(mp, DAY, random_rank_fn, n_sessions=N, seed=1, hmac_key=KEY, bot_fraction=BOTS,
                        model_version="7")


@pytest.fixture(scope="module")
def oracle_events(mp):
    return simulate_day(mp, DAY, oracle_rank_fn(mp), n_sessions=N, seed=1, hmac_key=KEY, bot_fraction=BOTS)


def humans(ev: pd.DataFrame) -> pd.DataFrame:
    return ev[~ev["session_id"].isin(ev.attrs["bot_session_ids"])]


def test_events_conform_to_contract(random_events):
    ev = random_events
    assert list(ev.columns) == FEEDBACK.names
    assert {c: str(t) for c, t in ev.dtypes.items()} == FEEDBACK.dtypes
    assert ev["event_id"].is_unique
    assert set(ev["event_type"]) == set(EVENT_TYPES)
    assert ev["position"].between(1, 10).all()
    assert (ev["model_version"] == "7").all()
    lo = pd.Timestamp(DAY, tz="UTC")
    assert ((ev["ts"] >= lo) & (ev["ts"] < lo + pd.Timedelta(days=1))).all()
    assert ev["ts"].is_monotonic_increasing
    for col in FEEDBACK.names[:-1]:
        assert ev[col].notna().all(), col


def test_event_structure_is_consistent(random_events):
    ev = random_events
    imp = ev[ev["event_type"] == "impression"]
    per_req = imp.groupby("request_id")["position"].agg(["size", "nunique", "max"])
    assert (per_req["size"] == per_req["nunique"]).all() and (per_req["size"] <= 10).all()
    assert (per_req["max"] == per_req["size"]).all()  # positions 1..k without gaps
    assert imp.groupby("request_id")[["session_id", "query"]].nunique().eq(1).all().all()
    shown = set(zip(imp["request_id"], imp["product_id"], imp["position"]))
    for kind, parent in (("click", "impression"), ("add_to_cart", "click"), ("purchase", "add_to_cart")):
        ch = ev[ev["event_type"] == kind]
        par = ev[ev["event_type"] == parent]
        par_keys = set(zip(par["request_id"], par["product_id"]))
        assert all(k in par_keys for k in zip(ch["request_id"], ch["product_id"])), kind
        assert all(k in shown for k in zip(ch["request_id"], ch["product_id"], ch["position"]))
        first = par.groupby(["request_id", "product_id"])["ts"].min()
        later = ch.join(first.rename("parent_ts"), on=["request_id", "product_id"])
        assert (later["ts"] >= later["parent_ts"]).all(), kind


def test_deterministic_by_seed(mp):
    def run(seed):
        return simulate_day(mp, DAY, random_rank_fn, n_sessions=40, seed=seed, hmac_key=KEY, bot_fraction=0.1)

    a, b, c = run(1), run(1), run(2)
    pd.testing.assert_frame_equal(a, b)
    assert a.attrs == b.attrs
    assert not c["event_id"].isin(a["event_id"]).any()
    assert not c[["query", "product_id"]].equals(a[["query", "product_id"]])


def test_clicks_follow_position_bias_under_random_ranking(random_events):
    h = humans(random_events)
    imp = h[h["event_type"] == "impression"].groupby("position").size()
    clk = h[h["event_type"] == "click"].groupby("position").size().reindex(imp.index, fill_value=0)
    ctr = clk / imp
    assert ctr[1] > 3 * ctr[10]
    assert ctr[1] > ctr[3] > ctr[10]


def test_oracle_ranking_beats_random(random_events, oracle_events):
    r, o = humans(random_events), humans(oracle_events)
    assert len(r[r["event_type"] == "impression"]) == len(o[o["event_type"] == "impression"])
    for kind in ("click", "purchase"):
        assert (o["event_type"] == kind).sum() > 1.3 * (r["event_type"] == kind).sum(), kind


def test_bot_sessions(random_events):
    ev = random_events
    bots = ev.attrs["bot_session_ids"]
    assert len(bots) == round(N * BOTS)
    per = ev.assign(click=ev["event_type"] == "click", buy=ev["event_type"].isin(["add_to_cart", "purchase"]))
    per = per.groupby("session_id")[["click", "buy"]].sum()
    b, h = per[per.index.isin(bots)], per[~per.index.isin(bots)]
    assert len(b) == len(bots)
    assert (b["buy"] == 0).all() and h["buy"].sum() > 0
    assert b["click"].min() > h["click"].quantile(0.99)


def test_no_bots_by_default(mp):
    ev = simulate_day(mp, DAY, random_rank_fn, n_sessions=30, seed=4, hmac_key=KEY)
    assert ev.attrs["bot_session_ids"] == []
    per = ev[ev["event_type"] == "click"].groupby("session_id").size()
    assert per.max() < 40
    assert ev["model_version"].isna().all()


def test_user_ids_are_keyed_hashes(mp, random_events):
    raw = set(mp.users["user_id"])
    ids = set(random_events["user_id"])
    assert not ids & raw
    assert all(len(u) == 64 and int(u, 16) >= 0 for u in ids)
    assert pseudonymise("U000001", KEY) == hmac.new(KEY, b"U000001", hashlib.sha256).hexdigest()
    assert pseudonymise("U000001", KEY) != pseudonymise("U000001", b"other-key")
    a = simulate_day(mp, DAY, random_rank_fn, n_sessions=10, seed=9, hmac_key=KEY)
    b = simulate_day(mp, DAY, random_rank_fn, n_sessions=10, seed=9, hmac_key="other-key")
    assert not a["user_id"].isin(b["user_id"]).any()
    pd.testing.assert_frame_equal(a.drop(columns="user_id"), b.drop(columns="user_id"))
    # one raw user maps to one pseudonym: sessions of a returning user share it
    assert random_events.groupby("session_id")["user_id"].nunique().eq(1).all()


def test_candidates_respect_cold_start(mp):
    day = START + dt.timedelta(days=6)
    end = pd.Timestamp(day + dt.timedelta(days=1), tz="UTC")
    seen = []

    def spy(query, candidates):
        seen.append(candidates)
        return random_rank_fn(query, candidates)

    ev = simulate_day(mp, day, spy, n_sessions=40, seed=3, hmac_key=KEY)
    cands = pd.concat(seen)
    assert (cands["created_at"] < end).all()
    assert (pd.Series([len(c) for c in seen]) > 10).all()
    created = mp.catalog.set_index("product_id")["created_at"]
    shown = created[ev["product_id"].unique()]
    assert (shown < end).all()
    assert (shown > pd.Timestamp(START, tz="UTC")).any()  # new products get exposure


def test_bad_rank_fn_is_rejected(mp):
    with pytest.raises(ValueError, match="scores"):
        simulate_day(mp, DAY, lambda q, c: np.zeros(3), n_sessions=2, hmac_key=KEY)
    with pytest.raises(ValueError, match="non-finite"):
        simulate_day(mp, DAY, lambda q, c: np.full(len(c), np.nan), n_sessions=2, hmac_key=KEY)


def test_write_day(mp, random_events, recording_storage):
    st = recording_storage
    keys = write_day(st, mp, DAY, random_events)
    assert keys == [f"raw/feedback/dt={DAY.isoformat()}/part-00000.parquet"]
    out = st.partitions[("raw", "feedback", DAY.isoformat())]
    pd.testing.assert_frame_equal(out, FEEDBACK.conform(random_events))
    with pytest.raises(ValueError, match="outside"):
        write_day(st, mp, DAY + dt.timedelta(days=1), random_events)
    dup = pd.concat([random_events.iloc[:5], random_events.iloc[:5]])
    with pytest.raises(ValueError, match="unique"):
        write_day(st, mp, DAY, dup)


def test_there_is_no_default_hash_key(mp, monkeypatch):
    """Issue 18 item 5: no public development key; the environment is not read behind the caller's back."""
    import shoprank.data.simulator as simulator
    from shoprank.config import ConfigError

    assert not hasattr(simulator, "DEV_HASH_KEY")
    monkeypatch.setenv("SHOPRANK_USER_HASH_KEY", "from-the-environment")
    for key in (None, "", "  ", b""):
        with pytest.raises(ConfigError, match="SHOPRANK_USER_HASH_KEY"):
            simulate_day(mp, DAY, random_rank_fn, n_sessions=2, hmac_key=key)


def test_simulate_and_write_takes_the_key_from_settings_and_never_generates_one(mp, tmp_path, monkeypatch,
                                                                                recording_storage):
    """The demo / CLI path: the key is SHOPRANK_USER_HASH_KEY from the environment or stack.env
    (as serving reads it); missing, a ConfigError naming it, and no stack.env is written."""
    import shoprank.simulation as simulation
    from shoprank.config import ConfigError, Settings

    for name in ("SHOPRANK_USER_HASH_KEY", "SHOPRANK_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SHOPRANK_ENV_FILE", str(tmp_path / "no.env"))
    settings = Settings.from_env({"SHOPRANK_HOME": str(tmp_path / "home"), "SHOPRANK_ENV_FILE": str(tmp_path / "x")})
    monkeypatch.setattr(simulation, "Storage", lambda _settings: recording_storage)
    monkeypatch.setattr(simulation, "load_marketplace", lambda _storage: mp)
    with pytest.raises(ConfigError, match="SHOPRANK_USER_HASH_KEY is not set"):
        simulation.simulate_and_write(settings, DAY, n_sessions=5, ranker="random")
    assert not (settings.home / "stack.env").exists()
    settings.home.mkdir(parents=True)
    (settings.home / "stack.env").write_text("SHOPRANK_USER_HASH_KEY=stack-env-key\n")
    out = simulation.simulate_and_write(settings, DAY, n_sessions=5, ranker="random")
    written = recording_storage.partitions[("raw", "feedback", DAY.isoformat())]
    assert out["events"] == len(written) > 0
    raw = mp.users["user_id"].astype(str)
    assert set(written["user_id"]) <= {pseudonymise(u, "stack-env-key") for u in raw}
