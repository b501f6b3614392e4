import numpy as np
import pandas as pd

from shoprank.evaluation.score_cache import cache_key, cached_scorer


class DictStorage:
    def __init__(self):
        self.objects = {}

    def exists(self, key):
        return key in self.objects

    def get_bytes(self, key):
        return self.objects[key]

    def put_bytes(self, key, data, content_type="application/octet-stream"):
        self.objects[key] = data

    def uri(self, key):
        return f"s3://test/{key}"


def test_scores_are_reused_for_the_same_model_and_rows_only():
    storage, calls = DictStorage(), []

    def score(df):
        calls.append(len(df))
        return np.arange(len(df), dtype=float) / 10

    rows = pd.DataFrame({"query": ["a", "a", "b"], "text": ["x", "y", "z"]})
    champion = cached_scorer(score, storage, "m-123")
    first = champion(rows)
    again = champion(rows.copy())
    assert calls == [3] and np.array_equal(first, again)  # read back, not scored again
    assert list(storage.objects) == [cache_key("m-123", rows)]
    champion(rows.assign(text=["x", "y", "w"]))  # other rows: scored
    cached_scorer(score, storage, "m-456")(rows)  # other model: scored
    cached_scorer(score, storage, None)(rows)  # no model key: never cached
    assert calls == [3, 3, 3, 3] and len(storage.objects) == 3


def test_a_stale_entry_of_another_length_is_not_used():
    storage = DictStorage()
    rows = pd.DataFrame({"query": ["a", "b"], "text": ["x", "y"]})
    key = cache_key("m-1", rows)
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros(5))
    storage.objects[key] = buf.getvalue()
    out = cached_scorer(lambda df: np.ones(len(df)), storage, "m-1")(rows)
    assert out.tolist() == [1.0, 1.0]
