"""Curves of a run from its VisualDL logs, as one PNG (matplotlib, headless)."""
import glob
import io
import os
import re

from ppmoco.errors import DataError

# (panel title, tags it draws); `{k}` stands for every kNN k found in the logs.
PANELS = (
    ("loss", ["train/loss"]),
    ("learning rate", ["train/lr"]),
    ("training acc1 (%)", ["train/acc1"]),
    ("images/s", ["train/ips"]),
    ("kNN top-1 (%)", ["eval/knn_k{k}_top1"]),
    ("linear top-1 (%)", ["eval/linear_top1"]),
)


def read_scalars(run_dir):
    """{tag: ([step, ...], [value, ...])} from every VisualDL record file of `run_dir`/vdl."""
    from visualdl import LogReader

    files = sorted(glob.glob(os.path.join(run_dir, "vdl", "vdlrecords*")))
    if not files:
        raise DataError(f"{run_dir}: no VisualDL logs (vdl/vdlrecords.*); give the output_dir of a run")
    series = {}
    for path in files:
        reader = LogReader(file_path=path)
        for tag in reader.get_tags().get("scalar", []):
            steps, values = series.setdefault(tag, ([], []))
            for record in reader.get_data("scalar", tag):
                steps.append(record.id)
                values.append(record.value)
    return series


def _panel_tags(patterns, series):
    tags = []
    for pattern in patterns:
        regex = re.compile(re.escape(pattern).replace(re.escape("{k}"), r"(\d+)") + "$")
        matched = [(int(m.group(1)) if m.groups() else 0, tag) for tag in series for m in [regex.match(tag)] if m]
        tags += [tag for _, tag in sorted(matched)]
    return tags


def _pyplot():
    """matplotlib's pyplot on the headless backend (imported on use: only the picture tools need it)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    return pyplot


def _figure(size, dpi, **subplots):
    """A figure of exactly `size` pixels and its axes."""
    return _pyplot().subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, **subplots)


def _png(figure, dpi):
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    _pyplot().close(figure)
    return buffer.getvalue()


def plot_curves(series, size=(1200, 800), dpi=100):
    """PNG bytes of one panel per PANELS entry that has data, and {panel title: [tags drawn]}."""
    panels = [(title, tags) for title, patterns in PANELS if (tags := _panel_tags(patterns, series))]
    if not panels:
        raise DataError("the run's logs hold none of the curves to plot (loss, lr, acc1, images/s, kNN, linear)")
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = _figure(size, dpi, nrows=rows, ncols=columns, squeeze=False)
    for ax, (title, tags) in zip(axes.flat, panels):
        for tag in tags:
            steps, values = series[tag]
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=tag.rsplit("/", 1)[-1])
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(tags) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.tight_layout()
    return _png(figure, dpi), dict(panels)


def plot_embedding(features, labels, size=(800, 800), seed=0, dpi=100):
    """t-SNE (scikit-learn) of `features` [N, D] as a scatter coloured by `labels`: (PNG bytes,
    the [N, 2] coordinates)."""
    from sklearn.manifold import TSNE

    points = TSNE(n_components=2, init="pca", random_state=seed,
                  perplexity=min(30.0, len(features) - 1.0)).fit_transform(features)
    figure, ax = _figure(size, dpi)
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10" if labels.max() < 10 else "tab20", s=8)
    ax.legend(*scatter.legend_elements(num=None), title="class", fontsize="small", loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE: {len(features)} images, {features.shape[1]}-d features", fontsize="medium")
    figure.tight_layout()
    return _png(figure, dpi), points
