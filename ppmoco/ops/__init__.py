"""ppmoco's C++ operators, compiled on first use into the user's cache.

onednn_conv.cc: the convolution and its gradient on oneDNN, keeping no data between calls
(`Engine.conv: onednn`; ppmoco/ops/conv.py builds, loads and applies it).
"""
from ppmoco.ops.conv import OpBuildError, computes, onednn_conv2d, onednn_conv_module, onednn_convolutions

__all__ = ["OpBuildError", "computes", "onednn_conv2d", "onednn_conv_module", "onednn_convolutions"]
