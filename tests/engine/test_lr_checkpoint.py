import errno
import json
import math
import os
import pickle

import numpy as np
import paddle
import pytest

import ppmoco
from ppmoco.config import load_config
from ppmoco.engine.checkpoint import find_resume_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from ppmoco.engine.lr import build_schedule
from ppmoco.errors import CheckpointError, ConfigError


def test_cosine_per_epoch_matches_main_moco():
    lr = build_schedule({"name": "CosineDecay", "learning_rate": 0.03})
    for epoch in (0, 1, 57, 199):
        expected = 0.03 * 0.5 * (1 + math.cos(math.pi * epoch / 200))
        assert lr(epoch + 0.7, 200) == pytest.approx(expected)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cosine_per_step_and_warmup():
    lr = build_schedule({"name": "CosineDecay", "learning_rate": 0.1, "update_unit": "step", "warmup_epochs": 2})
    assert lr(1.0, 10) == pytest.approx(0.05)
    assert lr(5.5, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5.5 / 10)))


def test_epoch_unit_warmup_starts_at_one_warmup_step_of_the_rate():
    # Per epoch the warmup's first epoch already trains at lr / warmup_epochs (never at 0), and the
    # rate holds within an epoch. Catches: the warmup counted from 0 (an epoch at lr 0).
    lr = build_schedule({"name": "CosineDecay", "learning_rate": 0.1, "warmup_epochs": 4})
    assert [lr(e, 100) for e in (0, 0.9, 1, 3.5)] == pytest.approx([0.025, 0.025, 0.05, 0.1])


def seed_learning_rate(base_lr, epoch, i, iters_per_epoch, epochs, warm_up):
    """The MoCo v2 + SupContrast seed's adjust_learning_rate, written from its formula."""
    t = epoch * iters_per_epoch + i
    if epoch < warm_up:
        return base_lr * t / (warm_up * iters_per_epoch)
    return 0.5 * base_lr * (1 + math.cos(math.pi * (t - warm_up * iters_per_epoch) / ((epochs - warm_up)
                                                                                    * iters_per_epoch)))


def test_cosine_after_warmup_is_the_seeds_schedule_at_every_iteration():
    # Catches: the cosine run over all the epochs from 0 (ppmoco's default form), or warmup per epoch.
    lr = build_schedule({"name": "CosineDecay", "learning_rate": 0.12, "warmup_epochs": 5, "update_unit": "step",
                         "cosine_after_warmup": True})
    iters, epochs = 7, 20
    for epoch in range(epochs):
        for i in range(iters):
            assert lr(epoch + i / iters, epochs) == pytest.approx(seed_learning_rate(0.12, epoch, i, iters, epochs, 5),
                                                                  abs=1e-12), (epoch, i)
    with pytest.raises(ConfigError, match=r"Optimizer.lr.cosine_after_warmup: expected bool"):
        build_schedule({"name": "CosineDecay", "cosine_after_warmup": "yes"})
    with pytest.raises(ConfigError, match=r"Optimizer.lr.warmup_epochs: 5 leaves no epoch of the 5 "):
        lr(6, 5)


def test_the_cifar10_configs_train_with_the_seeds_schedule():
    cfg = load_config(os.path.join(ROOT, "configs", "mocov2_pt_cifar10_1n2c.yaml"))
    lr = cfg["Optimizer"]["lr"]
    assert (lr["update_unit"], lr["warmup_epochs"], lr["cosine_after_warmup"]) == ("step", 5, True)


def test_multistep_matches_main_moco_schedule():
    lr = build_schedule({"name": "MultiStepDecay", "learning_rate": 30.0, "milestones": [60, 80]})
    assert [lr(e, 100) for e in (0, 59.9, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])


def test_schedule_errors_name_the_key():
    with pytest.raises(ConfigError, match="Optimizer.lr: unknown lr schedule 'Cosine'"):
        build_schedule({"name": "Cosine"})
    with pytest.raises(ConfigError, match="Optimizer.lr.milestone: unknown key"):
        build_schedule({"name": "MultiStepDecay", "milestone": [1]})


def _model_and_optimizer(seed):
    paddle.seed(seed)
    net = paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.BatchNorm1D(4))
    opt = paddle.optimizer.Momentum(0.1, parameters=net.parameters())
    net(paddle.randn([5, 3])).sum().backward()
    opt.step()
    return net, opt


def test_checkpoint_roundtrip_rotation_and_latest(tmp_path):
    net, opt = _model_and_optimizer(0)
    for step in (1, 2, 3):
        save_checkpoint(str(tmp_path), f"step_{step}", net, opt,
                        {"epoch": 0, "next_batch": step, "global_step": step}, keep_last=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step_2", "step_3"]
    save_load = {"ckpt_dir": None, "auto_resume": True, "output_dir": str(tmp_path)}
    path = find_resume_checkpoint(save_load)
    assert path.endswith("step_3")
    other, other_opt = _model_and_optimizer(1)
    state = load_checkpoint(path, other, other_opt)
    assert state["global_step"] == 3
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)
    # optimizer state follows the parameters although Paddle named them differently (other seed run)
    velocities = [v for k, v in opt.state_dict().items() if "velocity" in k]
    restored = [v for k, v in other_opt.state_dict().items() if "velocity" in k]
    assert len(velocities) == len(restored) == 4
    assert {p.name for p in net.parameters()}.isdisjoint({p.name for p in other.parameters()})
    for a, b in zip(velocities, restored):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _train(net, opt, steps, seed):
    paddle.seed(seed)
    for _ in range(steps):
        opt.clear_grad()  # _model_and_optimizer leaves its step's gradients
        (net(paddle.randn([5, 3])) * paddle.randn([5, 4])).sum().backward()
        opt.step()


def test_resumed_training_continues_bit_identically(tmp_path):
    """Weights, momentum and the random state read back (by safe_pickle and JSON, not pickle) continue
    the run exactly: catches a momentum or random state not restored, or restored inexactly."""
    net, opt = _model_and_optimizer(0)
    paddle.seed(5)
    save_checkpoint(str(tmp_path), "step_1", net, opt, {"epoch": 0, "next_batch": 1, "global_step": 1,
                                                          "rng_state": paddle.get_rng_state(), "best": None})
    _train(net, opt, 3, seed=paddle.randint(0, 1000, [1]).item())
    other, other_opt = _model_and_optimizer(1)
    state = load_checkpoint(str(tmp_path / "step_1"), other, other_opt)
    paddle.set_rng_state(state["rng_state"])
    _train(other, other_opt, 3, seed=paddle.randint(0, 1000, [1]).item())
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)


def test_trainer_state_is_json_and_old_pickled_ones_still_load(tmp_path):
    """Checkpoints hold no trainer-state pickle any more; those written before (trainer_state.pkl,
    the same dict pickled, Paddle's random state included) still resume, read restricted."""
    net, opt = _model_and_optimizer(0)
    paddle.seed(7)
    state = {"epoch": 2, "next_batch": 3, "global_step": 9, "best": np.float32(41.5), "skipped_steps": 1,
             "rng_state": paddle.get_rng_state()}
    expected_draw = paddle.rand([4]).numpy()
    save_checkpoint(str(tmp_path), "step_9", net, opt, state)
    folder = tmp_path / "step_9"
    assert not (folder / "trainer_state.pkl").exists()
    saved = json.loads((folder / "trainer_state.json").read_text())
    assert json.loads((folder / "meta.json").read_text())["ppmoco_version"] == ppmoco.__version__
    assert {k: saved[k] for k in ("epoch", "next_batch", "global_step", "best", "skipped_steps")} == \
        {"epoch": 2, "next_batch": 3, "global_step": 9, "best": 41.5, "skipped_steps": 1}

    (folder / "trainer_state.json").unlink()
    with open(folder / "trainer_state.pkl", "wb") as f:  # exactly what the old writer did
        pickle.dump(state, f)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["files"]  # nor did it list the files with their checksums
    (folder / "meta.json").write_text(json.dumps(meta))
    save_load = {"ckpt_dir": str(folder), "auto_resume": False, "output_dir": str(tmp_path)}
    loaded = load_checkpoint(find_resume_checkpoint(save_load), *_model_and_optimizer(1))
    assert {k: loaded[k] for k in ("epoch", "next_batch", "global_step", "best", "skipped_steps")} == \
        {"epoch": 2, "next_batch": 3, "global_step": 9, "best": 41.5, "skipped_steps": 1}
    paddle.set_rng_state(loaded["rng_state"])
    np.testing.assert_array_equal(paddle.rand([4]).numpy(), expected_draw)


def test_damaged_trainer_state_is_a_clear_error(tmp_path):
    net, opt = _model_and_optimizer(0)
    save_checkpoint(str(tmp_path), "epoch_1", net, opt, {"epoch": 1, "next_batch": 0, "global_step": 5})
    (tmp_path / "epoch_1" / "trainer_state.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="cannot read .*epoch_1/trainer_state.json: .*damaged"):
        load_checkpoint(str(tmp_path / "epoch_1"), net, opt)


def test_half_written_checkpoint_is_ignored(tmp_path):
    net, opt = _model_and_optimizer(0)
    save_checkpoint(str(tmp_path), "epoch_1", net, opt, {"epoch": 1, "next_batch": 0, "global_step": 5})
    (tmp_path / ".tmp-epoch_2-999").mkdir()  # what a kill during a save leaves behind
    (tmp_path / ".tmp-epoch_2-999" / "model.pdparams").write_bytes(b"partial")
    save_load = {"ckpt_dir": None, "auto_resume": True, "output_dir": str(tmp_path)}
    assert find_resume_checkpoint(save_load).endswith("epoch_1")
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["epoch_1"]
    save_checkpoint(str(tmp_path), "epoch_2", net, opt, {"epoch": 2, "next_batch": 0, "global_step": 10})
    assert not (tmp_path / ".tmp-epoch_2-999").exists()


def test_incomplete_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "epoch_3").mkdir()
    with pytest.raises(CheckpointError, match="epoch_3 is not a complete ppmoco checkpoint"):
        find_resume_checkpoint({"ckpt_dir": str(tmp_path / "epoch_3"), "auto_resume": False,
                                "output_dir": str(tmp_path)})
    net, opt = _model_and_optimizer(0)
    save_checkpoint(str(tmp_path), "epoch_1", net, opt, {"epoch": 1, "next_batch": 0, "global_step": 5})
    wider = paddle.nn.Sequential(paddle.nn.Linear(3, 6), paddle.nn.BatchNorm1D(6))
    with pytest.raises(CheckpointError, match="does not fit this model .shape mismatch"):
        load_checkpoint(str(tmp_path / "epoch_1"), wider, paddle.optimizer.Momentum(0.1, parameters=wider.parameters()))


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    net, opt = _model_and_optimizer(0)
    save_checkpoint(str(tmp_path), "epoch_1", net, opt, {"epoch": 1, "next_batch": 0, "global_step": 5})
    before = (tmp_path / "epoch_1" / "model.pdparams").read_bytes()
    real_save = paddle.save

    def full_disk(obj, path, *a, **kw):
        if path.endswith("optimizer.pdopt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(paddle, "save", full_disk)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*epoch_2: No space left on device"):
        save_checkpoint(str(tmp_path), "epoch_2", net, opt, {"epoch": 2, "next_batch": 0, "global_step": 9})
    assert (tmp_path / "latest").read_text().strip() == "epoch_1"
    assert (tmp_path / "epoch_1" / "model.pdparams").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["epoch_1", "latest"]
