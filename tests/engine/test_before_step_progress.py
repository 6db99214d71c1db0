"""Module.before_step receives where the run is (Progress), on a straight run and a resumed one, and
the momentum schedule helpers built on it."""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "faults"))
from ppmoco.config import load_config  # noqa: E402
from ppmoco.engine import Engine, setup_environment  # noqa: E402
from ppmoco.modules import Progress, build_module  # noqa: E402
from ppmoco.modules.momentum import cosine_momentum  # noqa: E402

from fault_helpers import DIGITS_V2, FAST  # noqa: E402

STEPS_PER_EPOCH = 1437 // 32  # the digits training set in batches of 32, the last one dropped


def _fit_recording(out, *overrides):
    """Train the tiny digits MoCo and return the Progress of each step its before_step saw."""
    cfg = load_config(DIGITS_V2, [f"Engine.save_load.output_dir={out}", *FAST, "Engine.num_train_epochs=2",
                                  *overrides])
    engine = Engine(cfg, build_module(cfg["Model"]), setup_environment(cfg["Global"], cfg["Distributed"]))
    seen, real = [], engine.module.before_step

    def before_step(progress):
        seen.append(progress)
        real(progress)

    engine.module.before_step = before_step
    engine.fit()
    return seen


# Catches: before_step given the epoch without the batch fraction, the step counted from 1, the
# total of one epoch, and a resumed run restarting its count at 0 or at the epoch's start.
def test_before_step_sees_each_steps_progress_and_a_resumed_run_continues_it(tmp_path):
    total = 2 * STEPS_PER_EPOCH
    expected = [Progress(e + b / STEPS_PER_EPOCH, e * STEPS_PER_EPOCH + b, total)
                for e in range(2) for b in range(STEPS_PER_EPOCH)]
    stop = STEPS_PER_EPOCH + 5
    first = _fit_recording(tmp_path / "run", f"Engine.max_steps={stop}", f"Engine.save_load.save_steps={stop}")
    assert first == expected[:stop]
    rest = _fit_recording(tmp_path / "run", "Engine.save_load.auto_resume=true")  # from step_<stop>
    assert rest == expected[stop:]
    assert Progress(0.5, 3, 4).fraction == 0.75


# Catches: the cosine run backwards (m falling from 1 to base), a linear ramp, and cos(fraction)
# without pi; checked against moco-v3's adjust_moco_momentum at its own iterations.
def test_cosine_momentum_is_moco_v3s_schedule():
    base, total = 0.99, 1000
    for it in (0, 1, 250, 500, 999):
        reference = 1.0 - 0.5 * (1.0 + math.cos(math.pi * it / total)) * (1.0 - base)
        assert cosine_momentum(base, it / total) == pytest.approx(reference, abs=1e-15)
    ms = np.array([cosine_momentum(base, f) for f in np.linspace(0, 1, 11)])
    assert ms[0] == base and ms[-1] == 1.0 and np.all(np.diff(ms) > 0)
    assert ms[5] == pytest.approx((base + 1) / 2, abs=1e-12)
