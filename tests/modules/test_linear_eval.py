import numpy as np
import paddle
import pytest

from ppmoco.metrics import numpy_topk_accuracy as classification_accuracy
from ppmoco.modules.linear_eval import LinearEval

TINY = {"name": "resnet18", "widths": [4, 8, 8, 16], "cifar_stem": True}


def test_only_the_fc_layer_trains_and_the_backbone_stays_frozen_in_eval_mode():
    paddle.seed(0)
    module = LinearEval(base_encoder=TINY, num_classes=3)
    module.train()
    assert not module.backbone.training and module.classifier.training
    trainable = module.trainable_parameters()
    assert [id(p) for p in trainable] == [id(module.classifier.fc.weight), id(module.classifier.fc.bias)]
    before = {k: v.numpy().copy() for k, v in module.backbone.state_dict().items()}
    fc_before = module.classifier.fc.weight.numpy().copy()
    opt = paddle.optimizer.Momentum(30.0, momentum=0.9, parameters=trainable, weight_decay=0.0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        images = paddle.to_tensor(rng.standard_normal((8, 3, 16, 16)).astype("float32"))
        labels = paddle.to_tensor(rng.integers(0, 3, 8).astype("int64"))
        out = module.training_step([images, labels])
        out.loss.backward()
        opt.step()
        opt.clear_grad()
    for k, v in module.backbone.state_dict().items():  # weights and BN running statistics
        np.testing.assert_array_equal(v.numpy(), before[k], err_msg=k)
    assert not np.array_equal(module.classifier.fc.weight.numpy(), fc_before)
    module.on_epoch_end(1)  # the reference's sanity check passes


def test_sanity_check_catches_a_changed_backbone():
    module = LinearEval(base_encoder=TINY, num_classes=3)
    module.backbone.conv1.weight.set_value(module.backbone.conv1.weight + 1)
    with pytest.raises(RuntimeError, match="conv1.weight changed"):
        module.check_backbone_unchanged()


def test_fc_init_is_normal_001_with_zero_bias():
    paddle.seed(1)
    module = LinearEval(base_encoder=dict(TINY, widths=[4, 8, 8, 256]), num_classes=100)
    w = module.classifier.fc.weight.numpy()
    assert abs(w.std() - 0.01) < 0.001 and abs(w.mean()) < 0.001
    assert not module.classifier.fc.bias.numpy().any()


def test_classification_accuracy_by_hand():
    logits = np.array([[3, 2, 1], [1, 3, 2], [1, 2, 3], [3, 1, 2]], dtype="float32")
    labels = np.array([0, 2, 0, 1])
    # top-1 right: sample 0 only; with 3 classes, top-5 covers every class
    assert classification_accuracy(logits, labels) == {"top1": 25.0, "top5": 100.0}
    wide = np.tile(np.arange(7, dtype="float32"), (2, 1))  # class 6 best, class 0 worst
    assert classification_accuracy(wide, np.array([1, 2])) == {"top1": 0.0, "top5": 50.0}
