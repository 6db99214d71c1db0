"""One optimisation step of a Module, eager on every device: autocast, backward, gradient
averaging, optimizer update. `build_train_step` is shared by the Engine's loop and
tools/benchmark.py, so the benchmark measures the real step. The optimizer is the one
`Optimizer.name` chooses (ppmoco/optimizers.py); the step treats every optimizer alike.
"""
import contextlib
import logging

import numpy as np
import paddle

from ppmoco.distributed import all_reduce_mean
from ppmoco.errors import ConfigError
from ppmoco.fast_path import cpu_info, has_bfloat16_units
from ppmoco.modules.base import Progress
from ppmoco.ops import OpBuildError, onednn_conv_module, onednn_convolutions
from ppmoco.optimizers import build_optimizer  # the optimizer Optimizer.name chooses

logger = logging.getLogger("ppmoco")


def conv_implementation(setting, env):
    """"onednn" or "paddle": the convolutions `Engine.conv` (`setting`) gives on `env`'s device."""
    if setting == "paddle" or env.device != "cpu":
        return "paddle"
    try:
        onednn_conv_module()
    except OpBuildError as err:
        if setting == "onednn":
            raise ConfigError(f"Engine.conv: onednn: {err}; or set Engine.conv: paddle") from err
        logger.warning(f"Engine.conv: auto: Paddle's convolution is used: {err}")
        return "paddle"
    return "onednn"


def conv_precision(amp, env, conv):
    """What the convolutions compute in: "bfloat16" where Engine.mix_precision (`amp`) asks for it on
    CPU, on ppmoco's operator (`conv` "onednn") and bfloat16 units; else "float32"."""
    if not (amp["enable"] and amp["dtype"] == "bfloat16" and env.device == "cpu"):
        return "float32"
    if conv != "onednn":
        raise ConfigError("Engine.mix_precision: bfloat16 on CPU computes the convolutions on ppmoco's oneDNN "
                          "operator, which this run does not use; set Engine.conv=auto or onednn "
                          "(docs/training.md) or Engine.mix_precision.enable=false")
    cpu = cpu_info()
    if not has_bfloat16_units(cpu):
        raise ConfigError(f"Engine.mix_precision: bfloat16 on CPU needs AVX512-BF16 or AMX-BF16 units, which this "
                          f"CPU ({cpu['model']}) lacks; set Engine.mix_precision.enable=false")
    return "bfloat16"


def build_train_step(engine_cfg, opt_cfg, module, learning_rate, env):
    """The step with the convolutions `Engine.conv` and the precision `Engine.mix_precision` ask for."""
    optimizer = build_optimizer(opt_cfg, module, learning_rate)
    conv = conv_implementation(engine_cfg["conv"], env)
    amp = engine_cfg["mix_precision"]
    conv_dtype = conv_precision(amp, env, conv)
    if amp["enable"] and env.device == "cpu":
        if conv_dtype == "float32":
            logger.warning("Engine.mix_precision: float16 is GPU-only in Paddle (its autocast and O2 cast do "
                           "nothing on CPU); this run computes in float32 (dtype bfloat16 gives bfloat16 "
                           "convolutions on CPUs with bfloat16 units)")
        amp = dict(amp, enable=False)  # bfloat16 is the operator's; every other op stays float32
    return TrainStep(module, optimizer, amp, conv, conv_dtype)


class TrainStep:
    """Callable step; with `Engine.mix_precision` it autocasts and (float16) scales the loss; with
    `conv` "onednn" the module's convolutions run on ppmoco's oneDNN operator, computing in
    `conv_dtype`."""

    def __init__(self, module, optimizer, amp_cfg, conv="paddle", conv_dtype="float32"):
        self.amp, self.conv, self.conv_dtype = amp_cfg, conv, conv_dtype
        self.scaler = None
        if amp_cfg["enable"] and amp_cfg["dtype"] == "float16":
            self.scaler = paddle.amp.GradScaler(init_loss_scaling=amp_cfg["scale_loss"])
        if amp_cfg["enable"] and amp_cfg["level"] == "O2":
            # Only what the method runs in low precision is cast (Module.low_precision_layers);
            # the optimizer keeps float32 master weights of those parameters.
            _, optimizer = paddle.amp.decorate(module.low_precision_layers(), optimizer, level="O2",
                                               dtype=amp_cfg["dtype"])
        self.module, self.optimizer = module, optimizer

    def scaler_state(self):
        """The float16 loss scaler's state as JSON values, for checkpoints ({} without a scaler)."""
        if self.scaler is None:
            return {}
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in self.scaler.state_dict().items()}

    def load_scaler_state(self, state, path):
        """Continue the loss scaling of checkpoint `path` (`state` is its scaler_state(), None when it
        had no scaler): an exact resume under float16 needs the scale and its counters."""
        if self.scaler is None:
            return
        if not state:
            logger.info(f"{path} holds no loss-scaler state (written without float16): the loss scale starts at "
                        f"Engine.mix_precision.scale_loss")
            return
        self.scaler.load_state_dict(dict(state, scale=np.asarray(state["scale"], dtype="float32")))

    def _autocast(self):
        if not self.amp["enable"]:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(level=self.amp["level"], dtype=self.amp["dtype"],
                                    custom_white_list=self.amp["custom_white_list"],
                                    custom_black_list=self.amp["custom_black_list"])

    def convolutions(self):
        """Context in which the module computes its training step with this step's convolutions."""
        if self.conv != "onednn":
            return contextlib.nullcontext()
        return onednn_convolutions(self.module, bfloat16=self.conv_dtype == "bfloat16")

    def __call__(self, batch, progress=Progress()):
        """Run one step on `batch` at `progress` (a Progress, for Module.before_step); return the loss
        and the module's metrics as tensors (no host sync)."""
        with paddle.no_grad():
            self.module.before_step(progress)
        with self._autocast(), self.convolutions():
            out = self.module.training_step(batch)
        (self.scaler.scale(out.loss) if self.scaler else out.loss).backward()
        all_reduce_mean([p.grad for p in self.module.trainable_parameters() if p.grad is not None])
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.clear_grad(set_to_zero=False)  # no gradient buffers kept between steps
        with paddle.no_grad():
            self.module.after_step(out.after_step)
        return out.logged()
