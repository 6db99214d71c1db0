"""Write a backbone's SVM-benchmark features: python tools/extract_features.py -c CFG [-o k=v] --out FILE.npz

The backbone is Model.model.base_encoder.pretrained (null: random initialisation); the layers are
Eval.svm.layers (feat1..feat5, gap: see ppmoco/feature_layers.py). --split eval (default) reads the
Data.Eval images, --split train the Data.Train images; both under the Data.Eval transforms, in
dataset order. The .npz holds one [N, D] float32 array per layer, `labels` [N] and `paths` [N].
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import parse_args, run  # noqa: E402
from ppmoco.config import load_config  # noqa: E402
from ppmoco.errors import ConfigError  # noqa: E402


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--split", choices=("eval", "train"), default="eval", help="which images (default: eval)")


def main(argv=None):
    args = parse_args(__doc__, argv, add_arguments)
    cfg = load_config(args.config, args.override)
    data = cfg["Data"]
    if data["Eval"] is None:
        raise ConfigError("Data.Eval: not set; features are extracted under its transforms, so give it a dataset")
    from ppmoco.data import build_dataset
    from ppmoco.engine import setup_environment, setup_logger
    from ppmoco.eval.evaluator import bank_dataset_cfg, eval_loader, inference_for
    from ppmoco.eval.features import dataset_features, save_features
    from ppmoco.modules import build_module

    env = setup_environment(cfg["Global"], cfg["Distributed"])
    logger = setup_logger(cfg["Engine"]["save_load"]["output_dir"], env.is_main)
    module = build_module(cfg["Model"])
    if not module.supports("extract_stages"):
        raise ConfigError(f"Model.module: {type(module).__name__} has no backbone stages to extract")
    module.eval()
    dataset_cfg, key = data["Eval"]["dataset"], "Data.Eval.dataset"
    if args.split == "train":
        dataset_cfg, key = bank_dataset_cfg(data["Train"]["dataset"], dataset_cfg), "Data.Train.dataset"
    dataset = build_dataset(dataset_cfg, key, cfg["Global"]["seed"])
    loader = eval_loader(dataset, data["Eval"], env, cfg["Global"]["seed"])
    inference = inference_for(cfg, module, env)
    with inference.session():
        features = dataset_features(module, loader, cfg["Eval"]["svm"]["layers"], f"{args.split} features",
                                    inference=inference)
    if env.is_main:
        save_features(args.out, features)
        logger.info(f"wrote {args.out}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in features.items()))


if __name__ == "__main__":
    run(main, preferred_allocator=True)
