"""The supervised-contrastive MoCo variants through tools/train.py: unlabelled data refused, exact
resume with the label queue on one and on two processes, the label queue filled in rank order."""
import os
import sys

import numpy as np
import pytest

from ppmoco.modules.supcon import EMPTY

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "faults"))
from fault_helpers import (  # noqa: E402
    ROOT,
    SMALL_DATA,
    assert_user_error,
    describe,
    launch_cmd,
    load_weights,
    run,
    run_train,
    save_rgb,
    train_args,
    worker_logs,
)

TRAIN = os.path.join(ROOT, "tools", "train.py")


def config(variant):
    return os.path.join(ROOT, "configs", f"mocov2_supcon_{variant}_pt_digits_1n2c.yaml")


def losses(out_dir):
    lines = [line for line in (out_dir / "train.log").read_text().splitlines() if "[train]" in line]
    return [float(line.split("loss: ")[1].split(",")[0]) for line in lines]


def assert_same_state(a, b):
    """Bit-equal weights, queue, pointer and label queue in checkpoints `a` and `b`."""
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys() and {"queue", "queue_ptr", "queue_labels"} <= set(wa)
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key], err_msg=f"{key}: {a} vs {b}")
    return wa


# Catches: a supervised variant training on unlabelled images (each would be a class of its own).
def test_unlabelled_training_images_are_refused_in_one_line(tmp_path):
    photos = tmp_path / "photos"  # a flat folder: images without classes
    for i in range(8):
        save_rgb(photos / f"{i}.png", seed=i)
    proc = run_train(tmp_path / "run", *SMALL_DATA, f"Data.Train.dataset.root={photos}", config=config("in"),
                     expect=2)
    assert_user_error(proc, "Data.Train.dataset: SupConIn trains on labels, but 8 of 8 images have none")


@pytest.mark.slow
def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    """One process (the CPU fast path): 6 steps straight equal 3 steps, then 3 more resumed, bit for
    bit, the label queue included (resumed partly filled: 96 keys of 128)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, "Engine.max_steps=6", config=config("suploss"))
    run_train(resumed, "Engine.max_steps=3", config=config("suploss"))
    step_3 = load_weights(resumed / "step_3")["queue_labels"]
    assert (step_3[:96] >= 0).all() and (step_3[96:] == EMPTY).all()
    run_train(resumed, "Engine.max_steps=6", "Engine.save_load.auto_resume=true", config=config("suploss"))
    state = assert_same_state(straight / "step_6", resumed / "step_6")
    assert (state["queue_labels"] >= 0).all()  # 192 keys: every slot filled
    assert losses(straight)[3:] == losses(resumed)[3:]


def launch(tmp_path, log_name, *args):
    proc = run(launch_cmd(tmp_path / log_name, "--nproc_per_node", "2", *args))
    assert proc.returncode == 0, describe(proc) + worker_logs(tmp_path / log_name)[-5000:]


@pytest.mark.slow
def test_two_processes_resume_mid_epoch_equal_an_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(tmp_path, "straight", TRAIN, *train_args(straight, "Engine.max_steps=6", config=config("in")))
    launch(tmp_path, "first", TRAIN, *train_args(resumed, "Engine.max_steps=3", config=config("in")))
    launch(tmp_path, "second", TRAIN, *train_args(resumed, "Engine.max_steps=6", "Engine.save_load.auto_resume=true",
                                                  config=config("in")))
    assert "2 process(es) x batch 32" in (straight / "train.log").read_text()
    assert_same_state(straight / "step_6", resumed / "step_6")
    assert losses(straight)[3:] == losses(resumed)[3:]


# Catches: labels gathered out of rank order or not gathered (each rank's own labels beside all keys).
@pytest.mark.slow
def test_two_ranks_enqueue_every_label_beside_its_key_in_rank_order(tmp_path):
    launch(tmp_path, "logs", os.path.join(ROOT, "tests", "engine", "dist_supcon_worker.py"), str(tmp_path))
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    for r in (r0, r1):
        assert r["queue_labels"].tolist() == list(range(8)) + [EMPTY] * 8 and int(r["ptr"][0]) == 8
        np.testing.assert_allclose(r["queue"][:, :8], np.concatenate([r0["keys"], r1["keys"]]).T, atol=1e-6)


# Catches: CIFAR-10 configs that do not run end to end (dataset keys, the kNN bank's dataset, a
# pretrained supervised-contrastive checkpoint the linear evaluation cannot read).
@pytest.mark.slow
def test_the_cifar10_configs_pretrain_monitor_and_evaluate_on_the_archive(tmp_path):
    from cifar_archive import write_cifar10

    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar10(archive, [c % 10 for c in range(16)], [c % 10 for c in range(10)])
    tiny = ["Model.model.base_encoder.name=resnet18", "Model.model.base_encoder.widths=[4,8,8,8]",
            f"Data.Train.dataset.data_file={archive}", f"Data.Eval.dataset.data_file={archive}",
            "Data.Train.sampler.batch_size=8", "Data.Train.loader.num_workers=0", "Data.Eval.loader.num_workers=0",
            "Engine.num_train_epochs=1", "Engine.eval_freq=1", "Engine.logging_freq=1", "Global.num_threads=1"]

    def train(config_name, out, *overrides):
        proc = run([sys.executable, TRAIN, "-c", os.path.join(ROOT, "configs", config_name),
                    *(arg for o in (f"Engine.save_load.output_dir={out}", *tiny, *overrides) for arg in ("-o", o))])
        assert proc.returncode == 0, describe(proc)
        return (out / "train.log").read_text()

    log = train("mocov2_supcon_suploss_pt_cifar10_1n2c.yaml", tmp_path / "pt", "Model.model.projector.hidden_dim=16",
                "Model.model.dim=8", "Model.model.K=16")
    assert "knn k=10 top1=" in log and len(losses(tmp_path / "pt")) == 2
    log = train("moco_lincls_cifar10_1n2c.yaml", tmp_path / "lin",
                f"Model.model.base_encoder.pretrained={tmp_path / 'pt' / 'epoch_1'}")
    assert "linear top1=" in log
