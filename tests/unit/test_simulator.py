"""Traffic simulator: contract, position bias, oracle vs random, bots, cold start, ids."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from pathlib import Path

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
from shoprank.data.synthetic import LEAF_TOP, generate_marketplace
from shoprank.storage import Storage

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
    check_event_structure(random_events)


def check_event_structure(ev: pd.DataFrame) -> None:
    """Impressions at positions 1..k per request; each click / cart / purchase follows its parent."""
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


# ---- bulk path (issue 19 item 5): the same model, vectorised, written in parts ------------------

BULK_BOTS = 0.02
REF_SESSIONS = 600  # per-request reference (~1 s)
BULK_SESSIONS = 12_000  # bulk (~0.5 s)


@pytest.fixture(scope="module")
def reference_events(mp):
    return simulate_day(mp, DAY, random_rank_fn, n_sessions=REF_SESSIONS, seed=5, hmac_key=KEY, bot_fraction=BULK_BOTS)


@pytest.fixture(scope="module")
def bulk_events(mp):
    from shoprank.data.bulk_simulator import simulate_day_bulk

    return simulate_day_bulk(mp, DAY, n_sessions=BULK_SESSIONS, seed=5, hmac_key=KEY, bot_fraction=BULK_BOTS,
                             model_version="7")


def _close(a, b, what: str, z: float = 4.0) -> None:
    """Means of two samples agree within z standard errors (0/1 samples: two proportions)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert abs(a.mean() - b.mean()) <= z * se + 1e-12, f"{what}: {a.mean():.4f} vs {b.mean():.4f} (se {se:.4f})"


def _rates(mp, ev: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-unit samples of what the shopper model decides (humans unless named bot_)."""
    bot_ids = ev.attrs["bot_session_ids"]
    ev = ev.copy(deep=False)
    ev.attrs = {}  # pandas copies attrs on every operation
    bot = ev["session_id"].isin(bot_ids)
    h, b = ev[~bot], ev[bot]
    kind = h["event_type"]
    imp = h[kind == "impression"]
    clicked = pd.MultiIndex.from_frame(h.loc[kind == "click", ["request_id", "product_id"]])
    carted = pd.MultiIndex.from_frame(h.loc[kind == "add_to_cart", ["request_id", "product_id"]])
    bought = pd.MultiIndex.from_frame(h.loc[kind == "purchase", ["request_id", "product_id"]])
    imp_key = pd.MultiIndex.from_frame(imp[["request_id", "product_id"]])
    click = imp_key.isin(clicked)
    rel = np.empty(len(imp))
    shown = imp["product_id"].to_numpy(dtype=object)
    for q, rows in imp.groupby("query").indices.items():
        rel[rows] = mp.true_relevance(q, shown[rows])
    # the newest products of the query's leaf are always candidates (freshness boost)
    q_index = imp["query"].map(mp.query_index).to_numpy()
    newest = {leaf: set(mp.catalog["product_id"].to_numpy()[mp.leaf_available_index(leaf, DAY)[-2:]])
              for leaf in np.unique(mp.truth.q_leaf)}
    fresh = np.array([p in newest[mp.truth.q_leaf[q]] for q, p in zip(q_index, shown)])
    # half the queries come from the user's preferred department
    top_of = {pseudonymise(str(u), KEY): int(t) for u, t in zip(mp.users["user_id"], mp.truth.user_top)}
    first = imp.drop_duplicates("request_id")
    q_dept = LEAF_TOP[mp.truth.q_leaf[first["query"].map(mp.query_index).to_numpy()]]
    preferred = q_dept == first["user_id"].map(top_of).to_numpy()
    sessions = h.groupby("session_id")
    bot_imp = b[b["event_type"] == "impression"]
    bot_clicked = pd.MultiIndex.from_frame(b.loc[b["event_type"] == "click", ["request_id", "product_id"]])
    out = {
        "events_per_session": sessions.size().to_numpy(),
        "requests_per_session": sessions["request_id"].nunique().to_numpy(),
        "impressions_per_request": imp.groupby("request_id").size().to_numpy(),
        "session_minutes": ((sessions["ts"].max() - sessions["ts"].min()).dt.total_seconds() / 60).to_numpy(),
        "start_hour": sessions["ts"].min().dt.hour.to_numpy(),
        "relevance_shown_per_request": pd.Series(rel).groupby(imp["request_id"].to_numpy()).mean().to_numpy(),
        "fresh_shown_per_request": pd.Series(fresh).groupby(imp["request_id"].to_numpy()).mean().to_numpy(),
        "query_in_preferred_department": preferred,
        "cart_per_click": pd.MultiIndex.from_frame(h.loc[kind == "click", ["request_id", "product_id"]]).isin(carted),
        "purchase_per_cart": pd.MultiIndex.from_frame(h.loc[kind == "add_to_cart", ["request_id", "product_id"]])
        .isin(bought),
        "bot_requests_per_session": b.groupby("session_id")["request_id"].nunique().to_numpy(),
        "bot_click_per_impression": pd.MultiIndex.from_frame(bot_imp[["request_id", "product_id"]]).isin(bot_clicked),
    }
    for p in range(1, 11):
        out[f"click_at_{p}"] = click[imp["position"].to_numpy() == p]
    return out


def test_bulk_path_agrees_with_the_per_request_path(mp, reference_events, bulk_events):
    """Random ranker, same model: every rate the shoppers decide agrees within 4 standard errors
    (a wrong probability, delay, candidate set or session length is many standard errors away)."""
    ref, bulk = _rates(mp, reference_events), _rates(mp, bulk_events)
    for name in ref:
        _close(ref[name], bulk[name], name)
    # the sample sizes make those checks sharp: e.g. CTR at position 1 is known to +-0.02 or better
    assert len(ref["click_at_1"]) > 900 and len(ref["cart_per_click"]) > 500
    # bots: the same count rule, 15-40 requests, ~85% of what they see clicked, no cart or purchase
    for ev, n in ((reference_events, REF_SESSIONS), (bulk_events, BULK_SESSIONS)):
        assert len(ev.attrs["bot_session_ids"]) == round(n * BULK_BOTS)
        bots = ev[ev["session_id"].isin(ev.attrs["bot_session_ids"])]
        assert not bots["event_type"].isin(["add_to_cart", "purchase"]).any()
    bot_requests = bulk["bot_requests_per_session"]  # uniform on 15..40: mean 27.5, sd 7.2
    assert abs(bot_requests.mean() - 27.5) < 4 * 7.2 / np.sqrt(len(bot_requests))
    assert bot_requests.min() >= 15 and bot_requests.max() <= 40
    assert abs(bulk["bot_click_per_impression"].mean() - 0.85) < 0.01
    # position bias: under a random order CTR at position p is CTR at 1 / p (eta = 1)
    ctr = np.array([bulk[f"click_at_{p}"].mean() for p in range(1, 11)])
    assert np.allclose(ctr * np.arange(1, 11) / ctr[0], 1.0, atol=0.15), ctr
    summary = bulk_events.attrs["summary"]
    assert summary["sessions"] == BULK_SESSIONS and summary["events"] == len(bulk_events)
    assert summary["by_type"] == bulk_events["event_type"].value_counts().to_dict()


def test_bulk_oracle_beats_random(mp, bulk_events):
    from shoprank.data.bulk_simulator import simulate_day_bulk

    oracle = simulate_day_bulk(mp, DAY, n_sessions=BULK_SESSIONS, seed=5, hmac_key=KEY, bot_fraction=BULK_BOTS,
                               ranker="oracle")
    r, o = humans(bulk_events), humans(oracle)
    assert (r["event_type"] == "impression").sum() == (o["event_type"] == "impression").sum()
    for kind in ("click", "purchase"):
        assert (o["event_type"] == kind).sum() > 1.3 * (r["event_type"] == kind).sum(), kind
    ev = o[o["event_type"] == "impression"].head(2000)
    rel = pd.Series([mp.true_relevance(q, [p])[0] for q, p in zip(ev["query"], ev["product_id"])])
    by_pos = rel.groupby(ev["position"].to_numpy()).mean()
    assert by_pos[1] > by_pos[5] > by_pos[10]  # ranked by the hidden relevance


def test_bulk_events_pass_the_feedback_contract_and_validation(mp, bulk_events):
    from shoprank.validation import ValidationOptions, validate_frame

    ev = bulk_events
    assert list(ev.columns) == FEEDBACK.names
    assert {c: str(t) for c, t in ev.dtypes.items()} == FEEDBACK.dtypes
    assert ev["event_id"].is_unique and ev["event_id"].str.fullmatch(r"[0-9a-f]{32}").all()
    assert set(ev["event_type"]) == set(EVENT_TYPES)
    assert ev["position"].between(1, 10).all() and (ev["model_version"] == "7").all()
    lo = pd.Timestamp(DAY, tz="UTC")
    assert ((ev["ts"] >= lo) & (ev["ts"] < lo + pd.Timedelta(days=1))).all()
    assert ev["ts"].is_monotonic_increasing
    for col in FEEDBACK.names[:-1]:
        assert ev[col].notna().all(), col
    assert ev["product_id"].isin(mp.catalog_for_day(DAY)["product_id"]).all()  # cold start respected
    raw = mp.users["user_id"].astype(str)
    human_ids = set(humans(ev)["user_id"])
    assert human_ids <= {pseudonymise(u, KEY) for u in raw} and len(human_ids) > 500
    assert ev.groupby("session_id")["user_id"].nunique().eq(1).all()
    options = ValidationOptions(now=dt.datetime(2026, 11, 4, tzinfo=dt.timezone.utc))
    outcome = validate_frame(ev, "feedback", DAY, options, catalog_product_ids=mp.catalog_for_day(DAY)["product_id"],
                             previous_row_count=None)
    assert outcome.success, outcome.message()


class _FakeStorage(Storage):
    """A Storage whose S3 primitives are recorded in order (no server): the partition protocol
    (write_partition_parts) and the Parquet serialisation (write_parquet) are the real ones."""

    def __init__(self) -> None:  # no settings, no S3 client
        self.calls: list[tuple[str, str]] = []
        self.objects: dict[str, bytes] = {}
        self.partitions: dict[tuple[str, str, str], pd.DataFrame] = {}

    def delete_prefix(self, prefix: str) -> int:
        self.calls.append(("delete", prefix))
        return 0

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> str:
        self.calls.append(("put", key))
        self.objects[key] = data
        return key

    def upload_file(self, path: str, key: str) -> str:
        return self.put_bytes(key, Path(path).read_bytes())

    def write_partition(self, df, zone, dataset, day):
        self.partitions[(zone, dataset, str(day))] = df
        return []


def test_write_day_bulk_writes_parts_then_success(mp, tmp_path):
    import io

    import pyarrow.parquet as pq

    from shoprank.data.bulk_simulator import simulate_day_bulk, write_day_bulk

    kw = dict(n_sessions=3000, seed=3, hmac_key=KEY, bot_fraction=0.01)
    out = write_day_bulk(tmp_path / "a", mp, DAY, rows_per_part=20_000, **kw)
    folder = tmp_path / "a" / f"raw/feedback/dt={DAY.isoformat()}"
    names = sorted((p.name for p in folder.iterdir()), key=lambda n: (n == "_SUCCESS", n))
    assert out.parts >= 3 and names == [f"part-{i:05d}.parquet" for i in range(out.parts)] + ["_SUCCESS"]
    assert out.keys == [f"raw/feedback/dt={DAY.isoformat()}/{n}" for n in names[:-1]]
    parts = [pd.read_parquet(folder / n) for n in names[:-1]]
    assert [len(p) for p in parts[:-1]] == [20_000] * (out.parts - 1) and 0 < len(parts[-1]) <= 20_000
    for p in parts:
        assert {c: str(t) for c, t in p.dtypes.items()} == FEEDBACK.dtypes
    day = pd.concat(parts, ignore_index=True)
    assert len(day) == out.events and not day["event_id"].duplicated().any()
    assert day["ts"].is_monotonic_increasing  # time order holds across parts
    check_event_structure(day)
    # the same Parquet schema (pandas metadata included) as write_day -> Storage.write_parquet
    buf = io.BytesIO()
    FEEDBACK.conform(day.head(5)).to_parquet(buf, index=False)
    assert pq.read_schema(folder / names[0]).equals(pq.read_schema(io.BytesIO(buf.getvalue())), check_metadata=True)
    # where the parts are cut changes nothing else; same seed -> same bytes; another seed -> other events
    whole = simulate_day_bulk(mp, DAY, **kw)
    pd.testing.assert_frame_equal(day, whole.reset_index(drop=True), check_dtype=True)
    again = write_day_bulk(tmp_path / "b", mp, DAY, rows_per_part=20_000, **kw)
    assert again.as_dict()["by_type"] == out.as_dict()["by_type"]
    for n in names:
        assert (folder / n).read_bytes() == (tmp_path / "b" / f"raw/feedback/dt={DAY.isoformat()}" / n).read_bytes()
    other = simulate_day_bulk(mp, DAY, **{**kw, "seed": 4})
    assert not other["event_id"].isin(day["event_id"]).any()
    # a Storage: old parts deleted first, _SUCCESS last, the same bytes
    st = _FakeStorage()
    keys = write_day_bulk(st, mp, DAY, rows_per_part=20_000, **kw).keys
    prefix = f"raw/feedback/dt={DAY.isoformat()}/"
    assert st.calls == [("delete", prefix)] + [("put", k) for k in keys] + [("put", prefix + "_SUCCESS")]
    assert st.objects[keys[1]] == (folder / names[1]).read_bytes()


def test_bulk_n_events_is_about_the_target(mp):
    from shoprank.data.bulk_simulator import simulate_day_bulk

    ev = simulate_day_bulk(mp, DAY, n_events=40_000, seed=2, hmac_key=KEY, bot_fraction=0.002)
    assert abs(len(ev) - 40_000) < 0.05 * 40_000


def test_bulk_refuses_what_it_cannot_do(mp, tmp_path):
    from shoprank.config import ConfigError
    from shoprank.data.bulk_simulator import simulate_day_bulk, write_day_bulk

    with pytest.raises(ValueError, match="random or oracle"):
        simulate_day_bulk(mp, DAY, n_sessions=10, hmac_key=KEY, ranker="bm25")
    with pytest.raises(ValueError, match="exactly one"):
        simulate_day_bulk(mp, DAY, n_sessions=10, n_events=100, hmac_key=KEY)
    for key in (None, ""):
        with pytest.raises(ConfigError, match="SHOPRANK_USER_HASH_KEY"):
            simulate_day_bulk(mp, DAY, n_sessions=10, hmac_key=key)
    with pytest.raises(TypeError, match="Storage or a local directory"):
        write_day_bulk(object(), mp, DAY, n_sessions=10, hmac_key=KEY)


def test_simulate_command_routes_events_to_the_bulk_path(mp, tmp_path, monkeypatch, capsys):
    import io

    import shoprank.cli as cli
    import shoprank.simulation as simulation
    from shoprank.config import Settings

    a = cli.build_parser().parse_args(["simulate", "--date", "2026-11-02", "--events", "10M", "--ranker", "random"])
    assert (a.events, a.sessions) == (10_000_000, 80)
    assert cli.build_parser().parse_args(["simulate", "--date", "2026-11-02"]).events is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["simulate", "--date", "2026-11-02", "--events", "-5"])
    # the default ranker (champion) is not vectorised: a clear refusal, nothing simulated
    assert cli.main(["simulate", "--date", "2026-11-02", "--events", "1000"]) == 2
    assert "--ranker random or --ranker oracle" in capsys.readouterr().err

    monkeypatch.delenv("SHOPRANK_USER_HASH_KEY", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / "stack.env").write_text("SHOPRANK_USER_HASH_KEY=stack-env-key\n")
    settings = Settings.from_env({"SHOPRANK_HOME": str(home), "SHOPRANK_ENV_FILE": str(tmp_path / "x")})
    st = _FakeStorage()
    monkeypatch.setattr(simulation, "Storage", lambda _settings: st)
    monkeypatch.setattr(simulation, "load_marketplace", lambda _storage: mp)
    out = simulation.simulate_and_write(settings, DAY, n_events=20_000, ranker="oracle", seed=1)
    assert out["mode"] == "bulk" and out["parts"] == 1 and abs(out["events"] - 20_000) < 2_000
    assert ("raw", "catalog", DAY.isoformat()) in st.partitions
    part = pd.read_parquet(io.BytesIO(st.objects[f"raw/feedback/dt={DAY.isoformat()}/part-00000.parquet"]))
    assert len(part) == out["events"]
    assert set(part["user_id"]) <= {pseudonymise(u, "stack-env-key") for u in mp.users["user_id"].astype(str)}
    assert st.calls[-1] == ("put", f"raw/feedback/dt={DAY.isoformat()}/_SUCCESS")
