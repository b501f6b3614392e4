"""shoprank.spark.choose_engine: which engine a feedback day goes to (no Spark started)."""

from __future__ import annotations

import pytest

from shoprank import spark as S
from shoprank.config import EngineSettings

MB = 1024 * 1024
KEYS = ["raw/feedback/dt=2026-11-20/part-00000.parquet", "raw/feedback/dt=2026-11-20/part-00001.parquet"]


def sizes_of(mb_each: float, calls: list):
    def sizes():
        calls.append(1)
        return {k: int(mb_each * MB) for k in KEYS}
    return sizes


@pytest.mark.parametrize("mb_each, want", [(10, "pandas"), (60, "spark")])
def test_auto_weighs_the_parquet_day_against_the_threshold(monkeypatch, mb_each, want):
    monkeypatch.setattr(S, "spark_available", lambda: True)
    calls: list = []
    engine, why = S.choose_engine(EngineSettings(feedback_engine="auto", spark_min_mb=100), KEYS,
                                  sizes_of(mb_each, calls))
    assert engine == want and calls == [1]
    assert f"{2 * mb_each:.1f} MB" in why


def test_auto_stays_on_pandas_without_pyspark_or_java(monkeypatch):
    monkeypatch.setattr(S, "spark_available", lambda: False)
    engine, why = S.choose_engine(EngineSettings(), KEYS, sizes_of(500, []))
    assert engine == "pandas" and "not installed" in why


@pytest.mark.parametrize("mode", ["pandas", "spark"])
def test_an_explicit_engine_lists_no_sizes(mode):
    calls: list = []
    engine, _ = S.choose_engine(EngineSettings(feedback_engine=mode), KEYS, sizes_of(500, calls))
    assert engine == mode and calls == []


@pytest.mark.parametrize("mode", ["auto", "spark"])
def test_a_day_that_is_not_all_parquet_goes_to_the_pandas_reader(mode):
    calls: list = []
    keys = KEYS + ["raw/feedback/dt=2026-11-20/late.csv"]
    engine, why = S.choose_engine(EngineSettings(feedback_engine=mode), keys, sizes_of(500, calls))
    assert engine == "pandas" and "not all Parquet" in why and calls == []
