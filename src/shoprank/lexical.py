"""Lexical relevance with catalogue statistics: the BM25 a shop's search engine computes.

A shop's search engine (Lucene, Elasticsearch, OpenSearch) scores a query against a product
with **Okapi BM25 whose IDF and average document length come from the whole index**, i.e.
the catalogue.  This module owns that computation for shoprank, in three places:

* the **baseline** every evaluation compares with (``shoprank.evaluation.BM25Scorer``);
* **hard-negative mining** for training: the catalogue products BM25 ranks highest for a
  query that nobody judged (``CatalogueIndex.top_k``, retrieval with ``bm25s``);
* a **feature** of the learned score fusion (``shoprank.fusion``) at training, evaluation and
  serving time, where only (query, product text) pairs are at hand.

Definitions (Lucene's ``BM25Similarity`` since Lucene 8, as Elasticsearch / OpenSearch score
today; k1 = 1.2, b = 0.75 by default; the constant ``(k1 + 1)`` numerator of older versions is
dropped, which changes no ranking)::

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

with ``N`` the number of catalogue products, ``df(t)`` how many of them contain ``t``,
``avgdl`` their mean length in tokens; a term repeated in the query counts once per
occurrence (as Lucene does for a ``match`` query); a term absent from the catalogue has
``df = 0``.  Tokens: lower-case runs of letters and digits (``\\w+``, ``_`` a separator), no
stemming or stop words, the same for queries and products.

:class:`Bm25Stats` is the whole of the statistics (``N``, ``avgdl``, ``df`` per term) as a
small JSON document, written with each dataset snapshot (``lexical.json``) and shipped
inside every trained model, so the same numbers come out at training, evaluation and
serving.  Its scores equal ``bm25s``'s ``method="lucene"`` scores over the same catalogue
(checked by a unit test); retrieval over the whole catalogue uses ``bm25s`` itself.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

K1, B = 1.2, 0.75
STATS_FILE = "shoprank_lexical.json"  # inside a model directory
SNAPSHOT_STATS = "lexical.json"  # inside datasets/<snapshot>/

_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens (letters/digits runs; '_' treated as a separator)."""
    return [t for t in _TOKEN.findall(str(text).lower().replace("_", " ")) if t]


@dataclass
class Bm25Stats:
    """Catalogue statistics of Lucene BM25 (see the module docstring)."""

    n_docs: int
    avgdl: float
    df: dict[str, int] = field(default_factory=dict)
    k1: float = K1
    b: float = B

    @classmethod
    def from_texts(cls, texts: Iterable[str], k1: float = K1, b: float = B) -> "Bm25Stats":
        return cls.from_tokens([tokenize(t) for t in texts], k1=k1, b=b)

    @classmethod
    def from_tokens(cls, docs: Sequence[Sequence[str]], k1: float = K1, b: float = B) -> "Bm25Stats":
        """Statistics of already tokenised catalogue products (one token list per product)."""
        if not docs:
            raise ValueError("BM25 statistics need at least one catalogue product")
        df: Counter[str] = Counter()
        for tokens in docs:
            df.update(set(tokens))
        return cls(n_docs=len(docs), avgdl=sum(map(len, docs)) / len(docs), df=dict(df), k1=k1, b=b)

    def idf(self, term: str) -> float:
        d = self.df.get(term, 0)
        return math.log(1.0 + (self.n_docs - d + 0.5) / (d + 0.5))

    def score_pairs(self, queries: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """BM25 of each (query, text) pair with the catalogue's IDF and average length."""
        out = np.zeros(len(texts), dtype=np.float64)
        q_cache: dict[str, list[tuple[str, float]]] = {}
        avgdl = self.avgdl if self.avgdl > 0 else 1.0
        for i, (q, text) in enumerate(zip(queries, texts)):
            terms = q_cache.get(q)
            if terms is None:
                terms = [(t, self.idf(t)) for t in tokenize(q)]
                q_cache[q] = terms
            if not terms:
                continue
            tokens = tokenize(text)
            if not tokens:
                continue
            tf = Counter(tokens)
            norm = self.k1 * (1.0 - self.b + self.b * len(tokens) / avgdl)
            s = 0.0
            for t, idf in terms:
                f = tf.get(t, 0)
                if f:
                    s += idf * f / (f + norm)
            out[i] = s
        return out

    def coverage(self, queries: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """IDF-weighted share of the query's distinct terms found in the text (0..1)."""
        out = np.zeros(len(texts), dtype=np.float64)
        for i, (q, text) in enumerate(zip(queries, texts)):
            terms = set(tokenize(q))
            if not terms:
                continue
            present = set(tokenize(text))
            weights = {t: self.idf(t) for t in terms}
            total = sum(weights.values())
            if total > 0:
                out[i] = sum(w for t, w in weights.items() if t in present) / total
        return out

    # ---- persistence ---------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"n_docs": self.n_docs, "avgdl": self.avgdl, "k1": self.k1, "b": self.b,
                           "df": self.df}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "Bm25Stats":
        d = json.loads(raw)
        return cls(n_docs=int(d["n_docs"]), avgdl=float(d["avgdl"]), df={k: int(v) for k, v in d["df"].items()},
                   k1=float(d.get("k1", K1)), b=float(d.get("b", B)))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Bm25Stats":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


class CatalogueIndex:
    """A ``bm25s`` Lucene index over the catalogue, for retrieval (hard negatives), plus its stats."""

    def __init__(self, product_ids: Sequence[str], texts: Sequence[str], k1: float = K1, b: float = B):
        import bm25s

        self.product_ids = np.asarray([str(p) for p in product_ids], dtype=object)
        tokens = [tokenize(t) for t in texts]
        self.stats = Bm25Stats.from_tokens(tokens, k1=k1, b=b)
        self._retriever = bm25s.BM25(method="lucene", idf_method="lucene", k1=k1, b=b)
        # bm25s wants (ids, vocab) or token lists; an empty document still needs a slot
        self._retriever.index([doc or [""] for doc in tokens], show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 of ``query`` against every catalogue product (index order)."""
        terms = [t for t in tokenize(query) if t in self.stats.df]
        if not terms:
            return np.zeros(len(self.product_ids), dtype=np.float64)
        return np.asarray(self._retriever.get_scores(terms), dtype=np.float64)

    def top_k(self, query: str, k: int) -> list[str]:
        """The ``k`` best-scoring product ids for ``query`` (score > 0 only), best first."""
        s = self.scores(query)
        k = min(k, int((s > 0).sum()))
        if k <= 0:
            return []
        idx = np.argpartition(-s, k - 1)[:k]
        idx = idx[np.lexsort((self.product_ids[idx].astype(str), -s[idx]))]
        return [str(p) for p in self.product_ids[idx]]
