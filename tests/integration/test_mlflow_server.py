"""A real MLflow tracking server whose artifacts are proxied into the real S3 server."""

import mlflow
import pytest

from shoprank.storage import Storage

pytestmark = pytest.mark.integration


def test_run_logged_with_artifact_landing_in_s3(mlflow_server, tmp_path):
    mlflow.set_tracking_uri(mlflow_server.mlflow_tracking_uri)
    mlflow.set_experiment("integration-smoke")
    note = tmp_path / "note.txt"
    note.write_text("hello from the test")
    with mlflow.start_run() as run:
        mlflow.log_param("p", 1)
        mlflow.log_metric("ndcg_at_10", 0.5)
        mlflow.log_artifact(str(note))
    # the client only knows the tracking URI; the server wrote the artifact into S3
    keys = Storage(mlflow_server).list_keys("mlflow-artifacts/")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
    got = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="note.txt",
                                              dst_path=str(tmp_path / "dl"))
    assert open(got).read() == "hello from the test"
