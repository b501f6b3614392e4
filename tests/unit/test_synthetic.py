"""Synthetic marketplace: determinism, contracts, judgments, hidden relevance, cold start."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest

from shoprank.data.contracts import CATALOG, GRADE_MAX, GRADE_MIN, JUDGMENTS, QUERIES, product_text
from shoprank.data.synthetic import (
    ACCESSORY_LEAVES,
    BRANDS,
    GRADE_THRESHOLDS,
    LEAF_FITS,
    LEAVES,
    N_CORE_LEAVES,
    PROFILES,
    generate_marketplace,
    relevance_to_grade,
)

START = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def mp():
    return generate_marketplace()  # default size: 2000 products, 300 queries


def _dtypes(df: pd.DataFrame) -> dict[str, str]:
    return {c: str(t) for c, t in df.dtypes.items()}


def test_same_seed_same_frames_and_different_seed_differs():
    a = generate_marketplace(n_products=400, n_queries=40, seed=5, n_users=50)
    b = generate_marketplace(n_products=400, n_queries=40, seed=5, n_users=50)
    c = generate_marketplace(n_products=400, n_queries=40, seed=6, n_users=50)
    for name in ("catalog", "queries", "judgments", "users"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    q = a.queries["query"].iat[0]
    np.testing.assert_array_equal(a.true_relevance(q, a.catalog), b.true_relevance(q, b.catalog))
    assert not a.catalog["title"].equals(c.catalog["title"])
    assert not a.queries["query"].equals(c.queries["query"])
    assert not a.judgments.equals(c.judgments)


def assert_conforms(market) -> None:
    """Every frame has its contract's columns, dtypes, non-null columns and unique key."""
    for df, contract in ((market.catalog, CATALOG), (market.judgments, JUDGMENTS), (market.queries, QUERIES)):
        assert list(df.columns) == contract.names
        assert _dtypes(df) == contract.dtypes
        for col in contract.columns:
            if not col.nullable:
                assert df[col.name].notna().all(), col.name
        assert not df.duplicated(list(contract.key)).any(), contract.dataset


def test_frames_conform_to_contracts(mp):
    assert_conforms(mp)


def test_catalog_content(mp):
    cat = mp.catalog
    assert (cat["price"] > 0).all()
    paths = cat["category"].unique()
    assert len(paths) >= 30
    assert all(len(p.split(" > ")) == 3 for p in paths)
    # attributes are JSON objects with the same keys within a leaf
    # (a list comprehension: on pandas 3, Series.map(json.loads) infers an Arrow struct of all keys)
    attrs = [json.loads(s) for s in cat["attributes"]]
    keys = pd.Series([",".join(a) for a in attrs])
    assert keys.groupby(cat["category"]).nunique().eq(1).all()
    # prices follow the category: laptops cost more than phone cases
    med = cat.groupby("category")["price"].median()
    assert med["Electronics > Computers > Laptops"] > 10 * med["Electronics > Phones > Phone Cases"]
    # titles vary: not one template
    assert cat["title"].nunique() > 0.95 * len(cat)
    assert cat["title"].str.contains(" by ").mean() > 0.1
    # attribute values are mentioned in the product's text most of the time
    text = product_text(cat).str.lower()
    hits = [all(v.lower() in t for v in a.values()) for a, t in zip(attrs, text)]
    assert 0.4 < np.mean(hits) < 1.0


def test_judgments_grades_and_pool(mp):
    j = mp.judgments
    assert j["grade"].between(GRADE_MIN, GRADE_MAX).all()
    assert set(j["grade"].unique()) == {0, 1, 2, 3}
    assert (j["source"] == "human").all()
    assert set(j["query"]) == set(mp.queries["query"])
    on_start = set(mp.catalog_for_day(START)["product_id"])
    assert set(j["product_id"]) <= on_start  # every judged product exists in the catalogue
    per_query = j.groupby("query").size()
    assert per_query.between(15, 40).all() and 25 <= per_query.mean() <= 35
    assert (j.groupby("query")["grade"].max() >= 2).all()  # every query has positives
    assert (j.groupby("query")["grade"].min() <= 1).all()  # and negatives


def test_grades_come_from_hidden_relevance(mp):
    for q, g in list(mp.judgments.groupby("query"))[:50]:
        rel = mp.true_relevance(q, g)
        assert ((rel >= 0) & (rel <= 1)).all()
        np.testing.assert_array_equal(relevance_to_grade(rel), g["grade"].to_numpy())
    assert list(relevance_to_grade(np.array([0.0, GRADE_THRESHOLDS[0], GRADE_THRESHOLDS[1], 1.0]))) == [0, 1, 2, 3]


def test_true_relevance_is_fixed_and_order_independent(mp):
    q = mp.queries.iloc[3]
    prods = mp.catalog.iloc[:200]
    r1 = mp.true_relevance(q, prods)
    perm = np.random.default_rng(0).permutation(200)
    r2 = mp.true_relevance(q["query"], prods["product_id"].to_numpy()[perm])
    np.testing.assert_allclose(r1[perm], r2)
    with pytest.raises(KeyError):
        mp.true_relevance("no such query", prods)
    with pytest.raises(KeyError):
        mp.true_relevance(q, ["P-missing"])


def test_relevance_is_learnable_from_text(mp):
    """Exact matches share more query words with their text than irrelevant products do."""
    text = dict(zip(mp.catalog["product_id"], product_text(mp.catalog).str.lower()))
    traits = mp.truth.query_traits(mp.queries).set_index("query")
    clean = traits.index[~traits["has_typo"] & ~traits["has_synonym"]]
    j = mp.judgments[mp.judgments["query"].isin(clean)].copy()
    j["overlap"] = [np.mean([w in text[p] for w in q.split()]) for q, p in zip(j["query"], j["product_id"])]
    by_grade = j.groupby("grade")["overlap"].mean()
    assert by_grade[3] > by_grade[2] > by_grade[0]
    assert by_grade[3] - by_grade[0] > 0.3


def test_query_synonyms_are_a_lexical_gap(mp):
    """Leaf synonyms (couch, sneakers) never appear in product text: BM25 cannot match them."""
    words = re.findall(r"[\w'-]+", " ".join(product_text(mp.catalog).str.lower()))
    vocab = set(words)
    phrases = vocab | {" ".join(words[i : i + n]) for n in (2, 3) for i in range(len(words) - n + 1)}
    synonyms = [syn for leaf in LEAVES for syn in leaf.synonyms]
    assert not [syn for syn in synonyms if syn in phrases]
    # most have a word no product uses; a few ("desk chair") overlap other leaves on purpose
    assert np.mean([any(w not in vocab for w in syn.split()) for syn in synonyms]) > 0.9
    traits = mp.truth.query_traits(mp.queries)
    assert 0.1 < traits["has_synonym"].mean() < 0.6
    assert 0.03 < traits["has_typo"].mean() < 0.25


def test_queries_have_zipf_frequencies_and_target_categories(mp):
    qs = mp.queries
    leaf_paths = {leaf.path for leaf in LEAVES}
    assert set(qs["category"]) <= leaf_paths
    f = qs["frequency"].sort_values(ascending=False).to_numpy()
    assert (f >= 1).all()
    assert f[0] >= 10 * np.median(f)  # a head ...
    assert f[: len(f) // 10].sum() > 0.3 * f.sum()  # ... that carries a large share of searches
    # exact and substitute judgments sit in the query's target category
    j = mp.judgments.merge(mp.catalog[["product_id", "category"]], on="product_id")
    j = j.merge(qs[["query", "category"]], on="query", suffixes=("", "_target"))
    on_target = j["category"] == j["category_target"]
    assert on_target[j["grade"] == 3].all()
    assert on_target[j["grade"] == 2].mean() > 0.95  # a sibling-leaf product may get lucky noise


def test_users(mp):
    u = mp.users
    assert u["user_id"].is_unique and len(u) == 1000
    assert u["price_sensitivity"].between(0, 1).all()
    prefs = pd.Series([json.loads(s) for s in u["preferred_brands"]])
    assert prefs.map(len).between(1, 3).all()
    assert set().union(*prefs.map(set)) <= set(BRANDS)


def test_cold_start_catalog_grows(mp):
    sizes = [len(mp.catalog_for_day(START + dt.timedelta(days=d))) for d in (-1, 0, 1, 5, 14)]
    assert sizes[0] == sizes[1]  # nothing new is listed on or just before the start day
    assert sizes[1] < sizes[2] < sizes[3] < sizes[4] == len(mp.catalog)
    day = START + dt.timedelta(days=5)
    cat = mp.catalog_for_day(day)
    assert (cat["created_at"] < pd.Timestamp(day + dt.timedelta(days=1), tz="UTC")).all()
    assert 0.1 < 1 - sizes[1] / len(mp.catalog) < 0.3  # ~20% of products are new


def test_write_to_storage(mp, recording_storage):
    st = recording_storage
    day = START + dt.timedelta(days=3)
    written = mp.write_to_storage(st, day)
    assert set(written) == {"catalog", "judgments", "queries"}
    d = day.isoformat()
    cat = st.partitions[("raw", "catalog", d)]
    jud = st.partitions[("raw", "judgments", d)]
    qs = st.partitions[("raw", "queries", d)]
    assert _dtypes(cat) == CATALOG.dtypes and _dtypes(jud) == JUDGMENTS.dtypes and _dtypes(qs) == QUERIES.dtypes
    assert len(cat) == len(mp.catalog_for_day(day))
    assert set(jud["product_id"]) <= set(cat["product_id"])
    assert len(qs) == len(mp.queries)


def test_scales_and_stays_consistent():
    big = generate_marketplace(n_products=20_000, n_queries=50, seed=3, n_users=20)
    assert len(big.catalog) == 20_000 and big.catalog["product_id"].is_unique
    assert set(big.judgments["product_id"]) <= set(big.catalog["product_id"])
    assert len(generate_marketplace(n_products=1, n_queries=1, n_users=1, new_product_fraction=0).catalog) == 1


# ---------------------------------------------------------------------------------------
# Profiles: "default" is frozen, "realistic" looks like ESCI / WANDS judgment lists
# ---------------------------------------------------------------------------------------
def _digest(mp) -> str:
    """sha256 of the four frames (dtypes and values) and the judged rows.  Floats are written
    with 9 significant digits so a last-bit difference of a platform's exp/log cannot flip it."""
    h = hashlib.sha256()
    for name in ("catalog", "queries", "judgments", "users"):
        df = getattr(mp, name)
        h.update(f"{name}:{_dtypes(df)}".encode())
        for col in df.columns:
            s = df[col]
            vals = [f"{x:.9g}" for x in s] if pd.api.types.is_float_dtype(s) else [str(x) for x in s.tolist()]
            h.update(("\x1f".join(vals) + "\x1e").encode())
    for judged in mp.truth.judged:
        h.update(np.asarray(judged, dtype=np.int64).tobytes())
    return h.hexdigest()


# Computed with the generator as it was before profiles existed (commit 824e46c): the default
# profile must keep producing exactly these frames (the demo, the tests and every stored
# marketplace.json depend on it).
DEFAULT_DIGESTS = [
    (dict(n_products=400, n_queries=40, seed=5, n_users=50),
     "e9b939be194d0d3e418ab13f35e2ccd7547e74b8480467c3139cf15232af933a", {0: 385, 1: 192, 2: 232, 3: 162}),
    (dict(n_products=1500, n_queries=200, seed=42, synonym_rate=0.8, typo_rate=0.3),  # the demo's shop
     "ed5b3f2002409a959ce8bcd1c9ef106c210799b3c17f552318fd899e3b931822", {0: 1876, 1: 991, 2: 1474, 3: 1577}),
]


@pytest.mark.parametrize(("kwargs", "digest", "grades"), DEFAULT_DIGESTS)
def test_default_profile_is_unchanged(kwargs, digest, grades):
    mp = generate_marketplace(**kwargs)
    assert mp.summary()["grades"] == grades  # a readable first symptom
    assert _digest(mp) == digest
    assert _digest(generate_marketplace(**kwargs, profile="default")) == digest
    assert mp.truth.profile == "default" and mp.truth.q_model is None and mp.truth.fits is None
    # the default catalogue has no accessory-only leaves
    assert set(mp.catalog["category"]) <= {leaf.path for leaf in LEAVES[:N_CORE_LEAVES]}


def test_unknown_profile_is_refused():
    with pytest.raises(ValueError, match="profile"):
        generate_marketplace(n_products=50, n_queries=5, profile="esci")


@pytest.fixture(scope="module")
def real():
    return generate_marketplace(n_products=1500, n_queries=600, seed=42, profile="realistic")


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def test_realistic_is_deterministic_and_differs_from_default():
    a = generate_marketplace(n_products=400, n_queries=60, seed=5, n_users=50, profile="realistic")
    b = generate_marketplace(n_products=400, n_queries=60, seed=5, n_users=50, profile="realistic")
    c = generate_marketplace(n_products=400, n_queries=60, seed=6, n_users=50, profile="realistic")
    d = generate_marketplace(n_products=400, n_queries=60, seed=5, n_users=50)
    assert _digest(a) == _digest(b)
    np.testing.assert_array_equal(a.truth.model, b.truth.model)
    np.testing.assert_array_equal(a.truth.fits, b.truth.fits)
    assert _digest(a) != _digest(c)
    assert _digest(a) != _digest(d)
    pd.testing.assert_frame_equal(a.users, d.users)  # users do not depend on the profile


def test_realistic_frames_conform_and_grades_follow_hidden_relevance(real):
    assert_conforms(real)
    assert set(real.judgments["product_id"]) <= set(real.catalog_for_day(START)["product_id"])
    for q, g in real.judgments.groupby("query"):
        np.testing.assert_array_equal(relevance_to_grade(real.true_relevance(q, g)), g["grade"].to_numpy())


def test_realistic_judgments_are_mostly_relevant_and_short(real, mp):
    j = real.judgments
    share = j["grade"].value_counts(normalize=True)
    assert set(share.index) == {0, 1, 2, 3}
    assert 0.08 <= share[0] <= 0.22  # ESCI ~10% irrelevant; the default profile has ~32%
    assert 0.75 <= share[2] + share[3] <= 0.9
    assert share[0] < 0.6 * (mp.judgments["grade"] == 0).mean()
    per_query = j.groupby("query").size()
    lo, hi = PROFILES["realistic"].judgments_per_query
    assert (lo, hi) == (8, 20)
    assert per_query.between(lo, hi).all() and 11 <= per_query.mean() <= 17
    assert set(per_query.index) == set(real.queries["query"])
    assert (j.groupby("query")["grade"].max() >= 2).all()  # every query has a positive
    assert 0.3 < (j.groupby("query")["grade"].min() == 0).mean() < 0.9  # many, not all, show an off-topic one


def test_realistic_queries_have_brands_model_codes_typos_and_few_synonyms(real):
    traits = real.truth.query_traits(real.queries)
    assert 0.05 <= traits["model_code"].notna().mean() <= 0.2
    assert 0.3 <= traits["brand"].notna().mean() <= 0.7
    assert 0.03 <= traits["has_typo"].mean() <= 0.15
    assert 0.05 <= traits["has_synonym"].mean() <= 0.3  # the demo's shoppers: 0.8
    assert 0.05 <= traits["accessory_query"].mean() <= 0.25
    titles = real.catalog["title"].to_numpy(dtype=object)
    codes = real.truth.model_codes[real.truth.model]
    accessory = LEAF_FITS[real.truth.leaf] >= 0
    # every product's title prints its model code, except accessories (they print the code of what they fit)
    assert all(c in t for c, t in zip(codes[~accessory], titles[~accessory]))
    model_q = traits[traits["model_code"].notna()]
    for q, code in zip(model_q["query"], model_q["model_code"]):
        typed = q.replace(" ", "").replace("-", "")
        assert code.lower() in typed  # "kx4521", "aurex kx 4521", "aurex kx-4521 headphones"
    # the model line's variants are exact matches, other products of the leaf are not
    j = real.judgments.merge(model_q[["query", "model_code"]], on="query")
    j["line_code"] = codes[real.product_index(j["product_id"])]
    same_line = j["line_code"] == j["model_code"]
    assert same_line.sum() >= len(model_q)
    assert (j.loc[same_line, "grade"] == 3).mean() > 0.9
    assert (j.loc[~same_line, "grade"] == 3).mean() < 0.2
    # brand queries ask for the brand (of the product an accessory fits): exact matches carry it
    brand_q = traits[traits["brand"].notna() & traits["model_code"].isna()].set_index("query")["brand"]
    exact = real.judgments[real.judgments["query"].isin(brand_q.index) & (real.judgments["grade"] == 3)]
    rows = real.product_index(exact["product_id"])
    match = np.asarray(BRANDS, dtype=object)[real.truth.match_brand[rows]]
    assert (match == brand_q.reindex(exact["query"]).to_numpy()).mean() > 0.95


def test_realistic_catalogue_has_lexical_distractors(real):
    t = real.truth
    cat = real.catalog
    accessory_paths = {leaf.path for leaf in ACCESSORY_LEAVES}
    share = cat["category"].isin(accessory_paths).mean()
    assert 0.1 <= share <= 0.3
    # accessories name the product they fit: its brand, its type and mostly its model code
    acc = np.nonzero(t.fits >= 0)[0]
    assert len(acc) > 0.1 * len(cat)
    target = t.fits[acc]
    titles = cat["title"].str.lower().to_numpy(dtype=object)[acc]
    brands = np.asarray(BRANDS, dtype=object)[t.brand[target]]
    nouns = [LEAVES[li].noun for li in t.leaf[target]]
    tcodes = t.model_codes[t.model[target]]
    assert all(b.lower() in s and n in s for s, b, n in zip(titles, brands, nouns))
    assert np.mean([c.lower() in s for s, c in zip(titles, tcodes)]) > 0.5
    assert (t.leaf[target] == LEAF_FITS[t.leaf[acc]]).all()
    # judged off-topic products that share query words: accessories of the query's product and
    # keyword-stuffed listings, of another leaf and graded 0
    j = real.judgments.merge(real.queries[["query", "category"]], on="query")
    j = j.merge(cat[["product_id", "title", "description", "category"]], on="product_id", suffixes=("_q", ""))
    text = (j["title"] + " " + j["description"].fillna("")).tolist()
    shared = np.array([len(_tokens(q) & _tokens(tx)) for q, tx in zip(j["query"], text)])
    distractor = (j["grade"] == 0) & (j["category"] != j["category_q"]) & (shared >= 2)
    assert distractor.sum() > 0.03 * len(j)
    assert j.loc[distractor, "query"].nunique() > 0.2 * real.queries["query"].nunique()
    assert j.loc[distractor, "category"].isin(accessory_paths).mean() > 0.5
    # grade 0 is mostly lexical: the engine retrieved them for the query's words
    zero = j["grade"] == 0
    assert (shared[zero.to_numpy()] >= 1).mean() > 0.8


def test_realistic_synonyms_stay_a_lexical_gap(real):
    words = re.findall(r"[\w'-]+", " ".join(product_text(real.catalog).str.lower()))
    phrases = set(words) | {" ".join(words[i : i + n]) for n in (2, 3) for i in range(len(words) - n + 1)}
    assert not [syn for leaf in LEAVES for syn in leaf.synonyms if syn in phrases]


def test_realistic_marketplace_drives_the_simulator(real):
    from shoprank.data.simulator import oracle_rank_fn, random_rank_fn, simulate_day

    day = START + dt.timedelta(days=2)
    listed = set(real.catalog_for_day(day)["product_id"])
    ctr = {}
    for name, fn in (("oracle", oracle_rank_fn(real)), ("random", random_rank_fn)):
        ev = simulate_day(real, day, fn, n_sessions=120, seed=3, hmac_key="test-key")
        assert set(ev["product_id"]) <= listed
        counts = ev["event_type"].value_counts()
        ctr[name] = counts.get("click", 0) / counts["impression"]
    assert ctr["oracle"] > ctr["random"] > 0


class _BytesStorage:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.partitions: dict[tuple[str, str, str], pd.DataFrame] = {}
        self.bucket = "test"

    def ensure_bucket(self) -> None:
        pass

    def put_bytes(self, key, data, content_type=None):
        self.objects[key] = data

    def get_bytes(self, key):
        return self.objects[key]

    def exists(self, key):
        return key in self.objects

    def uri(self, key):
        return f"s3://test/{key}"

    def write_partition(self, df, zone, dataset, day):
        day = day.isoformat() if hasattr(day, "isoformat") else str(day)
        self.partitions[(zone, dataset, day)] = df.copy()
        return [f"{zone}/{dataset}/dt={day}/part-00000.parquet"]


def test_profile_round_trips_through_saved_params():
    from shoprank.simulation import load_marketplace, save_marketplace_params

    st = _BytesStorage()
    kw = dict(n_products=300, n_queries=30, seed=9, start=START)
    save_marketplace_params(st, n_products=300, n_queries=30, seed=9, start=START.isoformat(), profile="realistic",
                            synonym_rate=0.12, typo_rate=0.08, inflection_rate=0.1)
    assert _digest(load_marketplace(st)) == _digest(generate_marketplace(**kw, profile="realistic"))
    # parameters saved before profiles existed load the default profile, as they did
    save_marketplace_params(st, n_products=300, n_queries=30, seed=9, start=START.isoformat())
    assert _digest(load_marketplace(st)) == _digest(generate_marketplace(**kw))


def test_cli_generate_profile(monkeypatch, capsys):
    import shoprank.cli as cli
    import shoprank.storage
    from shoprank.simulation import PARAMS_KEY, load_marketplace

    st = _BytesStorage()
    monkeypatch.setattr(shoprank.storage, "Storage", lambda settings: st)
    monkeypatch.setattr(cli, "get_settings", lambda: st)
    args = ["generate", "--products", "300", "--queries", "30", "--seed", "9", "--date", START.isoformat()]
    assert cli.main(args + ["--profile", "realistic"]) == 0
    saved = json.loads(st.objects[PARAMS_KEY])
    assert saved["profile"] == "realistic"
    assert (saved["synonym_rate"], saved["typo_rate"]) == (PROFILES["realistic"].synonym_rate,
                                                           PROFILES["realistic"].typo_rate)
    assert "realistic profile" in capsys.readouterr().out
    expected = generate_marketplace(n_products=300, n_queries=30, seed=9, start=START, profile="realistic")
    assert _digest(load_marketplace(st)) == _digest(expected)
    pd.testing.assert_frame_equal(st.partitions[("raw", "judgments", START.isoformat())],
                                  JUDGMENTS.conform(expected.judgments_for_day(START)))
    # the default profile keeps the CLI's previous rates (the demo's shoppers)
    assert cli.main(args) == 0
    saved = json.loads(st.objects[PARAMS_KEY])
    assert (saved["profile"], saved["synonym_rate"], saved["typo_rate"]) == ("default", 0.8, 0.3)
    with pytest.raises(SystemExit):
        cli.main(args + ["--profile", "esci"])
