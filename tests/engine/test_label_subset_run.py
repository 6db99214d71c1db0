"""A run on a drawn label subset writes the subset into its output folder, and that file trains the
same images again (ppmoco/data/subsets.py; the Engine writes it next to config.yaml)."""
import glob
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "faults"))
from ppmoco.config import load_config  # noqa: E402
from ppmoco.engine import Engine, setup_environment  # noqa: E402
from ppmoco.modules import build_module  # noqa: E402

from fault_helpers import DIGITS_V2, FAST  # noqa: E402


def _engine(out, *overrides):
    cfg = load_config(DIGITS_V2, [f"Engine.save_load.output_dir={out}", *FAST, "Engine.max_steps=1", *overrides])
    return Engine(cfg, build_module(cfg["Model"]), setup_environment(cfg["Global"], cfg["Distributed"]))


# Catches: the drawn subset not written (nothing to reuse or cite), written by a run that drew none,
# or written with other images than the run trained on.
def test_a_run_writes_its_drawn_subset_and_the_file_trains_the_same_images(tmp_path):
    engine = _engine(tmp_path / "drawn", "Data.Train.dataset.label_fraction=0.1", "Data.Train.dataset.label_seed=4")
    assert len(engine.train_set) == 144
    engine.fit()
    path = tmp_path / "drawn" / "label_fraction_0.1_seed4.txt"
    assert path.read_text(encoding="utf-8").splitlines() == [os.path.basename(p) for p, _ in engine.train_set.samples]
    again = _engine(tmp_path / "again", f"Data.Train.dataset.split_file={path}",
                    "Data.Train.dataset.label_fraction=null", "Data.Train.dataset.label_seed=null")
    assert again.train_set.samples == engine.train_set.samples
    again.fit()
    assert not glob.glob(str(tmp_path / "again" / "label_fraction_*"))
