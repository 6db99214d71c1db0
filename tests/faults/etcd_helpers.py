"""A real etcd server on loopback, paddle.distributed.launch commands that rendezvous through it, and what
the training log of a job they restart says.

Paddle's launcher restarts a failed job in place only with an etcd master (`--master etcd://HOST:PORT`,
its CollectiveElasticController); without one it runs the job once, whatever --elastic_level and
--max_restart say. It then needs Debian's `etcd-server` (the `etcd` binary) and the Python client
`etcd3`, whose generated protobuf code loads only with PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python
on protobuf 4 and later. Tests that need them skip where they are missing, and fail instead where
PPMOCO_REQUIRE_ETCD=1 forbids the skip.
"""
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from ppmoco.engine.restart import JOB_FILE

from fault_helpers import free_port, launch_cmd, training_pids

SWITCH = "PPMOCO_REQUIRE_ETCD"
# The launcher imports etcd3 (generated with an old protoc); its gRPC channel, opened before the launcher
# forks its workers, must not run fork handlers in them (a worker then aborted with SIGABRT at start-up).
LAUNCHER_ENV = {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python", "GRPC_ENABLE_FORK_SUPPORT": "0"}


def etcd_or_skip():
    """The etcd binary's path; a skip where etcd-server or the etcd3 client is missing (a failure where
    PPMOCO_REQUIRE_ETCD=1)."""
    binary = shutil.which("etcd")
    missing = [what for what, there in (("etcd-server (apt install etcd-server)", binary),
                                        ("the etcd3 Python client (pip install etcd3)",
                                         importlib.util.find_spec("etcd3"))) if not there]
    if missing:
        if os.environ.get(SWITCH) == "1":
            pytest.fail(f"{SWITCH}=1 but {' and '.join(missing)} is not installed", pytrace=False)
        pytest.skip(f"{' and '.join(missing)} is not installed: Paddle's launcher restarts in place only "
                    "with an etcd master")
    return binary


@contextlib.contextmanager
def etcd_server(folder, timeout=30):
    """An etcd server of its own (data and log in `folder`) on loopback; yields 'etcd://127.0.0.1:PORT'."""
    binary = etcd_or_skip()
    client, peer = free_port(), free_port()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "etcd.log"), "w") as log:
        proc = subprocess.Popen(
            [binary, "--data-dir", os.path.join(folder, "data"), "--name", "default",
             "--listen-client-urls", f"http://127.0.0.1:{client}",
             "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"etcd exited with {proc.returncode}; see {folder}/etcd.log"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", client), timeout=1):
                break
            assert time.monotonic() < end, f"etcd did not listen within {timeout} s; see {folder}/etcd.log"
            time.sleep(0.05)
        yield f"etcd://127.0.0.1:{client}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def elastic_launch_cmd(log_dir, master, *args, max_restart=3, nproc=2, nnodes="1", launch_args=()):
    """One node's `paddle.distributed.launch` that restarts the job in place (elastic level 1) through
    etcd `master`, of a job of `nnodes` nodes ('MIN:MAX': elastic), with `launch_args` besides, followed by
    `args` (the script and its arguments)."""
    return launch_cmd(log_dir, "--master", master, "--nnodes", nnodes, "--nproc_per_node", str(nproc),
                      "--elastic_level", "1", "--max_restart", str(max_restart), *launch_args, *args)


def launcher_env():
    return {**os.environ, **LAUNCHER_ENV}


def stop_launch(proc, out):
    """End launcher `proc` and every training process it left writing to `out` (workers run in sessions
    of their own, so ending the launcher alone may leave them)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for pid in training_pids(out):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)



def steps_logged(out):
    log = out / "train.log"
    return log.read_text().count("[train] epoch") if log.exists() else 0


def restart_line(out, number):
    """The checkpoint named by the log line of restart `number` (`... going on from <checkpoint>`), or None."""
    log = out / "train.log"
    found = re.search(rf"restart {number} of this launcher job: going on from (\S+)", log.read_text()) \
        if log.exists() else None
    return found and found.group(1)


def before_restart(out):
    """(the last checkpoint saved, the steps logged) before the log's first restart line."""
    text = (out / "train.log").read_text().split("restart 1 of this launcher job")[0]
    return re.findall(r"saved checkpoint (\S+)", text)[-1], text.count("[train] epoch")


def stepped_after_restart(out):
    text = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    return "restart 1 of this launcher job" in text and "[train] epoch" in text.split("restart 1 of this")[1]


def attempts(out):
    return json.loads((out / JOB_FILE).read_text())["attempts"]


def stopped_at(source, checkpoint, out):
    """`out` as a run stopped at `source`'s `checkpoint` leaves it: that checkpoint (a copy), named by `latest`."""
    shutil.copytree(source / checkpoint, out / checkpoint)
    (out / "latest").write_text(checkpoint + "\n")
    return out
