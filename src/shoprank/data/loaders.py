"""Bring your own data: load public search-relevance datasets into shoprank's contracts.

Three documented public formats are supported; each loader reads the files as published,
maps them to the ``catalog``, ``judgments`` and ``queries`` contracts
(``shoprank.data.contracts``) and returns a :class:`LoadedData`.  ``write_loaded`` writes
the frames as ``raw/{catalog,judgments,queries}/dt=<day>/`` partitions, after which the
same DAGs (validation, snapshot, training) run on them unchanged.

``esci``       Amazon Shopping Queries dataset (ESCI), files
               ``shopping_queries_dataset_examples.parquet`` and
               ``shopping_queries_dataset_products.parquet``.  Grade E=3, S=2, C=1, I=0.
               Filters: ``locale`` (default ``"us"``, ``None`` for all), ``small_version``
               (default True: only rows with ``small_version == 1``).
               Required columns: examples ``query``, ``product_id``, ``esci_label``;
               products ``product_id``, ``product_title``.  Optional: ``product_locale`` and
               ``small_version`` (without them that filter is not applied),
               ``product_description`` / ``product_bullet_point`` (description; bullet points
               fill in missing descriptions), ``product_brand``, ``product_color``.
``wands``      Wayfair WANDS, tab-separated ``product.csv``, ``query.csv``, ``label.csv``.
               Grade Exact=3, Partial=2 (WANDS "partial" ~ ESCI "substitute"),
               Irrelevant=0.  Category = "category hierarchy" re-joined with " > ";
               attributes = ``product_features`` ("name:value|name:value") as a JSON object;
               ``queries.category`` = the most common category of the products whose
               ``product_class`` is the query's ``query_class``.  Required columns:
               ``product_id``, ``product_name``; ``query_id``, ``query``; ``query_id``,
               ``product_id``, ``label``.  Every other column is optional.
``homedepot``  Kaggle Home Depot Product Search Relevance, latin-1 CSVs ``train.csv``
               (required: ``product_uid``, ``product_title``, ``search_term``,
               ``relevance``; Kaggle's unlabelled ``test.csv`` is refused),
               optional ``product_descriptions.csv`` and ``attributes.csv``.  The averaged
               1..3 relevance becomes a grade with :data:`HOMEDEPOT_THRESHOLDS`:
               < 1.5 -> 0, < 2.0 -> 1, < 2.5 -> 2, else 3.  Brand = attribute "MFG Brand Name";
               attributes = all name/value pairs as a JSON object.  With descriptions, the
               products are those of ``product_descriptions.csv``; without, those of
               ``train.csv`` (descriptions left empty).

A missing *optional* file or column is never an error: the loader logs a warning naming it
and what it means (e.g. "descriptions left empty") and collects it in
:attr:`LoadedData.warnings`.

Rules shared by the three loaders (what the public data does not say):

* ``price`` is unknown in all three: 0.0 (the contract wants a non-null price >= 0).
* ``created_at`` is unknown: every product gets ``as_of`` (default: now, UTC).
* ``category`` is ``"unknown"`` when the data has none (ESCI, Home Depot, WANDS rows
  without a hierarchy).
* ``queries.category`` is left null (except WANDS with ``query_class``), so the snapshot
  builder falls back to the category of the query's best-graded product.
* ``queries.frequency`` is the number of judgments of the query: a proxy for traffic (the
  datasets publish no query log), used only for the head/torso/tail slices.
* Query text is stripped and inner whitespace collapsed; nothing else is changed.
* Dedupe: products by ``product_id`` (first row wins); judgments by (query text, product):
  conflicting grades become the rounded (half up) mean grade.  Products without a title
  are dropped; judgments of products missing from the products file are dropped.  Both
  are counted and logged.
* ``max_queries`` keeps at most N queries, chosen by a stable hash of the query text (the
  same N for the same file, whatever its row order), and then only the products they judge.
* Every judgment's ``source`` is ``"human"``.

A malformed input raises :class:`LoaderError` naming the file and the missing column (a
file that parses as a single column gets a hint about the separator).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import functools
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from shoprank.data.contracts import CATALOG, JUDGMENTS, QUERIES

log = logging.getLogger(__name__)

UNKNOWN_CATEGORY = "unknown"
UNKNOWN_PRICE = 0.0

ESCI_EXAMPLES = "shopping_queries_dataset_examples.parquet"
ESCI_PRODUCTS = "shopping_queries_dataset_products.parquet"
ESCI_GRADES = {"E": 3, "S": 2, "C": 1, "I": 0}
ESCI_LOCALES = ("us", "es", "jp")

WANDS_PRODUCTS, WANDS_QUERIES, WANDS_LABELS = "product.csv", "query.csv", "label.csv"
WANDS_GRADES = {"exact": 3, "partial": 2, "irrelevant": 0}

HOMEDEPOT_TRAIN = "train.csv"
HOMEDEPOT_DESCRIPTIONS = "product_descriptions.csv"
HOMEDEPOT_ATTRIBUTES = "attributes.csv"
HOMEDEPOT_TEST = "test.csv"  # Kaggle's unlabelled file: train.csv's columns without relevance
HOMEDEPOT_TEST_COLUMNS = frozenset({"id", "product_uid", "product_title", "search_term"})
HOMEDEPOT_BRAND_ATTRIBUTE = "MFG Brand Name"
# relevance (mean of raters' 1..3) -> grade: r < 1.5 -> 0, < 2.0 -> 1, < 2.5 -> 2, else 3
HOMEDEPOT_THRESHOLDS = (1.5, 2.0, 2.5)


class LoaderError(ValueError):
    """An input file is missing, unreadable or not in the documented format."""


@dataclass
class LoadedData:
    """Contract-conformed frames from one public dataset."""

    catalog: pd.DataFrame
    judgments: pd.DataFrame
    queries: pd.DataFrame
    #: the warnings the loader logged (missing optional files / columns, dropped rows)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        grades = self.judgments["grade"].value_counts().sort_index()
        return {"products": len(self.catalog), "queries": len(self.queries), "judgments": len(self.judgments),
                "grades": {int(g): int(n) for g, n in grades.items()}}


class _CollectWarnings(logging.Handler):
    """Collects this thread's WARNING records of the loaders' logger."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


def _collecting_warnings(loader: Callable[..., LoadedData]) -> Callable[..., LoadedData]:
    """``loader`` whose result carries the warnings it logged in ``LoadedData.warnings``."""

    @functools.wraps(loader)
    def wrapper(*args: Any, **kwargs: Any) -> LoadedData:
        handler = _CollectWarnings()
        log.addHandler(handler)
        try:
            data = loader(*args, **kwargs)
        finally:
            log.removeHandler(handler)
        data.warnings = handler.messages
        return data

    return wrapper


def _missing_columns(dataset: str, path: Path, columns: Iterable[str], meaning: dict[str, str]) -> list[str]:
    """Warn once per optional column of ``meaning`` absent from ``columns``; return those absent."""
    columns = set(columns)
    absent = [c for c in meaning if c not in columns]
    for c in absent:
        log.warning("%s: %s has no %r column; %s", dataset, path.name, c, meaning[c])
    return absent


# ---- reading ----------------------------------------------------------------------------

def _locate(root: Path, name: str) -> Path | None:
    """``root/name``, else ``root/<sub>/name`` (the published repos nest their files one level)."""
    if root.is_file():
        return root if root.name == name else _locate(root.parent, name)
    direct = root / name
    if direct.is_file():
        return direct
    nested = sorted(p for p in root.glob(f"*/{name}") if p.is_file())
    return nested[0] if nested else None


def _require_file(root: Path, name: str, dataset: str) -> Path:
    found = _locate(root, name)
    if found is None:
        raise LoaderError(f"{dataset}: cannot find {name} in {root} (nor in its direct subfolders)")
    return found


def _check_columns(columns: Iterable[str], required: Iterable[str], path: Path, sep_hint: str | None = None) -> None:
    columns = list(columns)
    missing = [c for c in required if c not in columns]
    if not missing:
        return
    shown = ", ".join(repr(c) for c in columns[:12]) + (", ..." if len(columns) > 12 else "")
    plural = "s" if len(missing) > 1 else ""
    msg = f"{path}: missing column{plural} {', '.join(repr(c) for c in missing)} (found: {shown})"
    if sep_hint and len(columns) == 1:
        msg += f"; the file parsed as a single column: is it {sep_hint}?"
    raise LoaderError(msg)


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a non-Parquet file
        raise LoaderError(f"{path}: not a readable Parquet file ({exc})") from exc


def _read_parquet(path: Path, required: list[str], optional: Iterable[str] = (),
                  filters: list | None = None) -> pd.DataFrame:
    import pyarrow.parquet as pq

    names = _parquet_columns(path)
    _check_columns(names, required, path)
    columns = list(dict.fromkeys([*required, *(c for c in optional if c in names)]))
    try:
        table = pq.read_table(path, columns=columns, filters=filters)
    except Exception as exc:
        raise LoaderError(f"{path}: cannot read ({exc})") from exc
    return table.to_pandas()


def _decode(raw: bytes, encoding: str) -> str:
    if encoding != "auto":
        return raw.decode(encoding)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # the Kaggle Home Depot files; latin-1 decodes any byte


def _read_delimited(path: Path, sep: str, required: list[str], *, encoding: str = "utf-8",
                    sep_name: str) -> pd.DataFrame:
    """All columns as strings; only empty fields are missing (a query "null" stays a query)."""
    try:
        text = _decode(path.read_bytes(), encoding)
    except (OSError, UnicodeDecodeError) as exc:
        raise LoaderError(f"{path}: cannot read as {encoding} text ({exc})") from exc
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise LoaderError(f"{path}: not a {sep_name} file ({exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    _check_columns(df.columns, required, path, sep_hint=sep_name)
    return df


# ---- cleaning ---------------------------------------------------------------------------

def _text(s: pd.Series) -> pd.Series:
    """Strip; empty -> missing."""
    s = s.astype("string").str.strip()
    return s.mask(s == "")


def _query_text(s: pd.Series) -> pd.Series:
    return _text(s.astype("string").str.replace(r"\s+", " ", regex=True))


def _ids(s: pd.Series) -> pd.Series:
    """Product ids as strings; '100001.0' (an int id that went through a float) -> '100001'."""
    s = _text(s)
    return s.str.replace(r"^(\d+)\.0+$", r"\1", regex=True)


def _json_or_null(d: dict) -> str | None:
    return json.dumps(d, ensure_ascii=False) if d else None


def _as_of(as_of: dt.datetime | dt.date | str | pd.Timestamp | None) -> pd.Timestamp:
    if as_of is None:
        ts = pd.Timestamp.now(tz="UTC")
    elif isinstance(as_of, dt.date) and not isinstance(as_of, dt.datetime):
        ts = pd.Timestamp(as_of.isoformat())
    else:
        try:
            ts = pd.Timestamp(as_of)
        except ValueError as exc:
            raise LoaderError(f"as_of {as_of!r} is not a timestamp") from exc
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.floor("us")


def _stable_rank(queries: pd.Series) -> pd.Series:
    return queries.map(lambda q: hashlib.blake2b(str(q).encode("utf-8"), digest_size=8).hexdigest())


def _sample_queries(judgments: pd.DataFrame, max_queries: int | None, dataset: str) -> pd.DataFrame:
    if max_queries is None:
        return judgments
    if max_queries < 1:
        raise LoaderError(f"{dataset}: max_queries must be >= 1 (got {max_queries})")
    uniq = pd.Series(judgments["query"].dropna().unique())
    if len(uniq) <= max_queries:
        return judgments
    keep = set(uniq[_stable_rank(uniq).sort_values(kind="stable").index[:max_queries]])
    out = judgments[judgments["query"].isin(keep)]
    log.info("%s: kept %d of %d queries (max_queries, stable hash of the text): %d judgments",
             dataset, len(keep), len(uniq), len(out))
    return out


def _map_labels(labels: pd.Series, grades: dict[str, int], dataset: str, path: Path,
                normalise: Callable[[pd.Series], pd.Series]) -> pd.Series:
    grade = normalise(labels).map(grades)
    bad = grade.isna()
    if bad.any():
        examples = sorted(set(labels[bad].astype(str)))[:5]
        log.warning("%s: %d rows of %s have a label outside %s (e.g. %s); dropped",
                    dataset, int(bad.sum()), path.name, sorted(grades), examples)
    return grade


def _dedupe_judgments(j: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One row per (query, product); conflicting grades -> rounded (half up) mean grade."""
    n = len(j)
    g = j.groupby(["query", "product_id"], sort=True, observed=True)["grade"]
    out = g.agg(["mean", "min", "max"]).reset_index()
    conflicts = int((out["min"] != out["max"]).sum())
    out["grade"] = np.floor(out["mean"].to_numpy(float) + 0.5).astype("int64")
    if len(out) < n:
        log.info("%s: %d duplicate judgments merged (%d pairs with conflicting grades -> rounded mean)",
                 dataset, n - len(out), conflicts)
    return out[["query", "product_id", "grade"]]


def _finish(dataset: str, products: pd.DataFrame, judgments: pd.DataFrame, as_of: pd.Timestamp,
            restrict_catalog: bool, query_category: pd.Series | None = None) -> LoadedData:
    """Common tail: dedupe, referential integrity, queries, contract dtypes.

    ``products`` has product_id, title, description, category, brand, attributes;
    ``judgments`` has query, product_id, grade (already mapped, NaN for unknown labels);
    ``query_category`` (optional) maps the cleaned query text to its category.
    """
    # products
    p = products.copy()
    p["product_id"] = _ids(p["product_id"])
    p = p[p["product_id"].notna()]
    for col in ("title", "description", "brand", "category"):
        p[col] = _text(p[col])
    no_title = p["title"].isna()
    if no_title.any():
        log.warning("%s: %d products without a title; dropped", dataset, int(no_title.sum()))
        p = p[~no_title]
    n = len(p)
    p = p.drop_duplicates("product_id", keep="first")
    if len(p) < n:
        log.info("%s: %d duplicate product rows dropped (first wins)", dataset, n - len(p))
    p["category"] = p["category"].fillna(UNKNOWN_CATEGORY)

    # judgments
    j = judgments.copy()
    j["query"] = _query_text(j["query"])
    j["product_id"] = _ids(j["product_id"])
    incomplete = j["query"].isna() | j["product_id"].isna() | j["grade"].isna()
    if incomplete.any():
        log.warning("%s: %d judgments without a query, product or valid label; dropped", dataset, int(incomplete.sum()))
        j = j[~incomplete]
    j = _dedupe_judgments(j, dataset)
    unknown = ~j["product_id"].isin(p["product_id"])
    if unknown.any():
        log.warning("%s: %d judgments (%d distinct products) refer to products missing from the products file; "
                    "dropped", dataset, int(unknown.sum()), j.loc[unknown, "product_id"].nunique())
        j = j[~unknown]
    if j.empty:
        raise LoaderError(f"{dataset}: no judgments left after filtering (check the locale/version filters "
                          "and that the products file matches the judgments)")
    if restrict_catalog:
        p = p[p["product_id"].isin(j["product_id"])]

    p["price"] = UNKNOWN_PRICE
    p["created_at"] = as_of
    j["source"] = "human"
    q = j.groupby("query", sort=True).size().rename("frequency").reset_index()
    q["category"] = pd.NA
    if query_category is not None and len(query_category):
        q["category"] = q["query"].map(query_category).astype("object")

    data = LoadedData(
        catalog=CATALOG.conform(p.sort_values("product_id", kind="stable").reset_index(drop=True)),
        judgments=JUDGMENTS.conform(j.sort_values(["query", "product_id"], kind="stable").reset_index(drop=True)),
        queries=QUERIES.conform(q),
    )
    s = data.summary()
    log.info("%s: loaded %d products, %d queries, %d judgments (grades %s)",
             dataset, s["products"], s["queries"], s["judgments"], s["grades"])
    return data


def _root(path: str | Path, dataset: str) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise LoaderError(f"{dataset}: {root} does not exist")
    return root


# ---- ESCI -------------------------------------------------------------------------------

@_collecting_warnings
def load_esci(path: str | Path, *, locale: str | None = "us", small_version: bool = True,
              max_queries: int | None = None, as_of: Any = None) -> LoadedData:
    """Amazon Shopping Queries (ESCI) from the directory holding its two Parquet files."""
    root = _root(path, "esci")
    ts = _as_of(as_of)
    if locale is not None and locale not in ESCI_LOCALES:
        raise LoaderError(f"esci: unknown locale {locale!r}; use one of {list(ESCI_LOCALES)} (or None for all)")
    ex_path = _require_file(root, ESCI_EXAMPLES, "esci")
    pr_path = _require_file(root, ESCI_PRODUCTS, "esci")

    ex_names = _parquet_columns(ex_path)
    required = ["query", "product_id", "esci_label"]
    _check_columns(ex_names, required, ex_path)
    wanted = {}
    if locale is not None:
        wanted["product_locale"] = f"examples not filtered by locale {locale!r} (products still are, when they can be)"
    if small_version:
        wanted["small_version"] = "examples not restricted to the small version: all rows used"
    absent = _missing_columns("esci", ex_path, ex_names, wanted)
    filter_locale = locale is not None and "product_locale" not in absent
    filter_small = small_version and "small_version" not in absent
    ex = _read_parquet(ex_path, required + (["product_locale"] if filter_locale else [])
                       + (["small_version"] if filter_small else []))
    log.info("esci: %s has %d examples", ex_path.name, len(ex))
    if filter_locale:
        ex = ex[ex["product_locale"].astype("string") == locale]
    if filter_small:
        ex = ex[pd.to_numeric(ex["small_version"], errors="coerce").fillna(0).astype(int) == 1]
    log.info("esci: %d examples after filters (locale=%s, small_version=%s)", len(ex),
             locale if filter_locale else None, filter_small)
    judgments = pd.DataFrame({
        "query": _query_text(ex["query"]),
        "product_id": _ids(ex["product_id"]),
        "grade": _map_labels(ex["esci_label"], ESCI_GRADES, "esci", ex_path,
                             lambda s: s.astype("string").str.strip().str.upper()),
    })
    judgments = _sample_queries(judgments, max_queries, "esci")

    pr_names = _parquet_columns(pr_path)
    pr_required = ["product_id", "product_title"]
    _check_columns(pr_names, pr_required, pr_path)
    has_desc, has_bullets = "product_description" in pr_names, "product_bullet_point" in pr_names
    meaning = {
        "product_description": ("descriptions taken from product_bullet_point" if has_bullets
                                else "descriptions left empty"),
        "product_bullet_point": ("no bullet-point fallback for products without a description" if has_desc
                                 else "descriptions left empty"),
        "product_brand": "brands left empty",
        "product_color": "no 'color' attribute",
    }
    if locale is not None:
        meaning["product_locale"] = f"products not filtered by locale {locale!r}"
    absent = _missing_columns("esci", pr_path, pr_names, meaning)
    filters = [("product_locale", "==", locale)] if locale is not None and "product_locale" not in absent else None
    optional = ["product_description", "product_bullet_point", "product_brand", "product_color", "product_locale"]
    if max_queries is not None:  # read only the products the sample judges
        ids = judgments["product_id"].dropna().unique().tolist()
        filters = (filters or []) + [("product_id", "in", ids)]
    pr = _read_parquet(pr_path, pr_required, optional, filters=filters)
    log.info("esci: %d products read from %s", len(pr), pr_path.name)
    for col in optional:
        if col not in pr.columns:
            pr[col] = pd.NA
    description = _text(pr["product_description"]).fillna(_text(pr["product_bullet_point"]))
    attrs = [_json_or_null({k: v for k, v in (("color", c), ("locale", loc)) if isinstance(v, str) and v.strip()})
             for c, loc in zip(pr["product_color"].astype(object).where(pr["product_color"].notna(), None),
                               pr["product_locale"].astype(object).where(pr["product_locale"].notna(), None))]
    products = pd.DataFrame({
        "product_id": pr["product_id"], "title": pr["product_title"], "description": description,
        "category": UNKNOWN_CATEGORY, "brand": pr["product_brand"], "attributes": attrs,
    })
    return _finish("esci", products, judgments, ts, restrict_catalog=max_queries is not None)


# ---- WANDS ------------------------------------------------------------------------------

def _wands_category(hierarchy: pd.Series) -> pd.Series:
    def one(h: Any) -> Any:
        if not isinstance(h, str):
            return None
        parts = [x.strip() for x in h.split(" / ") if x.strip()]
        return " > ".join(parts) if parts else None

    return pd.Series([one(h) for h in hierarchy.astype(object)], index=hierarchy.index, dtype="object")


def wands_features(features: Any) -> str | None:
    """``"color:blue|width:20 in"`` -> ``'{"color": "blue", "width": "20 in"}'`` (first key wins)."""
    if not isinstance(features, str):
        return None
    out: dict[str, str] = {}
    for item in features.split("|"):
        name, sep, value = item.partition(":")
        name, value = name.strip(), value.strip()
        if name and sep and name not in out:
            out[name] = value
    return _json_or_null(out)


def _wands_query_category(qs: pd.DataFrame, pr: pd.DataFrame, category: pd.Series) -> pd.Series:
    """query text -> the most common category of the products whose product_class is its query_class."""
    first = ~_ids(pr["product_id"]).duplicated()  # as in the catalogue: the first row of a product wins
    classes = pd.DataFrame({"cls": pr.loc[first, "product_class"].astype("string").str.split("|"),
                            "category": category[first].to_numpy()}).explode("cls")
    classes["cls"] = _text(classes["cls"])
    classes = classes.dropna()
    if classes.empty:
        return pd.Series(dtype="object")
    modal = (classes.groupby(["cls", "category"], sort=True).size().rename("n").reset_index()
             .sort_values(["cls", "n"], ascending=[True, False], kind="stable").drop_duplicates("cls")
             .set_index("cls")["category"])
    per_query = pd.DataFrame({"query": _query_text(qs["query"]), "category": _text(qs["query_class"]).map(modal)})
    per_query = per_query.dropna().drop_duplicates("query")
    return per_query.set_index("query")["category"].astype("object")


@_collecting_warnings
def load_wands(path: str | Path, *, max_queries: int | None = None, as_of: Any = None) -> LoadedData:
    """Wayfair WANDS from the directory holding product.csv, query.csv, label.csv (tab-separated)."""
    root = _root(path, "wands")
    ts = _as_of(as_of)
    tsv = "tab-separated"
    pr_path = _require_file(root, WANDS_PRODUCTS, "wands")
    q_path = _require_file(root, WANDS_QUERIES, "wands")
    l_path = _require_file(root, WANDS_LABELS, "wands")
    pr = _read_delimited(pr_path, "\t", ["product_id", "product_name"], sep_name=tsv)
    qs = _read_delimited(q_path, "\t", ["query_id", "query"], sep_name=tsv)
    lb = _read_delimited(l_path, "\t", ["query_id", "product_id", "label"], sep_name=tsv)
    log.info("wands: read %d products, %d queries, %d labels", len(pr), len(qs), len(lb))
    no_class = "query categories left empty (snapshots use the category of each query's best-graded product)"
    absent = _missing_columns("wands", pr_path, pr.columns, {
        "category hierarchy": f"categories set to {UNKNOWN_CATEGORY!r}",
        "product_description": "descriptions left empty",
        "product_features": "attributes left empty",
        **({"product_class": no_class} if "query_class" in qs.columns else {}),
    })
    absent += _missing_columns("wands", q_path, qs.columns, {"query_class": no_class})
    for col in ("category hierarchy", "product_description", "product_features", "product_class"):
        if col not in pr.columns:
            pr[col] = pd.NA

    qtext = qs.assign(query_id=_text(qs["query_id"])).drop_duplicates("query_id").set_index("query_id")["query"]
    lb_qid = _text(lb["query_id"])
    query = lb_qid.map(qtext)
    unknown_q = query.isna() & lb_qid.notna()
    if unknown_q.any():
        log.warning("wands: %d labels refer to a query_id missing from %s; dropped", int(unknown_q.sum()), q_path.name)
    judgments = pd.DataFrame({
        "query": query, "product_id": lb["product_id"],
        "grade": _map_labels(lb["label"], WANDS_GRADES, "wands", l_path,
                             lambda s: s.astype("string").str.strip().str.lower()),
    })
    judgments["query"] = _query_text(judgments["query"])
    judgments = _sample_queries(judgments, max_queries, "wands")

    category = _wands_category(pr["category hierarchy"])
    query_category = None
    if "query_class" not in absent and "product_class" not in absent:
        query_category = _wands_query_category(qs, pr, category)
    products = pd.DataFrame({
        "product_id": pr["product_id"], "title": pr["product_name"], "description": pr["product_description"],
        "category": category, "brand": pd.NA,
        "attributes": [wands_features(f) for f in pr["product_features"].astype(object)],
    })
    return _finish("wands", products, judgments, ts, restrict_catalog=max_queries is not None,
                   query_category=query_category)


# ---- Home Depot -------------------------------------------------------------------------

def homedepot_grade(relevance: pd.Series | np.ndarray) -> np.ndarray:
    """Averaged 1..3 relevance -> grade 0..3 (< 1.5 -> 0, < 2.0 -> 1, < 2.5 -> 2, else 3)."""
    return np.searchsorted(np.asarray(HOMEDEPOT_THRESHOLDS), np.asarray(relevance, dtype=float), side="right")


@_collecting_warnings
def load_homedepot(path: str | Path, *, max_queries: int | None = None, as_of: Any = None,
                   encoding: str = "auto") -> LoadedData:
    """Kaggle Home Depot search relevance from the directory holding train.csv & co.

    ``encoding="auto"`` reads UTF-8 when the bytes are valid UTF-8, else latin-1 (the
    files as Kaggle publishes them).
    """
    root = _root(path, "homedepot")
    ts = _as_of(as_of)
    csv = "comma-separated"
    tr_path = _locate(root, HOMEDEPOT_TRAIN)
    if tr_path is None:
        hint = ""
        if _locate(root, HOMEDEPOT_TEST) is not None:
            hint = (f"; found {HOMEDEPOT_TEST}, which has no relevance labels: the importer needs the labelled "
                    f"{HOMEDEPOT_TRAIN}")
        raise LoaderError(f"homedepot: cannot find {HOMEDEPOT_TRAIN} in {root} (nor in its direct subfolders){hint}")
    de_path = _locate(root, HOMEDEPOT_DESCRIPTIONS)
    at_path = _locate(root, HOMEDEPOT_ATTRIBUTES)
    tr = _read_delimited(tr_path, ",", ["product_uid", "product_title", "search_term"],
                         encoding=encoding, sep_name=csv)
    if "relevance" not in tr.columns and set(tr.columns) <= HOMEDEPOT_TEST_COLUMNS:
        raise LoaderError(f"{tr_path}: missing column 'relevance': this looks like Kaggle's unlabelled "
                          f"{HOMEDEPOT_TEST} (columns {list(tr.columns)}); the importer needs the labelled "
                          f"{HOMEDEPOT_TRAIN} (id, product_uid, product_title, search_term, relevance)")
    _check_columns(tr.columns, ["relevance"], tr_path, sep_hint=csv)
    if de_path is None:
        log.warning("homedepot: no %s in %s; descriptions left empty (products are the judged ones of %s)",
                    HOMEDEPOT_DESCRIPTIONS, root, HOMEDEPOT_TRAIN)
        de = pd.DataFrame({"product_uid": pd.Series(dtype="string"),
                           "product_description": pd.Series(dtype="string")})
    else:
        de = _read_delimited(de_path, ",", ["product_uid", "product_description"], encoding=encoding,
                             sep_name=csv)
    log.info("homedepot: read %d training rows, %d descriptions", len(tr), len(de))

    relevance = pd.to_numeric(tr["relevance"], errors="coerce")
    bad = relevance.isna() | (relevance < 1.0) | (relevance > 3.0)
    if bad.any():
        log.warning("homedepot: %d rows of %s have a relevance outside 1..3 (or not a number); dropped",
                    int(bad.sum()), tr_path.name)
    j = pd.DataFrame({"query": _query_text(tr["search_term"]), "product_id": _ids(tr["product_uid"]),
                      "relevance": relevance})[~bad]
    # average the raters' means of duplicate (query, product) rows *before* thresholding
    j = j.dropna(subset=["query", "product_id"]).groupby(["query", "product_id"], sort=True)["relevance"].mean()
    j = j.reset_index()
    j["grade"] = homedepot_grade(j["relevance"])
    j = _sample_queries(j[["query", "product_id", "grade"]], max_queries, "homedepot")

    titles = pd.DataFrame({"product_id": _ids(tr["product_uid"]), "title": _text(tr["product_title"])})
    titles = titles.dropna().drop_duplicates("product_id")
    desc = pd.DataFrame({"product_id": _ids(de["product_uid"]), "description": de["product_description"]})
    desc = desc.dropna(subset=["product_id"]).drop_duplicates("product_id")
    # the products file is product_descriptions.csv (when there is one); titles come from train.csv
    if de_path is None:
        products = titles.assign(description=pd.NA)
    else:
        products = desc.merge(titles, on="product_id", how="inner")
    products = products[products["product_id"].isin(j["product_id"])]

    brand = pd.Series(dtype="object")
    attributes = pd.Series(dtype="object")
    if at_path is None:
        log.warning("homedepot: no %s in %s; brand and attributes left empty", HOMEDEPOT_ATTRIBUTES, root)
    else:
        at = _read_delimited(at_path, ",", ["product_uid", "name", "value"], encoding=encoding, sep_name=csv)
        at = pd.DataFrame({"product_id": _ids(at["product_uid"]), "name": _text(at["name"]),
                           "value": _text(at["value"])})
        at = at[at["product_id"].isin(products["product_id"]) & at["name"].notna()]
        at = at.drop_duplicates(["product_id", "name"])
        log.info("homedepot: %d attribute rows for the judged products", len(at))
        brand = at[at["name"] == HOMEDEPOT_BRAND_ATTRIBUTE].set_index("product_id")["value"]
        per_product: dict[str, dict[str, Any]] = {}
        for pid, name, value in zip(at["product_id"], at["name"], at["value"].astype(object)):
            per_product.setdefault(pid, {})[name] = None if value is pd.NA else value
        attributes = pd.Series({pid: _json_or_null(d) for pid, d in per_product.items()}, dtype="object")
    products = products.assign(
        category=UNKNOWN_CATEGORY,
        brand=products["product_id"].map(brand).astype("object"),
        attributes=products["product_id"].map(attributes).astype("object"),
    )
    return _finish("homedepot", products, j, ts, restrict_catalog=True)


# ---- entry points -----------------------------------------------------------------------

LOADERS: dict[str, Callable[..., LoadedData]] = {"esci": load_esci, "wands": load_wands, "homedepot": load_homedepot}


def load(kind: str, path: str | Path, **options: Any) -> LoadedData:
    """``load("esci", "/data/esci", locale="us", max_queries=500, as_of=...)``."""
    try:
        loader = LOADERS[kind]
    except KeyError:
        raise LoaderError(f"unknown dataset kind {kind!r}; use one of {sorted(LOADERS)}") from None
    return loader(path, **options)


def write_loaded(storage: Any, data: LoadedData, day: dt.date | str) -> dict[str, list[str]]:
    """Write raw/catalog, raw/judgments and raw/queries partitions for ``day`` (each replaced)."""
    day_str = day.isoformat() if hasattr(day, "isoformat") else str(day)
    frames = {"catalog": CATALOG.conform(data.catalog), "judgments": JUDGMENTS.conform(data.judgments),
              "queries": QUERIES.conform(data.queries)}
    written = {}
    for dataset, df in frames.items():
        written[dataset] = storage.write_partition(df, "raw", dataset, day)
        log.info("wrote raw/%s/dt=%s: %d rows", dataset, day_str, len(df))
    return written
