"""The optional hooks of the Module contract: a class either defines one or refuses it clearly."""
import pytest
from hook_modules import Classifier, Features, StepOnly

from ppmoco.errors import PpmocoError
from ppmoco.modules.base import OPTIONAL_HOOKS, Module, UnsupportedHook


def test_supports_tells_defined_from_inherited_refusal():
    # Catches `supports` falling back to hasattr (every hook would look supported) and a check of
    # the instance's own __dict__ only (Classifier's inherited extract_features would look missing).
    assert [Module().supports(h) for h in OPTIONAL_HOOKS] == [False, False, False, False]
    assert [Features().supports(h) for h in OPTIONAL_HOOKS] == [False, False, True, False]
    assert [StepOnly().supports(h) for h in OPTIONAL_HOOKS] == [True, False, True, False]
    assert [Classifier().supports(h) for h in OPTIONAL_HOOKS] == [True, True, True, False]


@pytest.mark.parametrize("hook, args", [("validation_step", ([],)), ("validation_end", ({},)),
                                        ("extract_features", (None,)), ("extract_stages", (None,))])
def test_base_hooks_refuse_with_the_hook_and_class_named(hook, args):
    # Catches a base hook that silently returns None instead of refusing.
    with pytest.raises(UnsupportedHook, match=rf"^Module does not support {hook}\(\)$"):
        getattr(Module(), hook)(*args)


def test_refusal_names_the_subclass_and_is_a_user_error():
    # Catches the message naming the base class instead of the method the user configured.
    with pytest.raises(UnsupportedHook, match=r"^Features does not support validation_step\(\)$"):
        Features().validation_step([])
    assert issubclass(UnsupportedHook, PpmocoError)  # one line and exit code 2 if it ever escapes


class _Backbone:
    def __call__(self, images):
        return ("features", images)


class _StagedBackbone(_Backbone):
    def forward_stages(self, images):
        return ("stages", images)


class _Reads(Module):
    def __init__(self, backbone):
        super().__init__()
        self._backbone = backbone

    def feature_backbone(self):
        return self._backbone


def test_a_feature_backbone_serves_the_extraction_hooks():
    # Catches: a named backbone not serving extract_features; extract_stages claimed for a backbone
    # without stage maps (a Vision Transformer: the SVM protocols would accept it, then fail).
    staged, plain = _Reads(_StagedBackbone()), _Reads(_Backbone())
    assert [staged.supports(h) for h in OPTIONAL_HOOKS] == [False, False, True, True]
    assert [plain.supports(h) for h in OPTIONAL_HOOKS] == [False, False, True, False]
    assert staged.extract_features(1) == ("features", 1) and staged.extract_stages(2) == ("stages", 2)
    assert plain.extract_features(3) == ("features", 3)
    with pytest.raises(UnsupportedHook, match=r"^_Reads does not support extract_stages\(\)$"):
        plain.extract_stages(4)


def test_supports_rejects_a_name_that_is_no_optional_hook():
    # Catches a typo in a protocol's hook list passing as "not supported" instead of failing.
    with pytest.raises(ValueError, match="'training_step' is not an optional Module hook"):
        Module().supports("training_step")
