"""Learning-rate schedules as pure functions of progress, so a resumed run needs no state.

`progress` is the fractional epoch (epoch + step / steps_per_epoch). With `update_unit: epoch`
(the MoCo reference and FleetX default) the rate changes only at epoch boundaries.
"""
import math

from ppmoco.errors import ConfigError
from ppmoco.registry import Registry

SCHEDULES = Registry("lr schedule")


class _Schedule:
    def __init__(self, learning_rate, warmup_epochs, update_unit):
        # learning_rate > 0 is checked where the config loads (config.LIMITS): every schedule has it
        if update_unit not in ("epoch", "step"):
            raise ConfigError(f"Optimizer.lr.update_unit: '{update_unit}' must be epoch or step")
        self.base, self.warmup, self.unit = learning_rate, warmup_epochs, update_unit

    def __call__(self, progress, total_epochs):
        if self.unit == "epoch":
            progress = math.floor(progress)
        if progress < self.warmup:
            return self.base * (progress + (1 if self.unit == "epoch" else 0)) / self.warmup
        return self.decayed(progress, total_epochs)


@SCHEDULES.register
class CosineDecay(_Schedule):
    """lr * 0.5 * (1 + cos(pi * progress / epochs)), as main_moco.py's --cos. With
    `cosine_after_warmup` the cosine runs over the epochs after the warmup instead,
    lr * 0.5 * (1 + cos(pi * (progress - warmup) / (epochs - warmup))), as the MoCo v2 + SupContrast
    seed's adjust_learning_rate (and PaddleClas's Cosine with warmup) do."""

    def __init__(self, learning_rate=0.03, warmup_epochs=0, update_unit="epoch", cosine_after_warmup=False):
        super().__init__(learning_rate, warmup_epochs, update_unit)
        self.start = warmup_epochs if cosine_after_warmup else 0

    def decayed(self, progress, total_epochs):
        if total_epochs <= self.start:
            raise ConfigError(f"Optimizer.lr.warmup_epochs: {self.start} leaves no epoch of the {total_epochs} "
                              "for the cosine (cosine_after_warmup); lower it or train longer")
        return self.base * 0.5 * (1.0 + math.cos(math.pi * (progress - self.start) / (total_epochs - self.start)))


@SCHEDULES.register
class MultiStepDecay(_Schedule):
    """lr * gamma^(number of milestones passed), as main_moco.py's --schedule."""

    def __init__(self, learning_rate=0.03, milestones=[120, 160], gamma=0.1, warmup_epochs=0,
                 update_unit="epoch"):
        super().__init__(learning_rate, warmup_epochs, update_unit)
        self.milestones, self.gamma = sorted(milestones), gamma

    def decayed(self, progress, total_epochs):
        return self.base * self.gamma ** sum(progress >= m for m in self.milestones)


def build_schedule(lr_cfg):
    """The schedule of `Optimizer.lr`; FleetX's `run_mode` (epoch/step) is its name for update_unit."""
    cfg = dict(lr_cfg)
    name = cfg.pop("name", "CosineDecay")
    if "run_mode" in cfg:
        run_mode = cfg.pop("run_mode")
        if cfg.setdefault("update_unit", run_mode) != run_mode:
            raise ConfigError(f"Optimizer.lr.run_mode: '{run_mode}' contradicts update_unit "
                              f"'{cfg['update_unit']}' (FleetX's name for the same setting); keep one")
    return SCHEDULES.build(name, cfg, "Optimizer.lr")
