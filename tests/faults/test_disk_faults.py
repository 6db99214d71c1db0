"""Promise 7: a full disk or an unwritable output folder is one clear error and costs no checkpoint;
and a crash while a checkpoint is replaced never leaves a partial one under a real name."""
import os
import resource
import shutil
import sys

import paddle
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ppmoco.engine import checkpoint as ckpt  # noqa: E402

from fault_helpers import CHECKPOINT_FILES, assert_user_error, checkpoints, run_train  # noqa: E402


def _small_file_limit():
    """Child setup: files may not grow past 64 KiB (the log and config fit, model.pdparams does not).

    Python ignores SIGXFSZ, so an oversized write fails with OSError(EFBIG) like a full disk
    would with ENOSPC, through the same code path, without root or a small file system.
    """
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


@pytest.mark.slow
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    run_train(out, "Engine.max_steps=2")
    before = {f: (out / "step_2" / f).read_bytes() for f in CHECKPOINT_FILES}
    proc = run_train(out, "Engine.max_steps=4", "Engine.save_load.save_steps=1",
                     "Engine.save_load.auto_resume=true", expect=2, preexec_fn=_small_file_limit)
    assert_user_error(proc, f"cannot write checkpoint {out / 'step_3'}", "File too large",
                      "earlier checkpoints are intact")
    assert (out / "latest").read_text().strip() == "step_2"
    assert checkpoints(out) == ["step_2"] and not [n for n in os.listdir(out) if n.startswith(".tmp")]
    assert {f: (out / "step_2" / f).read_bytes() for f in CHECKPOINT_FILES} == before


@pytest.mark.slow
@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_output_dir_blocked_by_a_file_is_one_line(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker / "run" if where == "under_a_file" else blocker
    proc = run_train(out, "Engine.max_steps=1", expect=2)
    assert_user_error(proc, f"file system error on {out}", "a file stands where a folder is needed",
                      "Engine.save_load.output_dir")
    assert blocker.read_text() == "not a folder"


class _Killed(BaseException):
    """Stands for SIGKILL: nothing in save_checkpoint may catch it or clean up after it."""


def _net_and_optimizer():
    net = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.BatchNorm1D(4))
    opt = paddle.optimizer.Momentum(0.1, parameters=net.parameters())
    net(paddle.randn([5, 3])).sum().backward()
    opt.step()
    return net, opt


def test_crash_while_replacing_a_checkpoint_leaves_no_partial_one(tmp_path, monkeypatch):
    """Re-saving an existing name (`best`, or a step a resumed run redoes) dies while the old copy
    is being deleted: whatever is left under a checkpoint's real name must still be complete."""
    net, opt = _net_and_optimizer()
    state = {"epoch": 0, "next_batch": 1, "global_step": 1}
    ckpt.save_checkpoint(str(tmp_path), "step_1", net, opt, state)
    ckpt.save_checkpoint(str(tmp_path), "best", net, opt, state, regular=False)
    real_rmtree = shutil.rmtree

    def dies_halfway(path, *args, **kwargs):
        if os.path.isfile(os.path.join(path, "model.pdparams")):
            os.remove(os.path.join(path, "model.pdparams"))  # the first file is gone, then the kill
            raise _Killed()
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_halfway)
    with pytest.raises(_Killed):
        ckpt.save_checkpoint(str(tmp_path), "best", net, opt, dict(state, global_step=2), regular=False)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)

    for name in checkpoints(tmp_path):
        ckpt.check_complete(str(tmp_path / name))
    assert checkpoints(tmp_path) == ["best", "step_1"]
    assert ckpt.list_checkpoints(str(tmp_path))[-1].endswith("best")  # the new copy, global step 2
    ckpt.save_checkpoint(str(tmp_path), "step_3", net, opt, dict(state, global_step=3))
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # the next save cleans up


def test_unwritable_output_dir_at_save_time_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """The output folder turns read-only-like between two saves (os.makedirs of the temp folder fails)."""
    net, opt = _net_and_optimizer()
    ckpt.save_checkpoint(str(tmp_path), "step_1", net, opt, {"epoch": 0, "next_batch": 1, "global_step": 1})
    before = (tmp_path / "step_1" / "model.pdparams").read_bytes()
    real_makedirs = os.makedirs

    def read_only(path, *args, **kwargs):
        if os.path.basename(str(path)).startswith(".tmp-"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.os, "makedirs", read_only)
    with pytest.raises(ckpt.CheckpointError, match="cannot write checkpoint .*step_2: Permission denied"):
        ckpt.save_checkpoint(str(tmp_path), "step_2", net, opt, {"epoch": 0, "next_batch": 2, "global_step": 2})
    assert (tmp_path / "latest").read_text().strip() == "step_1"
    assert (tmp_path / "step_1" / "model.pdparams").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_1"]
