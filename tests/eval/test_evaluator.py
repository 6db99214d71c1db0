"""The Evaluator's contract with the Engine: refusal of unsupported protocols, flat results, log lines."""
import pytest

from ppmoco.errors import ConfigError
from ppmoco.eval.evaluator import Evaluator
from ppmoco.modules.base import Module


class FeaturesOnly(Module):
    def extract_features(self, images):
        return images


class StepWithoutEnd(FeaturesOnly):
    def validation_step(self, batch):
        return {"x": batch[0]}


def config(protocol):
    """Just what the Evaluator reads before it builds any data."""
    return {"Eval": {"protocol": protocol, "knn": {}}, "Data": {}, "Global": {"seed": 0}}


@pytest.mark.parametrize("module, protocol, message", [
    (FeaturesOnly(), "linear", "FeaturesOnly does not support 'linear'; use knn"),
    (StepWithoutEnd(), "linear", "StepWithoutEnd does not support 'linear'; use knn"),
    (Module(), "knn", "Module does not support 'knn'; use linear"),
])
def test_a_protocol_the_module_cannot_serve_is_a_one_line_config_error(module, protocol, message):
    # Catches the check passing on hooks merely inherited from Module (hasattr is always true now),
    # and a linear check that looks at validation_step but not validation_end.
    with pytest.raises(ConfigError) as err:
        Evaluator(config(protocol), module, env=None)
    assert str(err.value) == f"Eval.protocol: {message}"
