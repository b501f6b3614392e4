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


def product_text(df: pd.DataFrame) -> pd.Series:
    """The text the cross-encoder sees for a product: title, brand, category, description."""
    parts = [df["title"].fillna("")]
    for col in ("brand", "category", "description"):
        if col in df.columns:
            parts.append(df[col].fillna(""))
    text = parts[0]
    for p in parts[1:]:
        text = text + " | " + p
    return text.str.slice(0, 2000)
