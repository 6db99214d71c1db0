"""Methods (Modules) by the name a config's `Model.module` gives them."""
from ppmoco.modules.base import Module
from ppmoco.modules.moco import MoCo
from ppmoco.registry import Registry, check_kwargs

MODULES = Registry("module")
MODULES.register(MoCo, name="MOCOModule", aliases=("MoCo",))


def build_module(model_cfg):
    """Build the Module named by `Model.module` from the arguments in `Model.model`."""
    cls = MODULES.get(model_cfg["module"], "Model.module")
    check_kwargs(cls, model_cfg["model"], "Model.model")
    return cls(**model_cfg["model"])


__all__ = ["Module", "MoCo", "MODULES", "build_module"]
