"""Scorers: callables ``score_fn(df) -> np.ndarray`` giving one relevance score per row.

``df`` has at least ``query`` and ``text`` (and usually ``product_id``); higher scores rank
first.  Any callable with that signature can be evaluated (a served model behind HTTP, a
champion loaded from MLflow, ...); two come with shoprank:

* :class:`BM25Scorer` - the lexical baseline, as a shop's search engine scores: Lucene BM25
  (k1=1.2, b=0.75) with IDF and average length over the **whole validated catalogue** the
  snapshot used (:class:`shoprank.lexical.Bm25Stats`, equal to ``bm25s``'s Lucene scores).
  Without catalogue statistics it falls back to the older *per-candidate* variant, where
  each query's own candidates are the corpus (``BM25Scorer(per_candidate=True)`` selects it
  explicitly; ``idf="okapi"`` there selects rank_bm25's floored Okapi IDF).
  Tokenisation (:func:`shoprank.lexical.tokenize`): lowercase runs of letters/digits, no
  stemming or stop words.
* :class:`CrossEncoderScorer` - a fine-tuned cross-encoder from a ``save_pretrained``
  directory (batched, ``torch.inference_mode``, pairs sorted by length for tight padding).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from shoprank.lexical import Bm25Stats, tokenize

log = logging.getLogger(__name__)

ScoreFn = Callable[[pd.DataFrame], np.ndarray]

bm25_tokenize = tokenize  # the one tokenizer of shoprank.lexical


def _bm25_class(idf: str):
    from rank_bm25 import BM25Okapi

    if idf == "okapi":
        return BM25Okapi
    if idf != "lucene":
        raise ValueError(f"idf={idf!r}: choose 'lucene' or 'okapi'")

    class LuceneIdfBM25(BM25Okapi):
        def _calc_idf(self, nd: dict[str, int]) -> None:
            n = self.corpus_size
            self.idf = {word: math.log(1.0 + (n - freq + 0.5) / (freq + 0.5)) for word, freq in nd.items()}
            self.average_idf = sum(self.idf.values()) / max(1, len(self.idf))

    return LuceneIdfBM25


class BM25Scorer:
    """Lucene BM25 with catalogue statistics, else per candidate set (see module docstring)."""

    def __init__(self, stats: Bm25Stats | None = None, *, k1: float = 1.2, b: float = 0.75, idf: str = "lucene",
                 epsilon: float = 0.25):
        self.stats = stats
        self.k1, self.b, self.epsilon = k1, b, epsilon
        self.idf = idf
        self._cls = _bm25_class(idf)

    @property
    def mode(self) -> str:
        return "catalogue" if self.stats is not None else "per-candidate"

    def __call__(self, df: pd.DataFrame) -> np.ndarray:
        if self.stats is not None:
            return self.stats.score_pairs(df["query"].astype(str).tolist(), df["text"].fillna("").astype(str).tolist())
        return self._per_candidate(df)

    def _per_candidate(self, df: pd.DataFrame) -> np.ndarray:
        scores = np.zeros(len(df), dtype=np.float64)
        texts = df["text"].fillna("").astype(str).to_numpy()
        codes, queries = pd.factorize(df["query"].astype(str), sort=False)
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        for rows in np.split(order, bounds):
            if len(rows) == 0:
                continue
            corpus = [bm25_tokenize(t) for t in texts[rows]]
            q_tokens = bm25_tokenize(queries[codes[rows[0]]])
            if not q_tokens or not any(corpus):  # nothing to match: all candidates tie at 0
                continue
            bm25 = self._cls(corpus, k1=self.k1, b=self.b, epsilon=self.epsilon)
            scores[rows] = bm25.get_scores(q_tokens)
        return scores


class CrossEncoderScorer:
    """Scores (query, text) pairs with a sequence-classification model (one logit)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int = 64,
        batch_size: int = 64,
        device: str | None = None,
    ):
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.last_pairs_per_s: float | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, max_length: int | None = None, batch_size: int = 64,
                 device: str | None = None) -> "CrossEncoderScorer":
        """Load a model saved by training (``save_pretrained``); ``max_length`` defaults to training's."""
        from shoprank.models import TRAINING_META_FILE, load_cross_encoder, load_tokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a saved model directory (no config.json)")
        if max_length is None:
            meta_path = model_dir / TRAINING_META_FILE
            meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
            max_length = int(meta.get("max_length", 64))
        return cls(load_cross_encoder(str(model_dir)), load_tokenizer(str(model_dir)),
                   max_length=max_length, batch_size=batch_size, device=device)

    def __call__(self, df: pd.DataFrame) -> np.ndarray:
        import torch

        t0 = time.perf_counter()
        queries = df["query"].astype(str).tolist()
        texts = df["text"].fillna("").astype(str).tolist()
        enc = self.tokenizer(queries, texts, truncation="longest_first", max_length=self.max_length, padding=False)
        lengths = np.array([len(x) for x in enc["input_ids"]])
        order = np.argsort(-lengths, kind="stable")
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        pad_id = self.tokenizer.pad_token_id or 0
        out = np.empty(len(df), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                width = int(lengths[idx].max())
                batch = {}
                for k in keys:
                    arr = np.full((len(idx), width), pad_id if k == "input_ids" else 0, dtype=np.int64)
                    for row, i in enumerate(idx):
                        seq = enc[k][i]
                        arr[row, : len(seq)] = seq
                    batch[k] = torch.from_numpy(arr).to(self.device)
                logits = self.model(**batch).logits.squeeze(-1).float()
                out[idx] = logits.cpu().numpy()
        dt = time.perf_counter() - t0
        self.last_pairs_per_s = len(df) / dt if dt > 0 else None
        return out
