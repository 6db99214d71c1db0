import math

import paddle
import pytest

from ppmoco.models import LinearClassifier, ProjectionHead


def _kinds(head):
    return [type(layer) for layer in head.children()]


def test_v1_head_is_one_linear():
    head = ProjectionHead(64, 16)
    assert _kinds(head) == [paddle.nn.Linear]
    assert head(paddle.randn([4, 64])).shape == [4, 16]


def test_v2_head_is_mlp():
    head = ProjectionHead(64, 16, hidden_dim=32)
    assert _kinds(head) == [paddle.nn.Linear, paddle.nn.ReLU, paddle.nn.Linear]
    assert [p.shape for p in head.parameters()] == [[64, 32], [32], [32, 16], [16]]
    assert head(paddle.randn([4, 64])).shape == [4, 16]


def test_head_init_like_torch_linear():
    """kaiming_uniform(a=sqrt(5)) and torch's bias init are both U(+-1/sqrt(fan_in))."""
    head = ProjectionHead(256, 512)
    bound = 1 / math.sqrt(256)
    for param in head.parameters():
        values = param.numpy()
        assert abs(values).max() <= bound
        if values.size > 1000:
            assert values.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_linear_classifier_init():
    clf = LinearClassifier(512, 100)
    assert clf.fc.weight.numpy().std() == pytest.approx(0.01, rel=0.05)
    assert abs(clf.fc.weight.numpy().mean()) < 1e-3
    assert (clf.fc.bias.numpy() == 0).all()
    assert clf(paddle.randn([3, 512])).shape == [3, 100]
    assert list(clf.state_dict()) == ["fc.weight", "fc.bias"]
