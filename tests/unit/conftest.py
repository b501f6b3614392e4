"""Unit-test helpers (integration tests use real servers instead, see tests/conftest.py)."""

import pandas as pd
import pytest


class RecordingStorage:
    """Records write_partition calls: for unit tests of code that only writes partitions."""

    def __init__(self) -> None:
        self.partitions: dict[tuple[str, str, str], pd.DataFrame] = {}

    def write_partition(self, df, zone, dataset, day):
        day = day.isoformat() if hasattr(day, "isoformat") else str(day)
        self.partitions[(zone, dataset, day)] = df.copy()
        return [f"{zone}/{dataset}/dt={day}/part-00000.parquet"]


@pytest.fixture()
def recording_storage() -> RecordingStorage:
    return RecordingStorage()
