"""Data contracts: the columns, types and meaning of every dataset shoprank reads.

These are the shapes a user drops into ``raw/<dataset>/dt=YYYY-MM-DD/`` (Parquet) to bring
their own data.  The validation suites (``shoprank.validation``) check them; the synthetic
marketplace (``shoprank.data.synthetic``) writes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

# Graded relevance scale used for judgments (ESCI-compatible: E=3, S=2, C=1, I=0).
GRADES = {0: "irrelevant", 1: "complement", 2: "substitute", 3: "exact"}
GRADE_MIN, GRADE_MAX = 0, 3

EVENT_TYPES = ("impression", "click", "add_to_cart", "purchase")
JUDGMENT_SOURCES = ("human", "derived")


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # pandas dtype name as written to Parquet
    nullable: bool
    doc: str


@dataclass(frozen=True)
class Contract:
    dataset: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    doc: str
    # Columns a batch may carry or omit (e.g. feedback ``arm``): not in ``names`` (so schema
    # checks do not require them); ``conform`` keeps and casts them when present.
    optional_columns: tuple[Column, ...] = ()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def all_names(self) -> list[str]:
        """Required then optional column names."""
        return self.names + [c.name for c in self.optional_columns]

    @property
    def dtypes(self) -> dict[str, str]:
        return {c.name: c.dtype for c in self.columns}

    def conform(self, df: pd.DataFrame) -> pd.DataFrame:
        """Return ``df`` with exactly the contract's columns, in order, cast to its dtypes."""
        missing = [c for c in self.names if c not in df.columns]
        if missing:
            raise ValueError(f"{self.dataset}: missing columns {missing}")
        optional = [c for c in self.optional_columns if c.name in df.columns]
        return df[self.names + [c.name for c in optional]].astype({**self.dtypes, **{c.name: c.dtype for c in optional}})


CATALOG = Contract(
    dataset="catalog",
    doc="One row per product in the shop's catalogue on that day.",
    key=("product_id",),
    columns=(
        Column("product_id", "string", False, "stable product id"),
        Column("title", "string", False, "product title"),
        Column("description", "string", True, "free-text description"),
        Column("category", "string", False, "category path, levels separated by ' > '"),
        Column("brand", "string", True, "brand name"),
        Column("attributes", "string", True, "JSON object of attribute name -> value"),
        Column("price", "float64", False, "price in the shop's currency, >= 0"),
        Column("created_at", "datetime64[us, UTC]", False, "when the product was listed"),
    ),
)

JUDGMENTS = Contract(
    dataset="judgments",
    doc="Graded relevance of a product for a query (0 irrelevant .. 3 exact).",
    key=("query", "product_id"),
    columns=(
        Column("query", "string", False, "search query text"),
        Column("product_id", "string", False, "judged product (must exist in the catalogue)"),
        Column("grade", "int64", False, "relevance grade 0..3 (see GRADES)"),
        Column("source", "string", False, "'human' or 'derived' (from feedback)"),
    ),
)

FEEDBACK = Contract(
    dataset="feedback",
    doc="One row per shopper event on a search result page.",
    key=("event_id",),
    columns=(
        Column("event_id", "string", False, "unique event id (dedupe key)"),
        Column("ts", "datetime64[us, UTC]", False, "event time, within the partition's day"),
        Column("request_id", "string", False, "ranking request that showed the product"),
        Column("session_id", "string", False, "shopper session"),
        Column("user_id", "string", False, "pseudonymised user id (keyed hash)"),
        Column("query", "string", False, "search query text"),
        Column("product_id", "string", False, "product the event is about"),
        Column("position", "int64", False, "1-based rank at which the product was shown"),
        Column("event_type", "string", False, "impression | click | add_to_cart | purchase"),
        Column("model_version", "string", True, "model version that produced the ranking"),
    ),
    optional_columns=(
        Column("arm", "string", True, "A/B arm that served the ranking (champion | challenger); optional"),
    ),
)

QUERIES = Contract(
    dataset="queries",
    doc="Query log summary: how often each query is searched (drives head/torso/tail slices).",
    key=("query",),
    columns=(
        Column("query", "string", False, "search query text"),
        Column("frequency", "int64", False, "searches per day"),
        Column("category", "string", True, "category the query targets"),
    ),
)

CONTRACTS: dict[str, Contract] = {c.dataset: c for c in (CATALOG, JUDGMENTS, FEEDBACK, QUERIES)}


# ---- product text -----------------------------------------------------------------------------

#: The text the cross-encoder sees for a product, unless ``SHOPRANK_PRODUCT_TEXT_TEMPLATE`` says
#: otherwise (``Settings.product_text_template``; ``shoprank.config`` holds the same default so
#: that reading settings does not import pandas).
DEFAULT_PRODUCT_TEXT_TEMPLATE = "{title} | {brand} | {category} | {description}"
#: Fields a template may name.  ``category_leaf`` is the last level of ``"A > B > C"``;
#: ``attributes`` (a JSON object) renders as ``"key: value, key: value"``; ``price`` as
#: ``"12.99"`` (a price <= 0, the loaders' "unknown", counts as absent).
PRODUCT_TEXT_FIELDS = ("title", "brand", "category", "category_leaf", "description", "attributes", "price")
#: Whole values (after strip, any case) that mean "no value" and never reach the text.
PLACEHOLDER_VALUES = frozenset({"", "unknown", "nan", "none", "null"})
PRODUCT_TEXT_MAX_CHARS = 2000


def parse_text_template(template: str) -> tuple[str, list[tuple[str, str]], str]:
    """``template`` -> (prefix, [(separator, field), ...], suffix).

    The literal text before a field (after the previous field) is that field's separator: it
    is written only when the field is present and some earlier field was written.  Text before
    the first field and after the last one is kept as is.  Raises ``ValueError`` for an unknown
    field, a format spec or conversion, or a template without fields.
    """
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"product text template {template!r}: {exc}") from None
    prefix, parts, pending = "", [], ""
    for literal, name, spec, conversion in parsed:
        pending += literal
        if name is None:
            continue
        if name not in PRODUCT_TEXT_FIELDS:
            raise ValueError(f"product text template {template!r}: unknown field {{{name}}}; "
                             f"use {', '.join('{' + f + '}' for f in PRODUCT_TEXT_FIELDS)}")
        if spec or conversion:
            raise ValueError(f"product text template {template!r}: {{{name}}} takes no format spec or conversion")
        if parts:
            parts.append((pending, name))
        else:
            prefix = pending
            parts.append(("", name))
        pending = ""
    if not parts:
        raise ValueError(f"product text template {template!r} names no field; e.g. {DEFAULT_PRODUCT_TEXT_TEMPLATE!r}")
    return prefix, parts, pending


def _present(values: pd.Series) -> pd.Series:
    """Stripped strings; missing, empty and placeholder values -> NA."""
    s = values.astype("string").str.strip()
    return s.mask(s.str.lower().isin(sorted(PLACEHOLDER_VALUES)))


def _by_unique(values: pd.Series, render) -> pd.Series:
    """``render`` applied once per distinct non-null value (catalogues repeat values a lot)."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    rendered = pd.array([render(u) for u in uniques], dtype="string")
    return pd.Series(rendered.take(codes, allow_fill=True), index=values.index)  # code -1 (null) -> NA


def _scalar(v) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, (dict, list)):
        import json

        return json.dumps(v, ensure_ascii=False)
    text = str(v).strip()
    return None if text.lower() in PLACEHOLDER_VALUES else text


def render_attributes(value) -> str | None:
    """``'{"color": "red", "size": "M"}'`` -> ``"color: red, size: M"``; absent values skipped.

    Anything that is not a JSON object (invalid JSON, a list, a number) gives ``None``.
    """
    import json

    if not isinstance(value, str):
        return None
    try:
        obj = json.loads(value)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    items = []
    for k, v in obj.items():
        key, val = str(k).strip(), _scalar(v)
        if key and val is not None:
            items.append(f"{key}: {val}")
    return ", ".join(items) or None


def _field(df: pd.DataFrame, name: str) -> pd.Series:
    if name == "category_leaf":
        if "category" not in df.columns:
            return pd.Series(pd.NA, index=df.index, dtype="string")
        return _present(_present(df["category"]).str.rsplit(">", n=1).str[-1])
    if name not in df.columns:
        return pd.Series(pd.NA, index=df.index, dtype="string")
    col = df[name]
    if name == "attributes":
        return _by_unique(col.astype(object).where(col.notna(), None), render_attributes)
    if name == "price":
        price = pd.to_numeric(col, errors="coerce").astype("float64")
        price = price.where(price > 0)
        return _by_unique(price, lambda p: f"{p:.2f}")
    return _present(col)


def product_text(df: pd.DataFrame, template: str | None = None) -> pd.Series:
    """The text the cross-encoder sees for each product row of ``df`` (a ``catalog`` frame).

    ``template`` (default :data:`DEFAULT_PRODUCT_TEXT_TEMPLATE`; callers with settings pass
    ``settings.product_text_template``) names fields of :data:`PRODUCT_TEXT_FIELDS`.  Only
    *present* fields are written, per row: a null, empty or placeholder value ("unknown",
    "nan", "none", "null", any case) drops together with its separator, so a product without
    brand and description reads ``"<title> | <category>"``, never ``"<title> |  | ..."``.
    Columns the frame lacks count as absent.  Texts are cut at 2000 characters.
    """
    prefix, parts, suffix = parse_text_template(template or DEFAULT_PRODUCT_TEXT_TEMPLATE)
    text: pd.Series | None = None
    for sep, name in parts:
        value = _field(df, name)
        if text is None:
            text = value
        else:
            text = (text + sep + value).fillna(text).fillna(value)
    assert text is not None
    text = text.fillna("")
    if prefix or suffix:
        text = prefix + text + suffix
    return text.str.slice(0, PRODUCT_TEXT_MAX_CHARS)


# ---- query text ---------------------------------------------------------------------------------

def normalize_query(text: str | None) -> str:
    """The canonical form of a search query: Unicode NFKC, lower case, stripped, inner
    whitespace runs collapsed to one space.  Nothing else (no stemming, no punctuation
    removal).  Idempotent: ``normalize_query(normalize_query(q)) == normalize_query(q)``.
    ``None`` gives ``""``.
    """
    import unicodedata

    if text is None:
        return ""
    if not isinstance(text, str):
        text = str(text)
    # NFKC again after lower(): lower-casing can leave a string that NFKC would still change
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).lower())
    return " ".join(text.split())


def normalize_queries(queries: pd.Series) -> pd.Series:
    """:func:`normalize_query` over a Series (once per distinct value); nulls stay null.

    Returns a ``string`` Series with the input's index.
    """
    values = queries.astype(object).where(queries.notna(), None)
    return _by_unique(values, normalize_query)
