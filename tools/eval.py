"""Evaluate a backbone or a trained classifier: python tools/eval.py -c CFG [-o Eval.protocol=knn] [-o k=v].

Eval.protocol=linear (default) scores the trained linear classifier found in
Engine.save_load.ckpt_dir, else output_dir/best, else output_dir/latest.
Eval.protocol=knn runs the kNN benchmark on the backbone named by
Model.model.base_encoder.pretrained (null: the randomly initialised baseline); so do the linear SVM
benchmarks Eval.protocol=svm and Eval.protocol=lowshot_svm, whose features of a pretrained file are
cached in Eval.svm.cache_dir (null: output_dir/features) for the next protocol on the same file.
Results are printed one per line and written to output_dir/eval_results.json.
"""
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import parse_args, run  # noqa: E402
from ppmoco.config import load_config  # noqa: E402
from ppmoco.errors import CheckpointError  # noqa: E402
from ppmoco.fileio import write_text_atomic  # noqa: E402


def classifier_checkpoint(save_load):
    from ppmoco.engine.checkpoint import check_complete, latest_checkpoint

    best = os.path.join(save_load["output_dir"], "best")
    path = save_load["ckpt_dir"] or (best if os.path.isdir(best) else latest_checkpoint(save_load["output_dir"]))
    if path is None:
        raise CheckpointError(f"no trained classifier in {save_load['output_dir']}: train it with "
                              "tools/train.py first, set -o Engine.save_load.ckpt_dir=<checkpoint folder>, "
                              "or use -o Eval.protocol=knn")
    return check_complete(path)


def main(argv=None):
    args = parse_args(__doc__, argv)
    cfg = load_config(args.config, args.override)
    from ppmoco.engine import Engine, setup_environment, setup_logger
    from ppmoco.engine.checkpoint import load_module_weights
    from ppmoco.eval.evaluator import report
    from ppmoco.modules import build_module

    save_load = cfg["Engine"]["save_load"]
    env = setup_environment(cfg["Global"], cfg["Distributed"])
    logger = setup_logger(save_load["output_dir"], env.is_main)
    module = build_module(cfg["Model"])
    engine = Engine(cfg, module, env)
    if cfg["Eval"]["protocol"] == "linear":
        path = classifier_checkpoint(save_load)
        load_module_weights(path, module)
        logger.info(f"evaluating the classifier of {path}")
    pretrained = cfg["Model"]["model"].get("base_encoder", {}).get("pretrained")
    if cfg["Eval"]["protocol"] in ("svm", "lowshot_svm") and pretrained is not None:
        engine.evaluator.cache_features(pretrained, cfg["Eval"]["svm"]["cache_dir"]
                                        or os.path.join(save_load["output_dir"], "features"))
    results = engine.evaluate()
    if env.is_main:
        out = os.path.join(save_load["output_dir"], "eval_results.json")
        write_text_atomic(out, json.dumps({"protocol": cfg["Eval"]["protocol"], "results": report(results)},
                                          indent=1))
        logger.info(f"wrote {out}")


if __name__ == "__main__":
    run(main)
