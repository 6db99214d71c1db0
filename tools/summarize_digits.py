"""The digits demo's report: python tools/summarize_digits.py [OUTPUT] -> OUTPUT/digits_demo/report.md.
With `--table RUN...` it only prints the results table of those evaluation runs
(OUTPUT/knn_digits_RUN, OUTPUT/lincls_digits_RUN): the supervised-contrastive benchmark
(tools/supcon_digits.sh) compares its pretraining methods that way.

OUTPUT (default `output`) holds the demo's runs (tools/digits_demo.sh). The report has the results
table (pretrained vs random backbone, kNN and linear), the pretraining curves (drawn here from its
VisualDL logs), and the pictures the demo wrote into OUTPUT/digits_demo/: the augmented views
(views.png) and the t-SNE of each backbone's features (tsne_pretrained.png, tsne_random.png). A picture
that is missing is named as missing. The table is also printed.
"""
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run, tool_parser  # noqa: E402
from ppmoco.errors import DataError  # noqa: E402
from ppmoco.fileio import write_bytes_atomic, write_text_atomic  # noqa: E402

PRETRAIN_RUN = "mocov2_pt_digits"
INITS = (("pretrained", "MoCo v2 pretrained"), ("random", "random init"))


def load_results(path):
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing; run tools/digits_demo.sh (or tools/supcon_digits.sh) first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)["results"]


def results_table(out_dir, runs=INITS):
    """Markdown lines of the results table from the evaluation runs' eval_results.json, a row per
    (run, title) of `runs` (default: the demo's pretrained and random backbones)."""
    rows, ks = [], None
    for init, title in runs:
        knn = load_results(os.path.join(out_dir, f"knn_digits_{init}", "eval_results.json"))["knn"]
        linear = load_results(os.path.join(out_dir, f"lincls_digits_{init}", "eval_results.json"))["linear"]
        ks = sorted(knn, key=int)
        rows.append([title] + [f"{knn[k]['top1']:.2f}" for k in ks]
                    + [f"{linear['top1']:.2f}", f"{linear['top5']:.2f}"])
    header = ["backbone"] + [f"kNN k={k} top-1" for k in ks] + ["linear top-1", "linear top-5"]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _picture(report_dir, name, alt):
    if os.path.isfile(os.path.join(report_dir, name)):
        return [f"![{alt}]({name})"]
    return [f"({name} is missing: rerun tools/digits_demo.sh.)"]


def write_digits_report(out_dir):
    """Write OUTPUT/digits_demo/report.md (and its curves.png); return (path, table lines)."""
    from ppmoco.plots import plot_curves, read_scalars

    report_dir = os.path.join(out_dir, "digits_demo")
    os.makedirs(report_dir, exist_ok=True)
    table = results_table(out_dir)
    lines = ["# Digits demo", "", "MoCo v2 pretraining on the embedded digits, then kNN and linear evaluation on "
             "the 360 held-out digits, next to the same backbone with random weights.", "", *table,
             "", "## Augmented views", "", "Each row: a training image, then its two views as pretraining draws them.",
             "", *_picture(report_dir, "views.png", "views"), "", "## Pretraining curves", ""]
    try:
        png, panels = plot_curves(read_scalars(os.path.join(out_dir, PRETRAIN_RUN)))
        write_bytes_atomic(os.path.join(report_dir, "curves.png"), png)
        lines += ["![curves](curves.png)", "", "Panels: " + ", ".join(panels) + "."]
    except DataError as err:
        lines += [f"No curves: {err}."]
    lines += ["", "## Features (t-SNE of the held-out digits, coloured by class)", ""]
    for init, title in INITS:
        lines += [f"{title}:", "", *_picture(report_dir, f"tsne_{init}.png", f"t-SNE, {title}"), ""]
    lines += ["## Runs", ""] + [f"- [{run}](../{run}/report.md)" for run in
                                (PRETRAIN_RUN, "lincls_digits_pretrained", "lincls_digits_random")
                                if os.path.isfile(os.path.join(out_dir, run, "report.md"))]
    path = os.path.join(report_dir, "report.md")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path, table


def main(argv=None):
    parser = tool_parser(__doc__)
    parser.add_argument("output", nargs="?", default="output", help="the folder of the demo's runs (default: output)")
    parser.add_argument("--table", nargs="+", metavar="RUN", help="only print the results table of these runs")
    args = parser.parse_args(argv)
    if args.table:
        print("\n".join(results_table(args.output, [(name, name) for name in args.table])))
        return None
    path, table = write_digits_report(args.output)
    print("\n".join(table))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run(main)
