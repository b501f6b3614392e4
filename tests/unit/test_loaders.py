"""Bring-your-own-data loaders: tiny fixtures in the exact public formats (ESCI, WANDS, Home Depot)."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pandas as pd
import pytest

from shoprank.cli import build_parser
from shoprank.data.contracts import CATALOG, JUDGMENTS, QUERIES
from shoprank.data.loaders import (
    LoadedData,
    LoaderError,
    homedepot_grade,
    load,
    load_esci,
    load_homedepot,
    load_wands,
    wands_features,
    write_loaded,
)

AS_OF = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def _dtypes(df: pd.DataFrame) -> dict[str, str]:
    return {c: str(t) for c, t in df.dtypes.items()}


def _assert_contracts(data: LoadedData) -> None:
    for df, contract in ((data.catalog, CATALOG), (data.judgments, JUDGMENTS), (data.queries, QUERIES)):
        assert list(df.columns) == contract.names
        assert _dtypes(df) == contract.dtypes, contract.dataset
        for col in contract.columns:
            if not col.nullable:
                assert df[col.name].notna().all(), (contract.dataset, col.name)
    assert data.catalog["product_id"].is_unique
    assert not data.judgments.duplicated(["query", "product_id"]).any()
    assert data.judgments["product_id"].isin(data.catalog["product_id"]).all()
    assert data.queries["query"].is_unique
    assert set(data.queries["query"]) == set(data.judgments["query"])
    assert (data.catalog["created_at"] == pd.Timestamp(AS_OF)).all()
    assert (data.catalog["price"] == 0.0).all()
    assert (data.judgments["source"] == "human").all()
    for a in data.catalog["attributes"].dropna():
        assert isinstance(json.loads(a), dict)


def _grades(data: LoadedData) -> dict[tuple[str, str], int]:
    return {(q, p): int(g) for q, p, g in zip(data.judgments["query"], data.judgments["product_id"],
                                               data.judgments["grade"])}


# ---- ESCI ----------------------------------------------------------------------------------

def _esci(tmp_path, examples=None, products=None):
    d = tmp_path / "shopping_queries_dataset"  # the repo nests the files one level down
    d.mkdir()
    ex = examples if examples is not None else pd.DataFrame({
        "example_id": [0, 1, 2, 3, 4, 5, 6, 7, 8],
        "query": ["usb cable", "usb cable", "usb cable", " usb  cable ", "desk lamp", "desk lamp", "desk lamp",
                  "cable usb", "lampe"],
        "query_id": [1, 1, 1, 1, 2, 2, 2, 3, 4],
        "product_id": ["B01", "B02", "B03", "B01", "B04", "B05", "B99", "B01", "B06"],
        "product_locale": ["us"] * 8 + ["es"],
        "esci_label": ["E", "S", "C", "S", "I", "E", "E", "E", "E"],
        "small_version": [1, 1, 1, 1, 1, 1, 1, 0, 1],
        "large_version": [1] * 9,
        "split": ["train"] * 9,
    })
    pr = products if products is not None else pd.DataFrame({
        "product_id": ["B01", "B02", "B03", "B04", "B05", "B06", "B01"],
        "product_title": ["USB-C cable 2m", "USB-A cable", "USB charger", "Desk lamp LED", "Lamp",
                          "Lámpara", "USB-C cable (es)"],
        "product_description": ["braided", None, None, "warm light", None, None, None],
        "product_bullet_point": [None, "fast\ncharge", None, None, None, None, None],
        "product_brand": ["Anker", None, "Ugreen", "IKEA", None, None, None],
        "product_color": ["black", None, None, "white", None, None, None],
        "product_locale": ["us", "us", "us", "us", "us", "es", "es"],
    })
    ex.to_parquet(d / "shopping_queries_dataset_examples.parquet", index=False)
    pr.to_parquet(d / "shopping_queries_dataset_products.parquet", index=False)
    return tmp_path


def test_esci_contracts_grades_dedupe_and_missing_products(tmp_path, caplog):
    root = _esci(tmp_path)
    with caplog.at_level(logging.INFO, logger="shoprank.data.loaders"):
        data = load_esci(root, as_of=AS_OF)
    _assert_contracts(data)
    # E=3 S=2 C=1 I=0; " usb  cable " normalised and merged with "usb cable"; small_version 0 and locale es out
    assert _grades(data) == {("usb cable", "B01"): 3, ("usb cable", "B02"): 2, ("usb cable", "B03"): 1,
                             ("desk lamp", "B04"): 0, ("desk lamp", "B05"): 3}
    assert "1 duplicate judgments merged (1 pairs with conflicting grades -> rounded mean)" in caplog.text  # E+S -> 3
    assert "B99" not in set(data.judgments["product_id"])  # not in the products file
    assert "refer to products missing from the products file" in caplog.text
    cat = data.catalog.set_index("product_id")
    assert set(cat.index) == {"B01", "B02", "B03", "B04", "B05"}  # us products only, deduped
    assert cat.loc["B01", "title"] == "USB-C cable 2m"
    assert cat.loc["B02", "description"] == "fast\ncharge"  # bullet points when no description
    assert (cat["category"] == "unknown").all()
    assert json.loads(cat.loc["B01", "attributes"]) == {"color": "black", "locale": "us"}
    assert dict(zip(data.queries["query"], data.queries["frequency"])) == {"desk lamp": 2, "usb cable": 3}
    assert data.queries["category"].isna().all()
    assert "esci: loaded 5 products, 2 queries, 5 judgments" in caplog.text


def test_esci_options_locale_version_and_max_queries(tmp_path):
    root = _esci(tmp_path)
    big = load_esci(root, small_version=False, as_of=AS_OF)
    assert "cable usb" in set(big.queries["query"])
    es = load_esci(root, locale="es", as_of=AS_OF)
    assert _grades(es) == {("lampe", "B06"): 3}
    assert set(es.catalog["title"]) == {"Lámpara", "USB-C cable (es)"}  # all products of the locale
    one = load("esci", root, max_queries=1, as_of=AS_OF)
    assert len(one.queries) == 1
    assert set(one.catalog["product_id"]) == set(one.judgments["product_id"])  # only judged products
    assert load_esci(root, max_queries=1, as_of=AS_OF).queries.equals(one.queries)  # deterministic


def test_esci_malformed_names_file_and_column(tmp_path):
    ex = pd.DataFrame({"query": ["a"], "product_id": ["B01"], "product_locale": ["us"], "small_version": [1]})
    root = _esci(tmp_path, examples=ex)
    with pytest.raises(LoaderError, match=r"shopping_queries_dataset_examples\.parquet: missing column 'esci_label'"):
        load_esci(root)
    with pytest.raises(LoaderError, match="esci: .*nowhere does not exist"):
        load_esci(tmp_path / "nowhere")


def test_esci_missing_products_file(tmp_path):
    (tmp_path / "shopping_queries_dataset_examples.parquet").write_bytes(b"not parquet")
    with pytest.raises(LoaderError, match="cannot find shopping_queries_dataset_products.parquet"):
        load_esci(tmp_path)
    (tmp_path / "shopping_queries_dataset_products.parquet").write_bytes(b"x")
    with pytest.raises(LoaderError, match="examples.parquet: not a readable Parquet file"):
        load_esci(tmp_path)


def _warned(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_esci_products_without_optional_columns(tmp_path, caplog):
    pr = pd.DataFrame({"product_id": ["B01", "B02", "B03", "B04", "B05"],
                       "product_title": ["USB-C cable 2m", "USB-A cable", "USB charger", "Desk lamp LED", "Lamp"],
                       "product_locale": ["us"] * 5})
    root = _esci(tmp_path, products=pr)
    with caplog.at_level(logging.INFO, logger="shoprank.data.loaders"):
        data = load_esci(root, as_of=AS_OF)
    _assert_contracts(data)
    warned = " ".join(_warned(caplog))
    for col, meaning in (("product_description", "descriptions left empty"),
                         ("product_bullet_point", "descriptions left empty"),
                         ("product_brand", "brands left empty"), ("product_color", "no 'color' attribute")):
        assert f"has no '{col}' column; {meaning}" in warned
    assert data.catalog["description"].isna().all() and data.catalog["brand"].isna().all()
    assert {json.loads(a)["locale"] for a in data.catalog["attributes"]} == {"us"}
    assert len(data.judgments) == 5
    assert sum("has no" in w for w in data.warnings) == 4  # collected on the result too


def test_esci_bullet_points_only(tmp_path, caplog):
    pr = pd.DataFrame({"product_id": ["B01", "B02"], "product_title": ["USB-C cable", "USB-A cable"],
                       "product_bullet_point": ["braided", None], "product_brand": ["Anker", None],
                       "product_color": [None, None], "product_locale": ["us", "us"]})
    with caplog.at_level(logging.WARNING, logger="shoprank.data.loaders"):
        data = load_esci(_esci(tmp_path, products=pr), as_of=AS_OF)
    _assert_contracts(data)
    assert "has no 'product_description' column; descriptions taken from product_bullet_point" in caplog.text
    assert "product_bullet_point' column" not in caplog.text
    assert data.catalog.set_index("product_id").loc["B01", "description"] == "braided"


def test_esci_without_locale_and_version_columns(tmp_path, caplog):
    ex = pd.DataFrame({"query": ["usb cable", "usb cable", "lampe"], "product_id": ["B01", "B02", "B06"],
                       "esci_label": ["E", "C", "E"]})
    pr = pd.DataFrame({"product_id": ["B01", "B02", "B06"], "product_title": ["USB-C cable", "USB-A", "Lámpara"]})
    root = _esci(tmp_path, examples=ex, products=pr)
    with caplog.at_level(logging.WARNING, logger="shoprank.data.loaders"):
        data = load_esci(root, as_of=AS_OF)  # locale="us", small_version=True asked for, not applicable
    _assert_contracts(data)
    assert "examples.parquet has no 'product_locale' column; examples not filtered by locale 'us'" in caplog.text
    assert "has no 'small_version' column; examples not restricted to the small version" in caplog.text
    assert "products.parquet has no 'product_locale' column; products not filtered by locale 'us'" in caplog.text
    assert _grades(data) == {("usb cable", "B01"): 3, ("usb cable", "B02"): 1, ("lampe", "B06"): 3}
    assert data.catalog["attributes"].isna().all()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shoprank.data.loaders"):
        load_esci(root, locale=None, small_version=False, as_of=AS_OF)  # nothing asked for: no locale warnings
    assert "product_locale" not in caplog.text and "small_version" not in caplog.text


# ---- WANDS ---------------------------------------------------------------------------------

WANDS_PRODUCT = (
    "product_id\tproduct_name\tproduct_class\tcategory hierarchy\tproduct_description\tproduct_features\t"
    "rating_count\taverage_rating\treview_count\n"
    "0\tsolid wood platform bed\tBeds\tFurniture / Bedroom Furniture / Beds & Headboards / Beds\tgood bed\t"
    "overallwidth-sidetoside:64.7|dsprimaryproductstyle:modern|color:natural\t15.0\t4.5\t15.0\n"
    "1\taccent chair\tAccent Chairs\t\t\t\t\t\t\n"
    "2\tvelvet sofa\tSofas\tFurniture / Living Room Furniture / Sofas\tsoft\tcolor:blue\t3.0\t5.0\t3.0\n"
    "2\tvelvet sofa (dup)\tSofas\tFurniture\tdup\t\t\t\t\n"
)
WANDS_QUERY = "query_id\tquery\tquery_class\n0\tplatform bed\tBeds\n1\tblue sofa\tSofas\n"
WANDS_LABEL = (
    "id\tquery_id\tproduct_id\tlabel\n"
    "0\t0\t0\tExact\n1\t0\t1\tIrrelevant\n2\t1\t2\tPartial\n3\t1\t2\tPartial\n4\t1\t7\tExact\n5\t1\t1\tIrrelevant\n"
)


def _wands(tmp_path, product=WANDS_PRODUCT, query=WANDS_QUERY, label=WANDS_LABEL):
    d = tmp_path / "dataset"
    d.mkdir()
    (d / "product.csv").write_text(product, encoding="utf-8")
    (d / "query.csv").write_text(query, encoding="utf-8")
    (d / "label.csv").write_text(label, encoding="utf-8")
    return tmp_path


def test_wands_contracts_grades_category_features(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="shoprank.data.loaders"):
        data = load_wands(_wands(tmp_path), as_of=AS_OF)
    _assert_contracts(data)
    assert _grades(data) == {("platform bed", "0"): 3, ("platform bed", "1"): 0, ("blue sofa", "2"): 2,
                             ("blue sofa", "1"): 0}
    assert "1 duplicate judgments merged" in caplog.text
    assert "1 judgments (1 distinct products) refer to products missing" in caplog.text  # product 7
    cat = data.catalog.set_index("product_id")
    assert len(cat) == 3 and cat.loc["2", "title"] == "velvet sofa"  # first row wins
    assert cat.loc["0", "category"] == "Furniture > Bedroom Furniture > Beds & Headboards > Beds"
    assert cat.loc["1", "category"] == "unknown" and pd.isna(cat.loc["1", "attributes"])
    assert json.loads(cat.loc["0", "attributes"]) == {"overallwidth-sidetoside": "64.7",
                                                      "dsprimaryproductstyle": "modern", "color": "natural"}
    assert dict(zip(data.queries["query"], data.queries["frequency"])) == {"blue sofa": 2, "platform bed": 2}


def test_wands_features_parsing():
    assert json.loads(wands_features("a:1|b:x:y| |c:|a:2")) == {"a": "1", "b": "x:y", "c": ""}
    assert wands_features(None) is None and wands_features("nocolon") is None


def test_wands_wrong_separator_and_missing_column(tmp_path):
    root = _wands(tmp_path, label=WANDS_LABEL.replace("\t", ","))
    with pytest.raises(LoaderError, match=r"label\.csv: missing columns 'query_id', 'product_id', 'label'.*"
                                          r"single column: is it tab-separated\?"):
        load_wands(root)
    (tmp_path / "dataset" / "label.csv").write_text(WANDS_LABEL.replace("label\n", "grade\n", 1))
    with pytest.raises(LoaderError, match=r"label\.csv: missing column 'label'"):
        load_wands(root)


def test_wands_only_required_columns(tmp_path, caplog):
    product = "product_id\tproduct_name\n0\tsolid wood platform bed\n1\taccent chair\n2\tvelvet sofa\n"
    query = "query_id\tquery\n0\tplatform bed\n1\tblue sofa\n"
    label = "query_id\tproduct_id\tlabel\n0\t0\tExact\n0\t1\tIrrelevant\n1\t2\tPartial\n"
    with caplog.at_level(logging.WARNING, logger="shoprank.data.loaders"):
        data = load_wands(_wands(tmp_path, product=product, query=query, label=label), as_of=AS_OF)
    _assert_contracts(data)
    for expected in ("product.csv has no 'category hierarchy' column; categories set to 'unknown'",
                     "product.csv has no 'product_description' column; descriptions left empty",
                     "product.csv has no 'product_features' column; attributes left empty",
                     "query.csv has no 'query_class' column; query categories left empty"):
        assert expected in caplog.text
    assert "product_class" not in caplog.text  # only matters with query_class
    assert len(data.warnings) == 4
    assert (data.catalog["category"] == "unknown").all()
    assert data.catalog["description"].isna().all() and data.catalog["attributes"].isna().all()
    assert data.queries["category"].isna().all()
    assert _grades(data) == {("platform bed", "0"): 3, ("platform bed", "1"): 0, ("blue sofa", "2"): 2}


def test_wands_query_class_gives_query_category(tmp_path, caplog):
    data = load_wands(_wands(tmp_path), as_of=AS_OF)
    _assert_contracts(data)
    cats = dict(zip(data.queries["query"], data.queries["category"]))
    assert cats == {"platform bed": "Furniture > Bedroom Furniture > Beds & Headboards > Beds",
                    "blue sofa": "Furniture > Living Room Furniture > Sofas"}  # the duplicate row does not count
    no_class = WANDS_PRODUCT.replace("\tproduct_class", "\tclass")
    with caplog.at_level(logging.WARNING, logger="shoprank.data.loaders"):
        (tmp_path / "b").mkdir()
        data = load_wands(_wands(tmp_path / "b", product=no_class), as_of=AS_OF)
    assert "product.csv has no 'product_class' column; query categories left empty" in caplog.text
    assert data.queries["category"].isna().all()


# ---- Home Depot ----------------------------------------------------------------------------

HD_TRAIN = (
    'id,product_uid,product_title,search_term,relevance\n'
    '2,100001,"Simpson Strong-Tie 12-Gauge Angle",angle bracket,3\n'
    '3,100001,"Simpson Strong-Tie 12-Gauge Angle",l bracket,2.5\n'
    '9,100002,"BEHR Premium Textured DeckOver 1-gal. #SC-141 Tugboat Wood and Concrete Coating",deck over,2.33\n'
    '16,100005,"Delta Vero 1-Handle Shower Only Faucet Trim Kit in Chrome (Valve Not Included)",rain shower head,1.33\n'
    '17,100005,"Delta Vero 1-Handle Shower Only Faucet Trim Kit in Chrome (Valve Not Included)",shower only faucet,1.67\n'
    '18,100005,"Delta Vero 1-Handle Shower Only Faucet Trim Kit in Chrome (Valve Not Included)",rain shower head,1.33\n'
    '20,100006,"Whirlpool 1.9 cu. ft. Over the Range Convection Microwave",microwave over stove,2.0\n'
    '21,100009,"Caf\xe9 Table",cafe table,3\n'
)
HD_DESCRIPTIONS = (
    'product_uid,product_description\n'
    '100001,"Not only do angles make joints stronger, they also provide more consistent"\n'
    '100002,"BEHR Premium Textured DECKOVER is an innovative solid color coating \xb0F"\n'
    '100005,"Update your bathroom with the Delta Vero Single-Handle Shower Faucet Trim Kit"\n'
    '100006,"Achieving delicious results is almost effortless"\n'
)
HD_ATTRIBUTES = (
    'product_uid,name,value\n'
    '100001,Bullet01,Versatile connector for various 90\xb0 connections\n'
    '100001,MFG Brand Name,Simpson Strong-Tie\n'
    ',,\n'
    '100002.0,MFG Brand Name,BEHR Premium Textured DeckOver\n'
    '100002,Color Family,Brown\n'
)


def _homedepot(tmp_path, train=HD_TRAIN, attributes=HD_ATTRIBUTES):
    (tmp_path / "train.csv").write_bytes(train.encode("latin-1"))
    (tmp_path / "product_descriptions.csv").write_bytes(HD_DESCRIPTIONS.encode("latin-1"))
    if attributes is not None:
        (tmp_path / "attributes.csv").write_bytes(attributes.encode("latin-1"))
    return tmp_path


def test_homedepot_thresholds():
    assert list(homedepot_grade([1.0, 1.33, 1.5, 1.67, 2.0, 2.33, 2.5, 2.67, 3.0])) == [0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_homedepot_latin1_contracts_grades_brand(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="shoprank.data.loaders"):
        data = load_homedepot(_homedepot(tmp_path), as_of=AS_OF)
    _assert_contracts(data)
    assert _grades(data) == {("angle bracket", "100001"): 3, ("l bracket", "100001"): 3, ("deck over", "100002"): 2,
                             ("rain shower head", "100005"): 0, ("shower only faucet", "100005"): 1,
                             ("microwave over stove", "100006"): 2}
    assert "refer to products missing from the products file" in caplog.text  # 100009 has no description
    cat = data.catalog.set_index("product_id")
    assert cat.loc["100002", "description"].endswith("coating °F")  # latin-1 decoded
    assert cat.loc["100001", "brand"] == "Simpson Strong-Tie"
    assert cat.loc["100002", "brand"] == "BEHR Premium Textured DeckOver"  # '100002.0' normalised
    assert json.loads(cat.loc["100001", "attributes"])["Bullet01"].endswith("90° connections")
    assert pd.isna(cat.loc["100005", "brand"]) and pd.isna(cat.loc["100005", "attributes"])
    assert dict(zip(data.queries["query"], data.queries["frequency"]))["rain shower head"] == 1


def test_homedepot_without_attributes_and_non_ascii_title(tmp_path):
    root = _homedepot(tmp_path, attributes=None)
    (root / "product_descriptions.csv").write_bytes((HD_DESCRIPTIONS + '100009,"petite table"\n').encode("latin-1"))
    data = load_homedepot(root, as_of=AS_OF)
    _assert_contracts(data)
    assert data.catalog.set_index("product_id").loc["100009", "title"] == "Café Table"
    assert data.catalog["brand"].isna().all() and data.catalog["attributes"].isna().all()


def test_homedepot_malformed(tmp_path):
    root = _homedepot(tmp_path, train=HD_TRAIN.replace(",relevance", ",score"))
    with pytest.raises(LoaderError, match=r"train\.csv: missing column 'relevance'"):
        load_homedepot(root)
    (root / "train.csv").write_bytes(HD_TRAIN.replace(",", "\t").encode("latin-1"))
    with pytest.raises(LoaderError, match=r"train\.csv: missing columns .*is it comma-separated\?"):
        load_homedepot(root)


def test_homedepot_without_descriptions_and_attributes(tmp_path, caplog):
    root = _homedepot(tmp_path, attributes=None)
    (root / "product_descriptions.csv").unlink()
    with caplog.at_level(logging.WARNING, logger="shoprank.data.loaders"):
        data = load_homedepot(root, as_of=AS_OF)
    _assert_contracts(data)
    assert "no product_descriptions.csv in" in caplog.text and "descriptions left empty" in caplog.text
    assert "no attributes.csv in" in caplog.text and "brand and attributes left empty" in caplog.text
    assert len(data.warnings) == 2
    cat = data.catalog.set_index("product_id")
    assert set(cat.index) == {"100001", "100002", "100005", "100006", "100009"}  # every judged product
    assert cat.loc["100009", "title"] == "Café Table"
    assert cat["description"].isna().all()
    assert _grades(data)[("cafe table", "100009")] == 3


def test_homedepot_test_csv_is_refused(tmp_path):
    test_csv = "id,product_uid,product_title,search_term\n1,100001,Simpson Angle,90 degree bracket\n"
    (tmp_path / "train.csv").write_text(test_csv, encoding="latin-1")
    with pytest.raises(LoaderError, match=r"train\.csv: missing column 'relevance': this looks like Kaggle's "
                                          r"unlabelled test\.csv.*needs the labelled train\.csv"):
        load_homedepot(tmp_path)
    (tmp_path / "train.csv").rename(tmp_path / "test.csv")
    with pytest.raises(LoaderError, match=r"cannot find train\.csv .*found test\.csv, which has no relevance"):
        load_homedepot(tmp_path)


# ---- writing and CLI -----------------------------------------------------------------------

def test_write_loaded_writes_three_raw_partitions(tmp_path, recording_storage):
    data = load_wands(_wands(tmp_path), as_of=AS_OF)
    storage = recording_storage
    keys = write_loaded(storage, data, dt.date(2026, 11, 1))
    assert set(keys) == {"catalog", "judgments", "queries"}
    assert set(storage.partitions) == {("raw", d, "2026-11-01") for d in ("catalog", "judgments", "queries")}
    pd.testing.assert_frame_equal(storage.partitions[("raw", "judgments", "2026-11-01")], data.judgments)


def test_cli_parser_accepts_import():
    args = build_parser().parse_args(["import", "esci", "/data/esci", "--date", "2026-11-01", "--locale", "es",
                                      "--max-queries", "50"])
    assert (args.kind, args.path, args.date, args.locale, args.max_queries) == \
        ("esci", "/data/esci", dt.date(2026, 11, 1), "es", 50)
    assert args.func.__name__ == "cmd_import"
    args = build_parser().parse_args(["import", "homedepot", "hd", "--date", "2026-11-01"])
    assert args.locale is None and args.max_queries is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["import", "msmarco", "x", "--date", "2026-11-01"])


def test_cli_import_reports_loader_error(tmp_path, capsys):
    from shoprank.cli import main

    assert main(["import", "wands", str(tmp_path / "missing"), "--date", "2026-11-01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shoprank: error: wands: ") and "does not exist" in err
    assert main(["import", "wands", str(tmp_path), "--date", "2026-11-01", "--locale", "us"]) == 2
    assert "apply to esci only" in capsys.readouterr().err


def test_cli_import_counts_warnings(tmp_path, capsys, monkeypatch, recording_storage):
    import shoprank.storage
    from shoprank.cli import main

    recording_storage.ensure_bucket = lambda: None
    monkeypatch.setattr(shoprank.storage, "Storage", lambda _settings: recording_storage)
    monkeypatch.setenv("SHOPRANK_HOME", str(tmp_path / "home"))
    root = _homedepot(tmp_path, attributes=None)
    assert main(["import", "homedepot", str(root), "--date", "2026-11-01"]) == 0
    out = capsys.readouterr().out
    assert "2 warning(s) while importing" in out  # no attributes.csv; 100009 undescribed
    assert ("raw", "catalog", "2026-11-01") in recording_storage.partitions
