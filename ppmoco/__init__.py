"""ppmoco: MoCo v1/v2 pretraining on PaddlePaddle and the evaluations that judge it."""
import os
import warnings

__version__ = "0.9.0"

# Start-up chatter of Paddle's that says nothing to a ppmoco user, kept off the console: its C++
# INFO log lines (its warnings and errors still show, and a GLOG_minloglevel the user set wins),
# the ccache notice of its C++-extension helper, and BatchNorm's note on global statistics. Set
# here because the C++ log level is read when Paddle is first imported, which ppmoco precedes.
os.environ.setdefault("GLOG_minloglevel", "1")
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)
warnings.filterwarnings("ignore", message="When training, we now always track global mean", category=UserWarning)


def __getattr__(name):
    """`from ppmoco import load_backbone`, imported on first use: `import ppmoco` must stay free of
    Paddle, because the tools read the config (and set Paddle's environment) before importing it."""
    if name == "load_backbone":
        from ppmoco.models.pretrained import load_backbone
        return load_backbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
