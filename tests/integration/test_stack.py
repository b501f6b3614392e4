"""The stack manager against real processes: clear errors, exact shutdown, data kept."""

import os
import socket
import subprocess

import pytest

from shoprank.stack import Stack, StackError, free_port, prepared_settings

pytestmark = pytest.mark.integration


def _own_stack(tmp_path, **ports):
    env = {"SHOPRANK_HOME": str(tmp_path / "home"), "SHOPRANK_ENV_FILE": str(tmp_path / "none"),
           "SHOPRANK_S3_PORT": str(ports.get("s3", free_port())),
           "SHOPRANK_MLFLOW_PORT": str(ports.get("mlflow", free_port())),
           "SHOPRANK_AIRFLOW_PORT": str(free_port())}
    return Stack(prepared_settings(env))


def test_taken_port_is_named_and_nothing_is_left_running(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    stack = _own_stack(tmp_path, mlflow=taken)
    try:
        with pytest.raises(StackError, match=rf"port {taken} .*SHOPRANK_MLFLOW_PORT"):
            stack.up(("s3", "mlflow"), progress=lambda m: None)
        # s3 had started before mlflow failed: it must have been stopped again
        assert not stack.running("s3")
        assert not list((stack.settings.home / "run").glob("*.json"))
    finally:
        blocker.close()
        stack.down(progress=lambda m: None)


def test_up_twice_then_down_keeps_data_and_stops_only_its_processes(tmp_path):
    stack = _own_stack(tmp_path)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        stack.up(("s3",), progress=lambda m: None)
        pid = stack._record("s3")["pid"]
        stack.up(("s3",), progress=lambda m: None)  # idempotent: same process
        assert stack._record("s3")["pid"] == pid
        from shoprank.storage import Storage

        Storage(stack.settings).put_bytes("raw/keep/me.txt", b"data")
        stack.down(progress=lambda m: None)
        assert not stack.running("s3")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert bystander.poll() is None  # an unrelated process survives
        assert (stack.settings.home / "s3" / stack.settings.bucket / "raw" / "keep" / "me.txt").read_bytes() == b"data"
        stack.up(("s3",), progress=lambda m: None)  # and comes back with the data
        assert Storage(stack.settings).get_bytes("raw/keep/me.txt") == b"data"
    finally:
        stack.down(progress=lambda m: None)
        bystander.kill()


def test_stale_pidfile_is_not_trusted(tmp_path):
    stack = _own_stack(tmp_path)
    stack.run_dir.mkdir(parents=True)
    # a pid that exists (ours) but with a different start time must never be killed
    (stack.run_dir / "s3.json").write_text(
        '{"pid": %d, "pgid": %d, "argv": [], "start_time": "0"}' % (os.getpid(), os.getpgid(0)))
    assert not stack.running("s3")
    assert stack.stop("s3") is False
    assert not (stack.run_dir / "s3.json").exists()
