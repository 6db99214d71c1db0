"""Resuming with another number of processes: at the same global batch it continues at the same image
(and says what is no longer exact); otherwise one line names both geometries and the keys to change."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from ppmoco.data.sampler import DistributedBatchSampler  # noqa: E402
from ppmoco.engine.checkpoint import load_trainer_state  # noqa: E402

from fault_helpers import ROOT, TRAIN, assert_user_error, launch_cmd, run_train, train_args, worker_logs  # noqa: E402


@pytest.mark.parametrize("shuffle, drop_last", [(True, True), (False, False)])
def test_global_batch_k_is_the_same_images_for_any_split_of_the_same_global_batch(shuffle, drop_last):
    # Catches a sampler whose positions depend on the number of processes (rank-major blocks instead of
    # a stride): resuming 2 x 16 as 1 x 32 would then skip or repeat images.
    def global_batches(replicas, batch):
        samplers = [DistributedBatchSampler(100, batch, replicas, rank, shuffle, drop_last, seed=5)
                    for rank in range(replicas)]
        for s in samplers:
            s.set_epoch(3)
        return [sorted(np.concatenate(parts).tolist()) for parts in zip(*(list(s) for s in samplers))]

    assert global_batches(2, 16) == global_batches(1, 32) == global_batches(4, 8)


@pytest.mark.slow
def test_two_processes_resumed_as_one_with_the_same_global_batch(tmp_path):
    # Catches a resume that restarts the epoch or keeps the step count of another geometry, a silent
    # change of what is exact, and a mismatched global batch accepted (it would move to other images).
    out, logs = tmp_path / "run", tmp_path / "logs"
    common = ["Engine.save_load.save_steps=1", "Engine.save_load.auto_resume=true", "Model.model.K=64"]
    two = launch_cmd(logs, "--nproc_per_node", "2", TRAIN,
                     *train_args(out, *common, "Engine.max_steps=2", "Data.Train.sampler.batch_size=16"))
    proc = subprocess.run(two, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, worker_logs(logs)[-3000:]
    state = load_trainer_state(str(out / "step_2"))
    assert (state["processes"], state["batch_size"], state["next_batch"]) == (2, 16, 2)

    wrong = run_train(out, *common, "Engine.max_steps=4", "Data.Train.sampler.batch_size=16", expect=2)
    assert_user_error(wrong, f"{out / 'step_2'} was written by 2 process(es) x batch 16 (global batch 32); this "
                             "run is 1 x 16 (16): resuming at the same image needs the same global batch: set "
                             "Data.Train.sampler.batch_size=32, or run 2 x 16 as before")

    resumed = run_train(out, *common, "Engine.max_steps=4", "Data.Train.sampler.batch_size=32")
    text = resumed.stdout + resumed.stderr
    assert re.search(r"resuming .*step_2 of 2 process\(es\) x batch 16 with 1 x 32: the same global batch 32, so "
                     r"training continues at the same image; BatchNorm statistics now come from 32 images", text)
    assert f"resumed from {out / 'step_2'}: epoch 1, batch 2, global step 2" in text
    state = load_trainer_state(str(out / "step_4"))
    assert (state["processes"], state["batch_size"], state["next_batch"], state["global_step"]) == (1, 32, 4, 4)
