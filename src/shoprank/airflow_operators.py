"""Airflow operators of shoprank (imported by DAG code only: needs Airflow installed)."""

from __future__ import annotations

from airflow.providers.standard.operators.hitl import ApprovalOperator


class RecordedApprovalOperator(ApprovalOperator):
    """ApprovalOperator that also keeps the answer as XCom ``answer``.

    On Reject the stock operator skips its downstream tasks by raising, so its return value
    never reaches XCom; the audit trail needs who rejected and why.
    """

    def execute_complete(self, context, event):
        user = event.get("responded_by_user")
        context["ti"].xcom_push(key="answer", value={
            "chosen_options": list(event.get("chosen_options") or []),
            "params_input": dict(event.get("params_input") or {}),
            "responded_by_user": dict(user) if user else None,
            "responded_at": str(event.get("responded_at") or ""),
        })
        return super().execute_complete(context, event)
