"""tools/train.py end to end on the embedded digits data, and exact resume."""
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from optional_deps import bfloat16_units_or_skip

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
pytestmark = pytest.mark.slow

# Small and quick: 32 images per step, K = 4 steps of keys.
FAST = ["Data.Train.sampler.batch_size=32", "Model.model.K=128", "Engine.logging_freq=1",
        "Model.model.base_encoder.widths=[8,16,16,16]", "Model.model.projector.hidden_dim=32",
        "Model.model.dim=16"]


def train(config, out_dir, *overrides, expect=0):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", os.path.join(ROOT, "configs", config),
           "-o", f"Engine.save_load.output_dir={out_dir}"]
    for o in (*FAST, *overrides):
        cmd += ["-o", o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def train_log_losses(out_dir):
    lines = [line for line in (out_dir / "train.log").read_text().splitlines() if "[train]" in line]
    return [float(line.split("loss: ")[1].split(",")[0]) for line in lines]


@pytest.mark.parametrize("config", ["mocov1_pt_digits_1n2c.yaml", "mocov2_pt_digits_1n2c.yaml"])
def test_pretrain_digits_few_steps(tmp_path, config):
    out = tmp_path / "run"
    proc = train(config, out, "Engine.max_steps=3")
    losses = train_log_losses(out)
    assert len(losses) == 3 and all(np.isfinite(losses))
    for field in ("lr: ", "acc1: ", "batch_cost: ", "ips: ", "eta: "):
        assert field in proc.stdout
    assert (out / "config.yaml").is_file() and (out / "step_3" / "model.pdparams").is_file()
    assert (out / "latest").read_text().strip() == "step_3"
    from visualdl import LogReader
    [log] = [p for p in (out / "vdl").iterdir() if p.name.startswith("vdlrecords")]
    tags = LogReader(file_path=str(log)).get_tags()
    assert "train/loss" in tags["scalar"] and tags["image"] == ["train/views"]  # the views grid, at the start
    # The run's report: the -o changes against the config file, curves, checkpoints.
    report = (out / "report.md").read_text()
    assert f"wrote {out / 'report.md'}" in proc.stdout
    assert "| `Engine.max_steps` | `-1` | `3` |" in report and "| `Model.model.K` | `1024` | `128` |" in report
    assert "`Model.model.T`" not in report  # unchanged keys are not listed
    assert "![curves](curves.png)" in report and (out / "curves.png").is_file()
    assert "| `step_3` |" in report and "`latest` names `step_3`." in report and "No evaluation ran." in report


def _final_state(out_dir, name):
    return paddle.load(str(out_dir / name / "model.pdparams"))


def test_resume_at_epoch_boundary_with_ckpt_dir(tmp_path):
    """FleetX's way: -o Engine.save_load.ckpt_dir=<epoch folder>."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["Data.Train.sampler.batch_size=256", "Model.model.K=256", "Engine.save_load.save_epoch=1",
              "Engine.eval_freq=-1"]
    train("mocov1_pt_digits_1n2c.yaml", straight, *common, "Engine.num_train_epochs=2")
    train("mocov1_pt_digits_1n2c.yaml", resumed, *common, "Engine.num_train_epochs=2", "Engine.max_steps=5")
    assert (resumed / "epoch_1").is_dir()
    train("mocov1_pt_digits_1n2c.yaml", resumed, *common, "Engine.num_train_epochs=2",
          f"Engine.save_load.ckpt_dir={resumed / 'epoch_1'}")
    a, b = _final_state(straight, "epoch_2"), _final_state(resumed, "epoch_2")
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_float16_on_cpu_says_it_computes_float32_and_does(tmp_path, level):
    """Paddle applies float16 AMP on GPU only (tests/engine/test_amp.py checks what the GPU path is
    handed); on CPU the run must say so and compute exactly the eager float32 run, loss scaling
    included (a power of two, undone exactly). Catches a silent claim of mixed precision on CPU and
    a loss scale that is applied but not undone."""
    fp32, amp = tmp_path / "fp32", tmp_path / "amp"
    common = ["Engine.max_steps=2", "Engine.eval_freq=-1", "Engine.execution=eager"]
    train("mocov2_pt_digits_1n2c.yaml", fp32, *common)
    proc = train("mocov2_pt_digits_1n2c.yaml", amp, *common, "Engine.mix_precision.enable=true",
                 "Engine.mix_precision.dtype=float16", f"Engine.mix_precision.level={level}")
    assert "Engine.mix_precision: float16 is GPU-only in Paddle" in proc.stdout + proc.stderr
    assert train_log_losses(amp) == train_log_losses(fp32)


def test_bfloat16_on_cpu_trains_with_bfloat16_convolutions(tmp_path):
    """The run's step computes its convolutions in bfloat16 and says so; its losses
    follow float32's to bfloat16's rounding: the first step's from the same state (measured 0.1%),
    the later ones drifting as the weights and the queue part (1.3% at the third). Catches: the
    setting ignored on CPU (equal losses)."""
    bfloat16_units_or_skip()
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    common = ["Engine.max_steps=3", "Engine.eval_freq=-1", "Engine.logging_freq=1"]
    train("mocov2_pt_digits_1n2c.yaml", fp32, *common)
    train("mocov2_pt_digits_1n2c.yaml", bf16, *common, "Engine.mix_precision.enable=true",
          "Engine.mix_precision.dtype=bfloat16", "Engine.mix_precision.level=O2")
    log = (bf16 / "train.log").read_text()
    assert "each, onednn convolutions in bfloat16)" in log
    losses, reference = np.array(train_log_losses(bf16)), np.array(train_log_losses(fp32))
    assert len(losses) == 3 and not np.array_equal(losses, reference)
    np.testing.assert_allclose(losses[0], reference[0], rtol=5e-3)
    np.testing.assert_allclose(losses, reference, rtol=5e-2)


def test_max_steps_ending_on_an_epoch_boundary_still_saves(tmp_path):
    out = tmp_path / "run"  # 1437 images / 256 = 5 steps per epoch; save_epoch alone would not save
    train("mocov2_pt_digits_1n2c.yaml", out, "Data.Train.sampler.batch_size=256", "Model.model.K=256",
          "Engine.max_steps=5", "Engine.eval_freq=-1", "Engine.save_load.save_epoch=50")
    assert (out / "latest").read_text().strip() == "epoch_1"


def test_a_run_prints_none_of_paddles_start_up_chatter(tmp_path):
    """Paddle's C++ INFO lines ("I1130 12:00:00 ... New Executor is Running"), its ccache notice and
    BatchNorm's global-statistics note do not reach the console of a normal run (a single process,
    whose evaluation fast path logs the most)."""
    proc = train("mocov2_pt_digits_1n2c.yaml", tmp_path / "run", "Engine.max_steps=1")
    console = proc.stdout + proc.stderr
    assert "[train]" in console  # the run's own lines do
    for chatter in ("No ccache found", "we now always track global mean", "New Executor is Running"):
        assert chatter not in console
    assert not [line for line in console.splitlines() if line[:1] == "I" and line[1:5].isdigit()]


# Catches: the meter restarted at every epoch start, which dropped the steps after an epoch's last
# log line (here steps 1-2 of epoch 1 from the line at step 3).
def test_log_lines_average_every_step_since_the_last_line_across_epochs(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests", "faults"))
    from fault_helpers import SMALL_DATA, image_tree

    image_tree(tmp_path / "images")  # 16 images: 2 steps of 8 per epoch
    tiny = [*SMALL_DATA, f"Data.Train.dataset.root={tmp_path / 'images'}", "Model.model.bn_splits=1",
            "Engine.eval_freq=-1", "Engine.max_steps=4"]
    train("mocov2_pt_digits_1n2c.yaml", tmp_path / "every", *tiny)
    train("mocov2_pt_digits_1n2c.yaml", tmp_path / "third", *tiny, "Engine.logging_freq=3")
    every, third = train_log_losses(tmp_path / "every"), train_log_losses(tmp_path / "third")
    assert len(every) == 4 and len(third) == 2
    assert third[0] == pytest.approx(np.mean(every[:3]), abs=2e-4)  # log lines round to 4 decimals
    assert third[1] == pytest.approx(every[3], abs=1e-4)


# Catches: a MoCo v3 config the Engine cannot run (the LARS / AdamW sections, the ViT over the digits
# base's ResNet keys, before_step's progress), and a step that does not train (loss not finite).
@pytest.mark.parametrize("config, optimizer", [("mocov3_pt_digits_1n2c.yaml", "LARS"),
                                               ("mocov3_pt_vit_digits_1n2c.yaml", "AdamW")])
def test_mocov3_pretrains_on_digits_a_few_steps(tmp_path, config, optimizer):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", os.path.join(ROOT, "configs", config)]
    for o in (f"Engine.save_load.output_dir={out}", "Data.Train.sampler.batch_size=32", "Engine.logging_freq=1",
              "Engine.max_steps=3", "Model.model.mlp_dim=32", "Model.model.dim=16"):
        cmd += ["-o", o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = train_log_losses(out)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert f"name: {optimizer}" in (out / "config.yaml").read_text()
