"""Print the digits demo's results as a Markdown table: pretrained vs random backbone, kNN and linear."""
import json
import os
import sys


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)["results"]


def main(out_dir):
    rows = []
    for init in ("pretrained", "random"):
        knn = load(os.path.join(out_dir, f"knn_digits_{init}", "eval_results.json"))["knn"]
        linear = load(os.path.join(out_dir, f"lincls_digits_{init}", "eval_results.json"))["linear"]
        rows.append(["MoCo v2 pretrained" if init == "pretrained" else "random init"]
                    + [f"{knn[k]['top1']:.2f}" for k in sorted(knn, key=int)]
                    + [f"{linear['top1']:.2f}", f"{linear['top5']:.2f}"])
    ks = sorted(knn, key=int)
    header = ["backbone"] + [f"kNN k={k} top-1" for k in ks] + ["linear top-1", "linear top-5"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "output")
