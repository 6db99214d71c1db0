"""The SVM benchmarks' cost on synthetic features, measured: `svm` and `lowshot_svm` (ppmoco/eval/svm.py)
with the default grid of Eval.svm.costs, the default low-shot ks and draws, at the size docs/evaluation.md quotes.

    python tools/benchmark_svm.py --train 1440 --test 360 --dims 512 --classes 10 --json output/bench_svm.json

Features are Gaussian clusters (seeded); the times are wall-clock seconds of this run with
--workers threads (default: every CPU of the process).
"""
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run, tool_parser  # noqa: E402
from ppmoco.fileio import write_text_atomic  # noqa: E402


def parse(argv):
    parser = tool_parser(__doc__)
    parser.add_argument("--train", type=int, default=1440, help="training images")
    parser.add_argument("--test", type=int, default=360, help="evaluation images")
    parser.add_argument("--dims", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    from ppmoco.config import SCHEMA
    from ppmoco.eval.svm import lowshot_scores, svm_scores
    from ppmoco.fast_path import cpu_info

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.classes, args.dims))

    def clusters(n):
        labels = np.arange(n) % args.classes
        return (centres[labels] + rng.normal(0, 3, (n, args.dims))).astype(np.float32), labels

    (train_x, train_y), (test_x, test_y) = clusters(args.train), clusters(args.test)
    svm, low = SCHEMA["Eval"]["svm"], SCHEMA["Eval"]["lowshot"]
    common = (train_x, train_y, test_x, test_y, args.classes, svm["costs"])
    start = time.perf_counter()
    svm_scores(*common, svm["cv_folds"], workers=args.workers)
    svm_s = time.perf_counter() - start
    start = time.perf_counter()
    lowshot_scores(*common, low["ks"], low["samples"], low["seed"], workers=args.workers)
    result = {**{k: v for k, v in vars(args).items() if k not in ("json", "debug")}, "costs": len(svm["costs"]),
              "svm_s": round(svm_s, 1), "lowshot_svm_s": round(time.perf_counter() - start, 1), "cpu": cpu_info()}
    print(json.dumps(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    run(main)
