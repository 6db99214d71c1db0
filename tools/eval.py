"""Evaluate a backbone or a trained classifier: python tools/eval.py -c CFG [-o Eval.protocol=knn] [-o k=v].

Eval.protocol=linear (default) scores the trained linear classifier found in
Engine.save_load.ckpt_dir, else output_dir/best, else output_dir/latest.
Eval.protocol=knn runs the kNN benchmark on the backbone named by
Model.model.base_encoder.pretrained (null: the randomly initialised baseline); so do the linear SVM
benchmarks Eval.protocol=svm and Eval.protocol=lowshot_svm, whose features of a pretrained file are
cached in Eval.svm.cache_dir (null: output_dir/features) for the next protocol on the same file.
Results are printed one per line and added to output_dir/eval_results.json under the checkpoint
scored (Model.model.base_encoder.pretrained, or "random init"), and output_dir/eval_results.md shows
every checkpoint evaluated into that folder as a row of the benchmark tables (ppmoco/eval/results.py).
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
    from ppmoco.eval.results import RANDOM_INIT, add_results, read_results, results_markdown
    from ppmoco.modules import build_module

    save_load = cfg["Engine"]["save_load"]
    out = os.path.join(save_load["output_dir"], "eval_results.json")
    earlier = read_results(out)  # before the evaluation: a file it cannot add to stops the run now
    env = setup_environment(cfg["Global"], cfg["Distributed"])
    logger = setup_logger(save_load["output_dir"], env.is_main)
    module = build_module(cfg["Model"])
    engine = Engine(cfg, module, env, evaluation=True)
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
        checkpoints = add_results(earlier, RANDOM_INIT if pretrained is None else str(pretrained), report(results))
        write_text_atomic(out, json.dumps({"protocol": cfg["Eval"]["protocol"], "results": report(results),
                                           "checkpoints": checkpoints}, indent=1))
        write_text_atomic(os.path.join(save_load["output_dir"], "eval_results.md"), results_markdown(checkpoints))
        logger.info(f"wrote {out} and eval_results.md ({len(checkpoints)} checkpoints)")


if __name__ == "__main__":
    run(main, preferred_allocator=True)
