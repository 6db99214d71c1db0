"""Paths only a GPU run takes, reproduced on the CPU: checkpoints under O2 mixed precision (the cast
`paddle.amp.decorate(level="O2")` applies on a GPU is ppmoco.paddle_internals.o2_cast), the random
state of another number of visible GPUs, the float16 loss scaler's state, the non-finite step guard
under O2, and resuming on nodes that do not share the output folder.

What only a GPU exercises: the optimizer step on float16/bfloat16 parameters (Paddle's CPU has no
such kernel), so the O2 master weights here are put into the optimizer as a GPU step would make them,
and the GPU generator calls are stood in for where a test says so."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest

from ppmoco import paddle_internals as internals
from ppmoco.engine import rng
from ppmoco.engine.checkpoint import load_checkpoint, load_trainer_state, save_checkpoint
from ppmoco.engine.engine import _FiniteGuard
from ppmoco.engine.step import TrainStep
from ppmoco.safe_pickle import load_paddle

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "faults"))
from fault_helpers import TRAIN, describe, free_port, launch_cmd, train_args, worker_logs  # noqa: E402

STATE = {"epoch": 0, "next_batch": 1, "global_step": 1}


class Net(paddle.nn.Layer):
    """A layer O2 casts (Linear) and one it keeps float32 (BatchNorm), as in the encoders."""

    def __init__(self):
        super().__init__()
        self.fc = paddle.nn.Linear(6, 4)
        self.bn = paddle.nn.BatchNorm1D(4)

    def trainable_parameters(self):
        return [p for p in self.parameters() if not p.stop_gradient]


def o2_net(shift=0, cast=True):
    """(net, optimizer, float32 weights): `net` O2-cast with the optimizer's float32 master weights set
    as the GPU's first step makes them. `shift` layers built before move Paddle's parameter names."""
    for _ in range(shift):
        paddle.nn.Linear(2, 2)
    paddle.seed(3)
    net = Net()
    with paddle.no_grad():  # values bfloat16 cannot hold, so a cast shows
        net.fc.weight.set_value(paddle.randn(net.fc.weight.shape) / 3)
    weights = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    optimizer = paddle.optimizer.Momentum(learning_rate=0.1, momentum=0.9, parameters=net.parameters(),
                                          multi_precision=True)
    if cast:
        optimizer.set_state_dict({"master_weights": {p.name: paddle.to_tensor(weights[n])
                                                     for n, p in net.named_parameters() if n.startswith("fc.")}})
        internals.o2_cast([net.fc], "bfloat16")
    return net, optimizer, weights


def test_o2_checkpoints_hold_the_float32_master_weights(tmp_path):
    # catches: model.pdparams written as module.state_dict() (bfloat16 query weights under O2)
    net, optimizer, weights = o2_net()
    assert net.fc.weight.dtype == paddle.bfloat16
    save_checkpoint(str(tmp_path), "step_1", net, optimizer, STATE)
    saved = load_paddle(str(tmp_path / "step_1" / "model.pdparams"))
    assert {k: str(v.dtype) for k, v in saved.items()} == {k: "paddle.float32" for k in weights}
    for key, value in weights.items():
        np.testing.assert_array_equal(saved[key].numpy(), value, err_msg=key)  # not the bfloat16 rounding
    assert not np.array_equal(net.fc.weight.astype("float32").numpy(), weights["fc.weight"])


def test_an_o2_checkpoint_resumes_with_o2_or_without_it(tmp_path):
    # catches: float32 weights set into bfloat16 parameters ("Variable dtype not match"), and O2's master
    # weights keyed by Paddle's parameter names, which another build order changes
    net, optimizer, weights = o2_net()
    save_checkpoint(str(tmp_path), "step_1", net, optimizer, STATE)
    again, again_optimizer, _ = o2_net(shift=3)
    assert [p.name for p in again.parameters()] != [p.name for p in net.parameters()]
    load_checkpoint(str(tmp_path / "step_1"), again, again_optimizer)
    masters = again_optimizer.state_dict()["master_weights"]
    for name, param in again.named_parameters():
        if name.startswith("fc."):
            assert param.dtype == paddle.bfloat16
            np.testing.assert_array_equal(masters[param.name].numpy(), weights[name], err_msg=name)
    plain, plain_optimizer, _ = o2_net(shift=1, cast=False)
    load_checkpoint(str(tmp_path / "step_1"), plain, plain_optimizer)
    for key, value in plain.state_dict().items():
        assert value.dtype == paddle.float32
        np.testing.assert_array_equal(value.numpy(), weights[key], err_msg=key)


def test_a_float32_checkpoint_resumes_under_o2(tmp_path):
    plain, plain_optimizer, weights = o2_net(cast=False)
    save_checkpoint(str(tmp_path), "step_1", plain, plain_optimizer, STATE)
    net, optimizer, _ = o2_net(shift=2)
    load_checkpoint(str(tmp_path / "step_1"), net, optimizer)
    np.testing.assert_array_equal(net.fc.weight.numpy(), paddle.to_tensor(weights["fc.weight"]).astype(
        "bfloat16").numpy())


def fake_gpu_state(cpu_state, device):
    """A generator state as a GPU's (its device field is the GPU's index)."""
    _, seed, offset, engine = cpu_state.__getstate__()
    return internals.rng_state_from_tuples([(device, seed + device, offset, engine)])[0]


def test_the_cpu_generator_round_trips_through_a_checkpoint(tmp_path):
    paddle.seed(11)
    paddle.rand([3])
    net, optimizer, _ = o2_net(cast=False)
    save_checkpoint(str(tmp_path), "step_1", net, optimizer, dict(STATE, rng_state=rng.capture_random_state("cpu")))
    expected = paddle.rand([5]).numpy()
    paddle.seed(0)
    assert rng.restore_random_state(load_trainer_state(str(tmp_path / "step_1"))["rng_state"], "cpu") is None
    np.testing.assert_array_equal(paddle.rand([5]).numpy(), expected)


def test_a_checkpoint_of_several_gpus_resumes_on_the_cpu(caplog):
    # catches: paddle.set_rng_state(saved list) raising "Length of cpu state list should be equal to 1"
    # (an older GPU checkpoint holds one state per visible GPU)
    cpu = paddle.get_rng_state("cpu")[0]
    saved = [fake_gpu_state(cpu, 0), fake_gpu_state(cpu, 1)]
    assert rng.restore_random_state(saved, "cpu") == "the GPU generator's state (this run is on the cpu)"


@pytest.mark.parametrize("saved_gpus, index, restored", [
    ([0, 1, 2, 3, 4, 5, 6, 7], 3, 3),  # an older checkpoint of 8 visible GPUs on a run that sees 4
    ([0], 2, 0),  # a checkpoint's one GPU state (rank 0's) on any GPU
    ([0, 1], 3, None),  # 2 GPUs' states and this process on GPU 3: nothing to restore
])
def test_this_gpus_generator_is_restored_whatever_the_gpu_count(monkeypatch, saved_gpus, index, restored):
    # Stands in for the GPU generator calls: 4 visible GPUs, this process on GPU `index`.
    cpu = paddle.get_rng_state("cpu")[0]
    current = [fake_gpu_state(cpu, i) for i in range(4)]
    written = []
    monkeypatch.setattr(paddle, "get_device", lambda: f"gpu:{index}")
    monkeypatch.setattr(paddle, "get_cuda_rng_state", lambda: list(current))
    monkeypatch.setattr(paddle, "set_cuda_rng_state", written.append)
    saved = [cpu] + [fake_gpu_state(cpu, i) for i in saved_gpus]
    assert len(rng.capture_random_state("gpu")) == 2
    lost = rng.restore_random_state(saved, "gpu")
    if restored is None:
        assert "GPU 3's generator state" in lost and written == []
    else:
        assert lost is None and len(written) == 1 and len(written[0]) == 4
        assert written[0][index].__getstate__()[:2] == saved[1 + saved_gpus.index(restored)].__getstate__()[:2]


AMP_FLOAT16 = {"enable": True, "dtype": "float16", "level": "O1", "scale_loss": 1024.0,
               "custom_white_list": [], "custom_black_list": []}


def enabled_scaler_step():
    net, optimizer, _ = o2_net(cast=False)
    step = TrainStep(net, optimizer, AMP_FLOAT16)
    step.scaler._enable = True  # as on a GPU: Paddle disables the scaler on the CPU, and its state with it
    step.scaler.load_state_dict({"scale": np.array([1024.0], "float32"), "incr_ratio": 2.0, "decr_ratio": 0.5,
                                 "incr_every_n_steps": 1000, "decr_every_n_nan_or_inf": 2, "incr_count": 0,
                                 "decr_count": 0, "use_dynamic_loss_scaling": True})
    return step


def test_the_loss_scaler_state_is_saved_and_restored(tmp_path):
    # catches: a resumed float16 run starting its loss scale afresh (Engine.mix_precision.scale_loss)
    step = enabled_scaler_step()
    step.scaler.load_state_dict(dict(step.scaler.state_dict(), scale=np.array([256.0], "float32"),
                                     incr_count=17, decr_count=1))
    save_checkpoint(str(tmp_path), "step_1", step.module, step.optimizer,
                    dict(STATE, loss_scaler=step.scaler_state()))
    json.dumps(step.scaler_state())  # the trainer state is JSON
    resumed = enabled_scaler_step()
    resumed.load_scaler_state(load_trainer_state(str(tmp_path / "step_1"))["loss_scaler"], "step_1")
    state = resumed.scaler.state_dict()
    assert float(state["scale"][0]) == 256.0 and (state["incr_count"], state["decr_count"]) == (17, 1)


def test_a_skipped_first_step_under_o2_keeps_the_master_weights():
    # catches: the guard zero-filling optimizer state the bad step created, O2's master weights
    # among it (Paddle makes them inside optimizer.step() before it checks for overflow), which the
    # next update would then write into the query encoder
    net, optimizer, weights = o2_net(cast=False)
    internals.o2_cast([net.fc], "bfloat16")
    guard = _FiniteGuard(net, optimizer, skip=True, output_dir="unused")

    def diverging_first_step(batch):
        optimizer.set_state_dict({"master_weights": {p.name: paddle.full(p.shape, 7.0, "float32")
                                                     for n, p in net.named_parameters() if n.startswith("fc.")}})
        return {"loss": paddle.to_tensor(float("nan"))}

    assert guard.step(diverging_first_step, None, 1) is None and guard.skipped == 1
    masters = optimizer.state_dict()["master_weights"]
    for name, param in net.named_parameters():
        if name.startswith("fc."):
            np.testing.assert_array_equal(masters[param.name].numpy(), param.astype("float32").numpy())
            assert np.abs(masters[param.name].numpy() - weights[name]).max() < 0.01  # bfloat16 of the weights


@pytest.mark.slow
def test_nodes_without_a_shared_output_dir_refuse_to_resume_then_resume_from_a_copy(tmp_path):
    # Two 1-process "nodes" on loopback, each with its own folder: `run` relative to its own working
    # directory. Rank 0 writes checkpoints into node0/run only. Catches: each rank choosing its own
    # resume point (rank 1 found none and started afresh: diverged or hung in a collective).
    common = ("Engine.save_load.save_steps=2", "Engine.save_load.keep_last=0", "Engine.save_load.auto_resume=true")

    def launch(steps):
        master = f"127.0.0.1:{free_port()}"
        nodes = []
        for rank in (0, 1):
            folder = tmp_path / f"node{rank}"
            folder.mkdir(exist_ok=True)
            nodes.append(subprocess.Popen(
                launch_cmd(folder / "logs", "--nnodes", "2", "--master", master, "--rank", str(rank),
                           "--nproc_per_node", "1", TRAIN, *train_args("run", f"Engine.max_steps={steps}", *common)),
                cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        try:
            return [(node.communicate(timeout=300)[0], node.returncode) for node in nodes]
        finally:
            for node in nodes:
                if node.poll() is None:
                    node.kill()
                    node.wait()

    for output, code in launch(4):
        assert code == 0, output[-3000:] + worker_logs(tmp_path / "node0" / "logs")[-3000:]
    assert (tmp_path / "node0" / "run" / "step_4").is_dir() and not (tmp_path / "node1" / "run" / "step_4").exists()

    results = launch(6)
    logs = [worker_logs(tmp_path / f"node{rank}" / "logs") for rank in (0, 1)]
    for (output, code), log in zip(results, logs):
        assert code != 0, output[-3000:]
        assert "rank(s) 1 cannot read" in log and "run/step_4" in log, log[-3000:]
    assert not (tmp_path / "node0" / "run" / "step_6").exists()

    shutil.copytree(tmp_path / "node0" / "run" / "step_4", tmp_path / "node1" / "run" / "step_4")
    for output, code in launch(6):
        assert code == 0, describe(subprocess.CompletedProcess([], code, output, ""))
    log0 = worker_logs(tmp_path / "node0" / "logs")
    assert "resumed from run/step_4: epoch" in log0 and (tmp_path / "node0" / "run" / "step_6").is_dir()
