"""Methods (Modules) by the name a config's `Model.module` gives them."""
from ppmoco.fleetx import module_args
from ppmoco.modules.base import Module, Progress, StepOutput
from ppmoco.modules.finetune import FineTune
from ppmoco.modules.linear_eval import LinearEval
from ppmoco.modules.mhead_linear import MultiHeadLinearEval
from ppmoco.modules.moco import MoCo
from ppmoco.modules.moco_v3 import MoCoV3
from ppmoco.modules.supcon import SupConIn, SupConOut, SupConSuploss
from ppmoco.registry import Registry, check_kwargs

MODULES = Registry("module")
MODULES.register(MoCo, name="MOCOModule", aliases=("MoCo",))
MODULES.register(MoCoV3, name="MOCOv3Module", aliases=("MoCoV3",))
MODULES.register(LinearEval, name="MOCOClsModule", aliases=("LinearEval",))
MODULES.register(MultiHeadLinearEval, name="MOCOMultiHeadClsModule", aliases=("MultiHeadLinear",))
MODULES.register(FineTune, name="GeneralClsModule", aliases=("FineTune",))
MODULES.register(SupConIn, name="MOCOSupConInModule", aliases=("SupConIn",))
MODULES.register(SupConOut, name="MOCOSupConOutModule", aliases=("SupConOut",))
MODULES.register(SupConSuploss, name="MOCOSupConSuplossModule", aliases=("SupConSuploss",))


def build_module(model_cfg):
    """Build the Module named by `Model.module` from the `Model` section: `Model.model` holds its
    arguments, in ppmoco's or FleetX's form (ppmoco.fleetx translates and checks the latter)."""
    cls = MODULES.get(model_cfg["module"], "Model.module")
    args = module_args(model_cfg["module"], model_cfg)
    check_kwargs(cls, args, "Model.model")
    return cls(**args)


__all__ = ["Module", "Progress", "StepOutput", "MoCo", "MoCoV3", "LinearEval", "MultiHeadLinearEval", "FineTune",
           "SupConIn", "SupConOut", "SupConSuploss", "MODULES", "build_module"]
