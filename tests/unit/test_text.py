"""Product text (present fields only, configurable template) and query normalisation."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from shoprank.config import ConfigError, Settings
from shoprank.data.contracts import (
    DEFAULT_PRODUCT_TEXT_TEMPLATE,
    normalize_queries,
    normalize_query,
    parse_text_template,
    product_text,
    render_attributes,
)


def _catalog() -> pd.DataFrame:
    return pd.DataFrame({
        "product_id": ["a", "b", "c", "d", "e"],
        "title": ["Red shoes", " Lamp ", "Mug", "Chair", "Sofa"],
        "brand": ["Acme", None, "", "UNKNOWN", "Bolt"],
        "category": ["Fashion > Shoes > Sneakers", "unknown", "Home > Kitchen", None, "Home"],
        "description": ["comfy", "  ", "NaN", "null", "None"],
        "attributes": ['{"color": "red", "size": 42, "material": ""}', None, "not json", "[1, 2]",
                       '{"seats": 3, "legs": null}'],
        "price": [59.9, 0.0, np.nan, 12.0, 499.0],
    })


def test_default_template_keeps_only_present_fields():
    text = product_text(_catalog()).tolist()
    assert text == ["Red shoes | Acme | Fashion > Shoes > Sneakers | comfy", "Lamp", "Mug | Home > Kitchen",
                    "Chair", "Sofa | Bolt | Home"]
    assert not any("|  |" in t or t.endswith("| ") or t.endswith(" |") for t in text)


def test_placeholders_vanish_any_case():
    df = pd.DataFrame({"title": ["T"] * 6, "brand": ["unknown", "Unknown", "NAN", "none", "NULL", " null "]})
    assert product_text(df).tolist() == ["T"] * 6


def test_template_with_category_leaf_attributes_price():
    tpl = "{title} | {brand} | {category_leaf} | {attributes} | price {price}"
    text = product_text(_catalog(), tpl).tolist()
    assert text == ["Red shoes | Acme | Sneakers | color: red, size: 42 | price 59.90",
                    "Lamp",  # category 'unknown', no attributes, price 0 (unknown)
                    "Mug | Kitchen",  # invalid JSON -> no attributes; NaN price
                    "Chair | price 12.00",  # a JSON list is not attributes
                    "Sofa | Bolt | Home | seats: 3 | price 499.00"]


def test_template_prefix_suffix_and_missing_columns():
    df = pd.DataFrame({"title": ["Mug", "Cup"], "brand": [None, "Acme"]})  # no category/description columns
    assert product_text(df).tolist() == ["Mug", "Cup | Acme"]
    assert product_text(df, "Product: {title}, by {brand}.").tolist() == ["Product: Mug.", "Product: Cup, by Acme."]
    assert product_text(df, DEFAULT_PRODUCT_TEXT_TEMPLATE).tolist() == product_text(df).tolist()


def test_text_is_capped_and_keeps_index():
    df = pd.DataFrame({"title": ["x" * 3000, "y"], "description": ["d", "e"]}, index=[10, 20])
    out = product_text(df)
    assert len(out.iloc[0]) == 2000 and out.iloc[1] == "y | e" and list(out.index) == [10, 20]


def test_parse_template_rejects_unknown_fields():
    assert parse_text_template("<{title}: {brand}>") == ("<", [("", "title"), (": ", "brand")], ">")
    with pytest.raises(ValueError, match=r"unknown field \{colour\}"):
        parse_text_template("{title} {colour}")
    with pytest.raises(ValueError, match="names no field"):
        parse_text_template("just text")
    with pytest.raises(ValueError, match="format spec"):
        parse_text_template("{price:.1f}")


def test_render_attributes():
    assert render_attributes(json.dumps({"color": "red", "tags": ["a", "b"], "n": None, " ": "x"})) == \
        'color: red, tags: ["a", "b"]'
    assert render_attributes("{}") is None and render_attributes(None) is None and render_attributes("3") is None


def test_settings_product_text_template(tmp_path):
    env = {"SHOPRANK_HOME": str(tmp_path), "SHOPRANK_ENV_FILE": str(tmp_path / "none")}
    assert Settings.from_env(env).product_text_template == DEFAULT_PRODUCT_TEXT_TEMPLATE
    s = Settings.from_env({**env, "SHOPRANK_PRODUCT_TEXT_TEMPLATE": "{title} | {category_leaf}"})
    assert s.product_text_template == "{title} | {category_leaf}"
    assert s.as_env()["SHOPRANK_PRODUCT_TEXT_TEMPLATE"] == "{title} | {category_leaf}"
    with pytest.raises(ConfigError, match=r"SHOPRANK_PRODUCT_TEXT_TEMPLATE='\{title\} \{colour\}'.*unknown field \{colour\}"):
        Settings.from_env({**env, "SHOPRANK_PRODUCT_TEXT_TEMPLATE": "{title} {colour}"})


# ---- queries -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("  Red  SHOES\u00a0", "red shoes"),
    ("ＲＥＤ　Ｓｈｏｅｓ　４２", "red shoes 42"),  # full-width letters, digits and ideographic space folded
    ("usb\tcable\n2m", "usb cable 2m"),
    ("ﬁne café", "fine café"),  # ligature folded, accents kept
    ("Cafe\u0301", "caf\u00e9"),  # decomposed e + combining accent composed (NFKC)
    ("running shoes", "running shoes"),  # no stemming
    ("", ""),
    (None, ""),
])
def test_normalize_query_examples(raw, expected):
    assert normalize_query(raw) == expected


def test_normalize_query_is_idempotent():
    samples = ["  Red  SHOES\u00a0", "ＲＥＤ　Ｓｈｏｅｓ", "İstanbul ΣΟΦΙΑ", "ǅemal", "Straße", "ﬃ ⅷ ㎏",
               "a\u2028b\u3000c",
               "x\u0130\u0307y", "\u1e9e", "ｶﾞｷﾞ"]
    samples += [chr(c) for c in range(0x80, 0x3000)]  # a broad slice of code points
    for q in samples:
        once = normalize_query(q)
        assert normalize_query(once) == once, repr(q)


def test_normalize_queries_vectorised_matches_scalar():
    s = pd.Series(["  Red  SHOES", None, "ＲＥＤ shoes", "  Red  SHOES", "lamp"], index=[5, 6, 7, 8, 9])
    out = normalize_queries(s)
    assert list(out.index) == [5, 6, 7, 8, 9] and pd.isna(out.loc[6])
    assert out.drop(6).tolist() == ["red shoes", "red shoes", "red shoes", "lamp"]
    assert normalize_queries(out).equals(out)


def test_training_rows_use_normalised_queries(caplog):
    from shoprank.labels import to_training_rows

    catalog = pd.DataFrame({"product_id": ["a", "b"], "title": ["Red shoes", "Lamp"], "brand": [None, "Acme"],
                            "category": ["Fashion > Shoes", "Home"], "description": [None, None]})
    pairs = pd.DataFrame({"query": ["Red  Shoes", "red shoes", "LAMP"], "product_id": ["a", "a", "b"],
                          "grade": [3, 1, 2], "weight": [0.9, 0.2, 0.5], "impressions": [50, 3, 10]})
    queries = pd.DataFrame({"query": ["red shoes", "RED SHOES ", "lamp"], "frequency": [60, 50, 1],
                            "category": [None, "Sports > Running", None]})
    with caplog.at_level(logging.INFO, logger="shoprank.labels"):
        rows = to_training_rows(pairs, catalog, queries, text_template="{title} | {brand} | {category_leaf}")
    assert rows[["query", "product_id", "grade"]].values.tolist() == [["lamp", "b", 2], ["red shoes", "a", 3]]
    assert rows.set_index("query").loc["red shoes", "text"] == "Red shoes | Shoes"
    assert rows.set_index("query").loc["lamp", "text"] == "Lamp | Acme | Home"
    assert rows.set_index("query").loc["red shoes", "category"] == "Sports"  # the variant's category
    assert rows.set_index("query").loc["red shoes", "query_freq_bucket"] == "head"
    assert "1 derived pairs repeat a (normalised query, product) pair" in caplog.text


def test_serving_normalises_the_query_before_scoring_and_caching(tmp_path):
    from fastapi.testclient import TestClient

    from shoprank.serving.app import ServeConfig, create_app
    from shoprank.serving.auth import ServeAuth

    class Recording:
        version, backend, max_length = "1", "fake", 64

        def __init__(self):
            self.queries: list[str] = []

        def score(self, queries, texts):
            self.queries += list(queries)
            return np.arange(len(texts), dtype=np.float32)

    settings = Settings.from_env({"SHOPRANK_HOME": str(tmp_path / "home"), "SHOPRANK_ENV_FILE": str(tmp_path / "x")})
    scorer = Recording()
    cands = [{"product_id": "a", "text": "red shoes"}, {"product_id": "b", "text": "mug"}]
    app = create_app(settings, scorer=scorer, config=ServeConfig(), auth=ServeAuth(events_token="unit-test-token"))
    with TestClient(app) as client:  # /rank is open: no SHOPRANK_SERVE_RANK_TOKEN here
        first = client.post("/rank", json={"query": "  Red  SHOES\u00a0", "candidates": cands}).json()
        second = client.post("/rank", json={"query": "ｒｅｄ shoes", "candidates": cands}).json()
        blank = client.post("/rank", json={"query": " \u3000 ", "candidates": cands})
    assert scorer.queries == ["red shoes", "red shoes"]  # scored once, in normalised form
    assert (first["cached"], second["cached"]) == (False, True)  # one cache entry for both spellings
    assert blank.status_code == 422
