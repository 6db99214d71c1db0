"""Session fixtures of the transfer tests: the ResNet-50 and ResNet-18 are built once."""
import pytest

from transfer_helpers import realistic_backbone


@pytest.fixture(scope="session")
def r50(tmp_path_factory):
    return realistic_backbone("resnet50", str(tmp_path_factory.mktemp("r50")), seed=50)


@pytest.fixture(scope="session")
def r18(tmp_path_factory):
    return realistic_backbone("resnet18", str(tmp_path_factory.mktemp("r18")), seed=18)
