"""The first thing to run on a GPU machine: ppmoco's GPU paths, checked in about a minute.

    python tools/check_gpu.py [--device gpu|cpu] [--out DIR]

1. step: one eager MoCo v2 training step on the device equals the CPU step from the same weights on
   the same batch: in float32 (TF32 off) and under float16 autocast (O1), within the bounds below;
2. runs: pretraining on the embedded digits data in float32 and with Engine.mix_precision O1 and O2
   (float16): one epoch with the kNN monitor's evaluation and a checkpoint, then a second run that
   resumes from it, trains on and evaluates again, then tools/eval.py on the last checkpoint.

The step bounds are smoke bounds (they catch a wrong dtype path, a missing kernel, an update off by
a factor), not an exactness proof: the exactness tests are the CPU suite's against PyTorch.
`--device cpu` runs every check on the CPU (the float16 parts are GPU-only and say so), which is how
the tests exercise this tool. Exit 0 when every check passes, 1 when one fails, 2 without a GPU.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run, tool_parser  # noqa: E402
from ppmoco.errors import PpmocoError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/mocov2_pt_digits_1n2c.yaml"
# (loss relative difference, median over tensors of the update's relative difference) vs the CPU step
BOUNDS = {"float32": (1e-3, 1e-2), "float16": (5e-2, 0.2)}
AMP = {"float32": ["Engine.mix_precision.enable=false"],
       "O1 float16": ["Engine.mix_precision.enable=true", "Engine.mix_precision.level=O1",
                      "Engine.mix_precision.dtype=float16"],
       "O2 float16": ["Engine.mix_precision.enable=true", "Engine.mix_precision.level=O2",
                      "Engine.mix_precision.dtype=float16"]}
# Small and quick: one process, 5 steps an epoch, a 256-key queue; BN in one group so the GPU's and
# the CPU's random shuffles of the key batch give the same statistics.
SMALL = ["Data.Train.sampler.batch_size=256", "Model.model.K=512", "Model.model.bn_splits=1", "Engine.logging_freq=1",
         "Engine.eval_freq=1", "Engine.save_load.save_epoch=1", "Data.Train.loader.num_workers=0"]


class NoGpu(PpmocoError):
    """This Paddle sees no CUDA GPU."""


def one_step(cfg, place, initial, batch, amp):
    """(loss, state after the step) of one eager training step on `place` from weights `initial`."""
    import paddle

    from ppmoco.engine.env import RunEnv
    from ppmoco.engine.step import build_train_step
    from ppmoco.modules import build_module

    paddle.set_device(place)
    paddle.seed(cfg["Global"]["seed"])
    module = build_module(cfg["Model"])
    module.set_state_dict({k: paddle.to_tensor(v) for k, v in initial.items()})
    engine = dict(cfg["Engine"], execution="eager", conv="paddle",
                  mix_precision=dict(cfg["Engine"]["mix_precision"], enable=amp != "float32", level="O1",
                                     dtype="float16"))
    env = RunEnv("cpu" if place == "cpu" else "gpu", 1, 0, 1, 1)
    step = build_train_step(engine, cfg["Optimizer"], module, 0.03, env)
    out = step([paddle.to_tensor(t, place=paddle.get_device()) for t in batch])
    return float(out["loss"]), {k: v.astype("float32").numpy() for k, v in step.module.state_dict().items()}


def check_step(device, amp):
    """(passed, line) for the step on `device` in `amp` ("float32" or "float16") against the CPU step."""
    import paddle

    from ppmoco.config import load_config
    from ppmoco.modules import build_module

    cfg = load_config(CONFIG, SMALL + ["Global.device=cpu"])
    paddle.set_device("cpu")
    paddle.seed(cfg["Global"]["seed"])
    initial = {k: v.numpy() for k, v in build_module(cfg["Model"]).state_dict().items()}
    rng = np.random.default_rng(0)
    batch = [rng.standard_normal((64, 3, 16, 16), dtype=np.float32) for _ in range(2)] + [np.arange(64) % 10]
    if device == "gpu":  # TF32 rounds float32 products to 10 bits of mantissa: off for the float32 check
        paddle.set_flags({"FLAGS_allow_tf32_cublas": amp != "float32", "FLAGS_allow_tf32_cudnn": amp != "float32"})
    loss_ref, ref = one_step(cfg, "cpu", initial, batch, "float32")
    loss, got = one_step(cfg, device, initial, batch, amp)
    paddle.set_device("cpu")
    loss_diff = abs(loss - loss_ref) / max(abs(loss_ref), 1e-12)
    updates = []
    for key, after in ref.items():
        change = after - initial[key]
        if np.abs(change).max() > 0:
            updates.append(np.linalg.norm((got[key] - initial[key]) - change) / np.linalg.norm(change))
    spread = float(np.median(updates))
    loss_bound, update_bound = BOUNDS[amp]
    passed = loss_diff <= loss_bound and spread <= update_bound  # also refuses NaN
    return passed, (f"step ({amp}) on {device} vs CPU: loss {loss:.6f} vs {loss_ref:.6f} (relative {loss_diff:.2e}, "
                    f"bound {loss_bound:g}); update median relative difference {spread:.2e} over {len(updates)} "
                    f"tensors (bound {update_bound:g})")


def train(out_dir, device, amp, epochs, resume):
    """Run tools/train.py on the digits data; (exit code, combined output)."""
    overrides = SMALL + AMP[amp] + [f"Global.device={device}", f"Engine.num_train_epochs={epochs}",
                                    f"Engine.save_load.output_dir={out_dir}",
                                    f"Engine.save_load.auto_resume={str(resume).lower()}"]
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", CONFIG]
    for override in overrides:
        cmd += ["-o", override]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def check_runs(out_root, device, amp):
    """(passed, line) for pretraining with `amp`: an epoch, a resumed second one, then tools/eval.py."""
    out = os.path.join(out_root, amp.replace(" ", "_"))
    code, log = train(out, device, amp, 1, False)
    if code != 0:
        return False, f"runs ({amp}): the first epoch failed (exit {code}): {log.strip().splitlines()[-1:]}"
    code, log = train(out, device, amp, 2, True)
    with open(os.path.join(out, "train.log"), encoding="utf-8") as f:
        text = f.read()
    resumed = f"resumed from {os.path.join(out, 'epoch_1')}" in text
    evaluated = text.count("[eval]") >= 2 and os.path.isdir(os.path.join(out, "epoch_2"))
    if code != 0 or not resumed or not evaluated:
        return False, (f"runs ({amp}): the resumed run failed (exit {code}, resumed {resumed}, evaluated twice "
                       f"{evaluated}): {log.strip().splitlines()[-1:]}")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval.py"), "-c", CONFIG, "-o",
                           "Eval.protocol=knn", "-o", f"Model.model.base_encoder.pretrained={out}/epoch_2", "-o",
                           f"Global.device={device}", "-o", f"Engine.save_load.output_dir={out}_eval"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return False, f"runs ({amp}): tools/eval.py failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return True, f"runs ({amp}) on {device}: trained, evaluated, saved, resumed, evaluated again; tools/eval.py knn"


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="where to check (default: gpu)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    import paddle

    if args.device == "gpu" and not (paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count()):
        build = "a CPU build" if not paddle.device.is_compiled_with_cuda() else "no device visible"
        raise NoGpu(f"no CUDA GPU is visible to this Paddle ({build}): install paddlepaddle-gpu as "
                    "docs/getting_started.md says, or run --device cpu to check the CPU path")
    amps = ["float32", "O1 float16", "O2 float16"] if args.device == "gpu" else ["float32"]
    results = [check_step(args.device, "float32")]
    if args.device == "gpu":
        results.append(check_step("gpu", "float16"))
    with tempfile.TemporaryDirectory() as scratch:
        results += [check_runs(args.out or scratch, args.device, amp) for amp in amps]
    for passed, line in results:
        print(f"{'PASS' if passed else 'FAIL'} {line}")
    if args.device == "cpu":
        print("(float16 steps and runs are GPU-only: run with --device gpu on a GPU machine)")
    failed = sum(not passed for passed, _ in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(main))
