"""Methods (Modules) by the name a config's `Model.module` gives them."""
from ppmoco.modules.base import Module
from ppmoco.modules.linear_eval import LinearEval
from ppmoco.modules.moco import MoCo
from ppmoco.registry import Registry, check_kwargs

MODULES = Registry("module")
MODULES.register(MoCo, name="MOCOModule", aliases=("MoCo",))
MODULES.register(LinearEval, name="MOCOClsModule", aliases=("LinearEval",))


def build_module(model_cfg):
    """Build the Module named by `Model.module` from the arguments in `Model.model`."""
    cls = MODULES.get(model_cfg["module"], "Model.module")
    check_kwargs(cls, model_cfg["model"], "Model.model")
    return cls(**model_cfg["model"])


__all__ = ["Module", "MoCo", "LinearEval", "MODULES", "build_module"]
