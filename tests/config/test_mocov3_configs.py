"""The MoCo v3 ImageNet configs hold moco-v3's published recipes (CONFIG.md, main_moco.py) and build:
their modules at the published sizes are tested in tests/modules/test_moco_v3.py; here the values and
the two views' pipelines, on a generated folder of photographs."""
import numpy as np
import pytest
from PIL import Image

from ppmoco.config import load_config
from ppmoco.data import build_dataset

# (config, backbone, global batch, lr, warmup, epochs, T, optimizer, weight decay, crop min)
RECIPES = [
    ("mocov3_pt_r50_in1k_2n16c.yaml", "resnet50", 16 * 256, 0.6 * 4096 / 256, 10, 100, 1.0, "LARS", 1e-6, 0.2),
    ("mocov3_pt_vit_small_in1k_1n8c.yaml", "vit_small", 8 * 128, 1.5e-4 * 1024 / 256, 40, 300, 0.2, "AdamW", 0.1,
     0.08),
    ("mocov3_pt_vit_base_in1k_8n64c.yaml", "vit_base", 64 * 64, 1.5e-4 * 4096 / 256, 40, 300, 0.2, "AdamW", 0.1,
     0.08),
]


def _processes(name):
    """The process count a config's name states (`_2n16c` -> 16)."""
    return int(name.rsplit("n", 1)[1].split("c")[0])


# Catches: a recipe value off the published one (lr not scaled by batch / 256, warmup, T, crop min,
# weight decay), the cosine from epoch 0 instead of after the warmup, m constant.
@pytest.mark.parametrize("name, arch, batch, lr, warmup, epochs, T, optimizer, wd, crop_min", RECIPES)
def test_the_pretraining_configs_are_moco_v3s_recipes(name, arch, batch, lr, warmup, epochs, T, optimizer, wd,
                                                       crop_min):
    cfg = load_config(f"configs/{name}", [])
    model, opt = cfg["Model"]["model"], cfg["Optimizer"]
    assert model["base_encoder"]["name"] == arch and model["T"] == T and model["m"] == 0.99 and model["m_cos"]
    assert (model["dim"], model["mlp_dim"]) == (256, 4096)
    assert cfg["Data"]["Train"]["sampler"]["batch_size"] * _processes(name) == batch
    assert opt["name"] == optimizer and opt["weight_decay"] == wd and opt["lr"]["learning_rate"] == pytest.approx(lr)
    assert (opt["lr"]["warmup_epochs"], opt["lr"]["cosine_after_warmup"], opt["lr"]["update_unit"]) == (
        warmup, True, "step")
    assert cfg["Engine"]["num_train_epochs"] == epochs
    assert cfg["Data"]["Train"]["dataset"]["transform_ops"][0]["RandCropImage"]["scale"] == [crop_min, 1.0]


# Catches: the views not asymmetric (blur p 1.0 / 0.1, solarize only in view 2), a config whose
# pipelines do not build, and views of another size.
def test_the_views_are_byols_asymmetric_pair_and_build(tmp_path):
    cfg = load_config("configs/mocov3_pt_r50_in1k_2n16c.yaml", [])
    data = cfg["Data"]["Train"]["dataset"]
    ops = [{name: args for op in data[key] for name, args in op.items()} for key in ("view_trans1", "view_trans2")]
    assert ops[0]["GaussianBlur"]["p"] == 1.0 and ops[1]["GaussianBlur"]["p"] == 0.1
    assert "Solarize" not in ops[0] and ops[1]["Solarize"]["p"] == 0.2
    rng = np.random.default_rng(0)
    for i in range(2):
        (tmp_path / "a").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "a" / f"{i}.jpg")
    dataset = build_dataset(dict(data, root=str(tmp_path)), "Data.Train.dataset", seed=0)
    view1, view2, _ = dataset[0]
    assert view1.shape == view2.shape == (3, 224, 224) and not np.array_equal(view1, view2)
