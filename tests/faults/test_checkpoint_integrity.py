"""Checkpoints damaged after they were written: bit flips and truncations are found by their SHA-256 and
size in meta.json; auto_resume falls back to the newest intact checkpoint, a named one is an error."""
import hashlib
import json
import logging
import os
import re
import sys

import paddle
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ppmoco.engine import checkpoint  # noqa: E402
from ppmoco.engine.checkpoint import check_complete, damage, find_resume_checkpoint, save_checkpoint  # noqa: E402
from ppmoco.errors import CheckpointError  # noqa: E402

from fault_helpers import assert_user_error, run_train  # noqa: E402


def model_and_optimizer():
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.BatchNorm1D(4))
    optimizer = paddle.optimizer.Momentum(0.1, parameters=net.parameters())
    net(paddle.randn([5, 3])).sum().backward()
    optimizer.step()  # so the optimizer has state to save
    return net, optimizer


def save_steps(folder, steps, keep_last=0):
    net, opt = model_and_optimizer()
    for step in steps:
        save_checkpoint(str(folder), f"step_{step}", net, opt, {"epoch": 0, "next_batch": step, "global_step": step},
                        keep_last=keep_last)


def flip_bit(file, offset=-20):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def resume(folder, ckpt_dir=None):
    return find_resume_checkpoint({"ckpt_dir": ckpt_dir, "auto_resume": True, "output_dir": str(folder)})


def test_meta_lists_each_files_size_and_sha256(tmp_path):
    # Catches checksums of the temporary copy's other files, of a file before its last write, or none.
    save_steps(tmp_path, [1])
    files = json.loads((tmp_path / "step_1" / "meta.json").read_text())["files"]
    assert sorted(files) == ["model.pdparams", "optimizer.pdopt", "trainer_state.json"]
    for name, want in files.items():
        data = (tmp_path / "step_1" / name).read_bytes()
        assert want == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert damage(str(tmp_path / "step_1")) is None


@pytest.mark.parametrize("harm, reason", [
    (lambda f: flip_bit(f / "model.pdparams"), "model.pdparams's SHA-256 differs from when it was written"),
    (lambda f: (f / "optimizer.pdopt").write_bytes((f / "optimizer.pdopt").read_bytes()[:-7]),
     r"optimizer.pdopt has \d+ bytes, \d+ when written \(truncated or damaged\)"),
    (lambda f: flip_bit(f / "trainer_state.json", 10), "trainer_state.json's SHA-256 differs"),
    (lambda f: (f / "meta.json").write_text('{"global_st'), None),
])
def test_auto_resume_falls_back_to_the_newest_intact_checkpoint_and_says_why(tmp_path, caplog, harm, reason):
    # Catches auto_resume loading a damaged `latest` (garbage weights, or a crash mid-load), a fall-back
    # to the oldest instead of the newest intact one, and a silent fall-back.
    save_steps(tmp_path, [1, 2, 3])
    harm(tmp_path / "step_3")
    with caplog.at_level(logging.WARNING, logger="ppmoco"):
        assert resume(tmp_path) == str(tmp_path / "step_2")
    assert f"not resuming from {tmp_path / 'step_3'}: " in caplog.text
    assert "resuming from " + str(tmp_path / "step_2") + ", the newest intact checkpoint" in caplog.text
    if reason is not None:
        assert any(re.search(reason, r.getMessage()) for r in caplog.records), caplog.text


def test_a_named_damaged_checkpoint_and_no_intact_one_are_one_line_errors(tmp_path):
    # Catches an explicitly named checkpoint replaced by another without asking, and a run that starts
    # from scratch (overwriting the folder's history) when every checkpoint is damaged.
    save_steps(tmp_path, [1, 2])
    flip_bit(tmp_path / "step_2" / "model.pdparams")
    with pytest.raises(CheckpointError, match=r"checkpoint .*step_2 is damaged: model.pdparams's SHA-256 differs "
                                              r"from when it was written \(damaged\); use another checkpoint"):
        resume(tmp_path, ckpt_dir=str(tmp_path / "step_2"))
    flip_bit(tmp_path / "step_1" / "optimizer.pdopt")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from in .*: step_2: model.pdparams's "
                                              r"SHA-256 .*; step_1: optimizer.pdopt's SHA-256 .*; restore one"):
        resume(tmp_path)


def test_rotation_keeps_older_checkpoints_while_the_new_one_reads_back_damaged(tmp_path, monkeypatch, caplog):
    # Catches keep_last rotating away the last intact checkpoint because a newer, damaged one exists.
    save_steps(tmp_path, [1], keep_last=1)
    real = checkpoint.damage
    monkeypatch.setattr(checkpoint, "damage", lambda p: "simulated" if p.endswith("step_2") else real(p))
    with caplog.at_level(logging.WARNING, logger="ppmoco"):
        save_steps(tmp_path, [2], keep_last=1)
    assert (tmp_path / "step_1").is_dir()
    assert "reads back damaged (simulated); older checkpoints are kept" in caplog.text
    monkeypatch.setattr(checkpoint, "damage", real)
    save_steps(tmp_path, [3], keep_last=1)
    assert not (tmp_path / "step_1").exists() and not (tmp_path / "step_2").exists()
    assert check_complete(str(tmp_path / "step_3"))


@pytest.mark.slow
def test_train_resumes_past_a_damaged_latest_and_refuses_a_named_one(tmp_path):
    out = tmp_path / "run"
    run_train(out, "Engine.max_steps=2", "Engine.save_load.save_steps=1")
    flip_bit(out / "step_2" / "model.pdparams")
    proc = run_train(out, "Engine.max_steps=3", "Engine.save_load.save_steps=1", "Engine.save_load.auto_resume=true")
    assert f"not resuming from {out / 'step_2'}: model.pdparams's SHA-256 differs" in proc.stdout + proc.stderr
    assert f"resumed from {out / 'step_1'}" in proc.stdout + proc.stderr and (out / "step_3").is_dir()
    flip_bit(out / "step_3" / "optimizer.pdopt")
    proc = run_train(out, "Engine.max_steps=4", f"Engine.save_load.ckpt_dir={out / 'step_3'}", expect=2)
    assert_user_error(proc, f"checkpoint {out / 'step_3'} is damaged: optimizer.pdopt's SHA-256 differs")


def test_a_stop_in_the_middle_of_rotation_leaves_only_whole_checkpoints(tmp_path, monkeypatch):
    # catches: rotation deleting an old checkpoint under its own name, which a second Ctrl-C (or a
    # kill) in the middle of the delete leaves half there, listed and `damaged`
    save_steps(tmp_path, [1, 2], keep_last=2)
    real_rmtree = checkpoint.shutil.rmtree

    def interrupted_rmtree(path, ignore_errors=False):
        if "step_1" not in os.path.basename(path):  # another delete (a save's own temporary folders)
            return real_rmtree(path, ignore_errors=ignore_errors)
        os.remove(os.path.join(path, "model.pdparams"))  # part of the delete is done when the stop comes
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save_steps(tmp_path, [3], keep_last=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    listed = checkpoint.list_checkpoints(str(tmp_path))
    assert [os.path.basename(p) for p in listed] == ["step_2", "step_3"]
    assert all(damage(p) is None for p in listed)
    save_steps(tmp_path, [4], keep_last=2)  # the next save removes what the stop left behind
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_3", "step_4"]
