"""A run's report: output_dir/report.md with what ran, its curves, its evaluation and checkpoints."""
import os

from ppmoco.errors import DataError
from ppmoco.fileio import write_bytes_atomic, write_text_atomic


def _flat(tree, prefix=""):
    """{dotted.key: value} of a nested config (lists stay values)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, path + "."))
        else:
            out[path] = value
    return out


def config_changes(file_cfg, run_cfg):
    """[(key, value in the config file, value this run used)] where the two differ (-o overrides)."""
    before, after = _flat(file_cfg), _flat(run_cfg)
    return [(key, before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


def _checkpoints(output_dir):
    rows = []
    for name in sorted(os.listdir(output_dir)):
        weights = os.path.join(output_dir, name, "model.pdparams")
        if os.path.isfile(weights):
            rows.append((name, os.path.getsize(weights) / 2 ** 20))
    return rows


def write_report(output_dir, config_path, file_cfg, run_cfg, results):
    """Write report.md (and curves.png from the run's VisualDL logs) into `output_dir`; its path.

    `results` is the last evaluation's {protocol: {name: value}}, or None.
    """
    from ppmoco.plots import plot_curves, read_scalars

    lines = ["# Run report", "", f"Config: `{config_path}`", ""]
    changes = config_changes(file_cfg, run_cfg)
    if changes:
        lines += ["Changed from the config file (by `-o`):", "", "| key | config file | this run |", "|---|---|---|"]
        lines += [f"| `{key}` | `{old!r}` | `{new!r}` |" for key, old, new in changes]
    else:
        lines += ["Run with the config file as it is."]
    lines += ["", "## Curves", ""]
    try:
        png, panels = plot_curves(read_scalars(output_dir))
        write_bytes_atomic(os.path.join(output_dir, "curves.png"), png)
        lines += ["![curves](curves.png)", "", "Panels: " + ", ".join(panels) + "."]
    except DataError as err:
        lines += [f"No curves: {err}."]
    lines += ["", "## Evaluation", ""]
    if results:
        for protocol, values in results.items():
            lines += [f"`{protocol}`: " + ", ".join(f"{name} {value:.2f}" for name, value in values.items())]
    else:
        lines += ["No evaluation ran."]
    lines += ["", "## Checkpoints", ""]
    rows = _checkpoints(output_dir)
    latest = os.path.join(output_dir, "latest")
    if rows:
        lines += ["| checkpoint | weights (MiB) |", "|---|---|"] + [f"| `{n}` | {mib:.1f} |" for n, mib in rows]
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as f:
                lines += ["", f"`latest` names `{f.read().strip()}`."]
    else:
        lines += ["None were written."]
    path = os.path.join(output_dir, "report.md")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
