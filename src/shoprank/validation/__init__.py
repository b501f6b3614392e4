"""Data contracts enforced with Great Expectations: suites, quarantine, drift, Data Docs.

Public API::

    validate_partition(storage, dataset, day, run_id, options=None, *, catalog_ids=None) -> ValidationOutcome
    validate_frame(df, dataset, day, options=None, *, previous_row_count=None,
                   catalog_product_ids=None, run_id="adhoc") -> ValidationOutcome
    check_drift(storage, dataset, day, options=None, run_id=None, current=None) -> DriftReport
    compute_drift(current, reference, dataset, options=None, day="", reference_day=None) -> DriftReport
    build_suite(dataset, options=None) -> great_expectations.ExpectationSuite
    ValidationOptions / DriftOptions (thresholds; from_env(), from_mapping())

Exceptions: EmptyPartition (skip the day; its subclass IncompletePartition: no _SUCCESS marker
yet, wait), ValidationFailed (quarantined; subclasses MalformedPartition and DriftDetected),
all under ValidationError.

Great Expectations is imported lazily (it takes ~4 s), on the first validation.
"""

from shoprank.validation.drift import DriftMetric, DriftReport, check_drift, compute_drift, drift_report_key, psi
from shoprank.validation.errors import (
    DriftDetected,
    EmptyPartition,
    IncompletePartition,
    MalformedPartition,
    ValidationError,
    ValidationFailed,
)
from shoprank.validation.options import DriftOptions, ValidationOptions
from shoprank.validation.reading import RawBatch, ReadIssue, read_files
from shoprank.validation.runner import (
    DOCS_INDEX_KEY,
    DOCS_PREFIX,
    CheckFailure,
    ValidationOutcome,
    validate_frame,
    validate_partition,
)
from shoprank.validation.suites import SUITES, add_derived_columns, build_suite, check_names, suite_parameters

__all__ = [
    "DOCS_INDEX_KEY", "DOCS_PREFIX", "SUITES", "CheckFailure", "DriftDetected", "DriftMetric", "DriftOptions",
    "DriftReport", "EmptyPartition", "IncompletePartition", "MalformedPartition", "RawBatch", "ReadIssue", "ValidationError",
    "ValidationFailed", "ValidationOptions", "ValidationOutcome", "add_derived_columns", "build_suite",
    "check_drift", "check_names", "compute_drift", "drift_report_key", "psi", "read_files",
    "suite_parameters", "validate_frame", "validate_partition",
]
