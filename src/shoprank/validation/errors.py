"""Exceptions raised by validation.  Every message is meant to be read by a person in a task log.

Hierarchy::

    ValidationError                 base class, never raised itself
    ├── EmptyPartition              no data files / zero rows: the daily DAG skips the day
    │   └── IncompletePartition     data files but no _SUCCESS marker yet: not validated, skipped
    └── ValidationFailed            the batch was quarantined (carries the outcome)
        ├── MalformedPartition      files could not be read (encoding, truncated Parquet, ...)
        └── DriftDetected           drift beyond a threshold while drift is set to block
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from shoprank.validation.drift import DriftReport
    from shoprank.validation.runner import ValidationOutcome


class ValidationError(RuntimeError):
    """Base class of everything validation raises on purpose."""


class EmptyPartition(ValidationError):
    """The partition has no data files, or its files hold zero rows.

    Not a data-quality failure: the daily DAG skips the day instead of failing.  When files
    with zero rows exist they are still copied to quarantine with a report (``outcome``).
    """

    def __init__(self, message: str, outcome: "ValidationOutcome | None" = None):
        super().__init__(message)
        self.outcome = outcome


class IncompletePartition(EmptyPartition):
    """The partition has data files but no ``_SUCCESS`` marker yet (an upload in progress).

    Nothing is read, quarantined or promoted.  A subclass of :class:`EmptyPartition` so every
    caller that skips an empty day also skips (waits for) an incomplete one; run the
    validation again once the marker exists.
    """


class ValidationFailed(ValidationError):
    """The batch failed its expectation suite; it was copied to quarantine with a report.

    The message names each failing expectation, the column and example bad rows (file and
    row number).  ``outcome`` holds the structured result.
    """

    def __init__(self, message: str, outcome: "ValidationOutcome | None"):
        super().__init__(message)
        self.outcome = outcome


class MalformedPartition(ValidationFailed):
    """One or more files of the partition could not be read (the message names file and problem)."""


class DriftDetected(ValidationFailed):
    """Day-over-day drift beyond a threshold while drift checks are set to block."""

    def __init__(self, message: str, outcome: "ValidationOutcome | None", report: "DriftReport"):
        super().__init__(message, outcome)
        self.report = report
