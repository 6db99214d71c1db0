"""Pretrain a few steps, linear-evaluate, and run the kNN benchmark through the tools, on digits."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
pytestmark = pytest.mark.slow
NARROW = "Model.model.base_encoder.widths=[8,16,16,16]"


def run(tool, config, *overrides):
    cmd = [sys.executable, os.path.join(ROOT, "tools", tool), "-c", os.path.join(ROOT, "configs", config)]
    for o in overrides:
        cmd += ["-o", o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_pretrain_then_linear_and_knn(tmp_path):
    pt, lin, knn = (tmp_path / n for n in ("pt", "lin", "knn"))
    run("train.py", "mocov2_pt_digits_1n2c.yaml", f"Engine.save_load.output_dir={pt}", "Engine.max_steps=3",
        "Data.Train.sampler.batch_size=32", "Model.model.K=128", NARROW)
    weights = f"Model.model.base_encoder.pretrained={pt / 'step_3'}"

    out = run("train.py", "moco_lincls_digits_1n2c.yaml", f"Engine.save_load.output_dir={lin}", weights, NARROW,
              "Engine.num_train_epochs=4", "Engine.eval_freq=1", "Data.Train.sampler.batch_size=128",
              "Optimizer.lr.learning_rate=0.1")  # lr 30 needs the recipe's 30 epochs to settle
    # ResNet-18: 20 convolutions + 20 BatchNorms x (weight, bias, mean, variance)
    assert "loaded 100 backbone tensors" in out and "sanity check passed" in out
    logged = [float(line.split("top1=")[1].split()[0]) for line in out.splitlines() if "[eval] linear" in line]
    assert (lin / "best" / "model.pdparams").is_file() and (lin / "latest").read_text().strip() == "epoch_4"

    out = run("eval.py", "moco_lincls_digits_1n2c.yaml", f"Engine.save_load.output_dir={lin}", weights, NARROW)
    results = json.loads((lin / "eval_results.json").read_text())
    assert results["protocol"] == "linear"
    top1 = results["results"]["linear"]["top1"]
    # Ten classes: a probe that never trained (N(0, 0.01) weights) or labels out of step with the
    # images stay near 10%; four epochs on these 3-step features reach about 34%.
    assert top1 > 25
    # best/ is the maximum of the four evaluations (eval.py picks best/ over latest); catches a best
    # overwritten by a later, worse epoch.
    assert len(logged) == 4 and f"{top1:.2f}" == f"{max(logged):.2f}" and max(logged) > min(logged)
    assert f"linear top1={top1:.2f}" in out

    for init in (weights, "Model.model.base_encoder.pretrained=null"):  # two rows of one results table
        out = run("eval.py", "moco_lincls_digits_1n2c.yaml", f"Engine.save_load.output_dir={knn}", init,
                  NARROW, "Eval.protocol=knn")
        results = json.loads((knn / "eval_results.json").read_text())["results"]["knn"]
        assert sorted(results, key=int) == ["10", "20", "100", "200"]
        for k, v in results.items():
            assert 30 < v["top1"] <= v["top5"] <= 100  # chance is 10%; even random features cluster digits
            assert f"knn k={k} top1={v['top1']:.2f} top5={v['top5']:.2f}" in out
    assert "randomly initialised backbone" in out
    # Catches a second checkpoint replacing the first one's row instead of adding its own.
    table = (knn / "eval_results.md").read_text().splitlines()
    rows = [line for line in table if line.startswith(f"| {pt / 'step_3'} |") or line.startswith("| random init |")]
    assert [line.split(" | ")[0] for line in rows] == [f"| {pt / 'step_3'}", "| random init"]
    assert table[table.index("| checkpoint | k=10 | k=20 | k=100 | k=200 |") + 2] == rows[0]
    # The evaluation features go to VisualDL's embedding view, one label per image (360 digits).
    from visualdl import LogReader
    log = sorted(p for p in (knn / "vdl").iterdir() if p.name.startswith("vdlrecords"))[0]  # the pretrained run's
    reader = LogReader(file_path=str(log))
    assert reader.get_tags()["embeddings"] == ["eval/features_step0"]
    [record] = reader.get_data("embeddings", "eval/features_step0")
    assert len(record.embeddings.embeddings) == 360
    assert sorted({e.label[0] for e in record.embeddings.embeddings}) == [str(c) for c in range(10)]


@pytest.mark.parametrize("override,message", [
    ("Eval.knn.ks=[10,0]", "error: Eval.knn.ks: [10, 0] must be a non-empty list of ints > 0; "
                           "e.g. -o Eval.knn.ks=[20,200]"),
    ("Eval.knn.chunk_size=0", "error: Eval.knn.chunk_size: 0 must be > 0; e.g. -o Eval.knn.chunk_size=256"),
    ("Eval.protocol=sgd", "error: Eval.protocol: 'sgd' is not one of linear, knn, svm, lowshot_svm"),
])
def test_bad_knn_settings_are_one_line_errors(tmp_path, override, message):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "eval.py"), "-c",
           os.path.join(ROOT, "configs", "moco_lincls_digits_1n2c.yaml"), "-o", "Eval.protocol=knn",
           "-o", "Model.model.base_encoder.pretrained=null", "-o", f"Engine.save_load.output_dir={tmp_path}",
           "-o", override]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / "eval_results.json").exists()
