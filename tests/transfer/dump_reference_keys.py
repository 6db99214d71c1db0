"""Write reference_keys/*.json: the state-dict names and shapes of the real ResNet classes of the
frameworks tools/convert.py writes for, which the converter's output is tested against.

Run once per framework release, from the folder the packages were installed into without their
dependencies (they pin numpy/opencv versions that do not fit this project; see tests/transfer/
real_frameworks.py for the list and the install line):

    python tests/transfer/dump_reference_keys.py --deps .transfer_deps --torchvision DIR

DIR holds the torchvision wheel unpacked (`pip install --no-deps --target DIR torchvision==0.28.0`).
That wheel is built for CUDA and its package does not import with the CPU torch, so only its
pure-PyTorch `models/resnet.py` is run, inside stand-in parent packages.
"""
import argparse
import importlib
import json
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from real_frameworks import PADDLECLAS, PADDLEDET, import_real_frameworks  # noqa: E402

TORCHVISION = {"release": "torchvision 0.28.0 (PyPI wheel)", "file": "torchvision/models/resnet.py"}


def shapes(state):
    return {name: [int(d) for d in value.shape] for name, value in state.items()}


def torchvision_models(root):
    """torchvision's ResNet factories, run without the package's compiled extension."""
    for name, path in (("torchvision", root), ("torchvision.models", os.path.join(root, "models"))):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    # Only the weights' metadata uses the preset transforms, whose package needs the extension.
    presets = types.ModuleType("torchvision.transforms._presets")
    presets.ImageClassification = object
    sys.modules["torchvision.transforms"] = types.ModuleType("torchvision.transforms")
    sys.modules["torchvision.transforms._presets"] = presets
    resnet = importlib.import_module("torchvision.models.resnet")
    return {f"{name}()": shapes(getattr(resnet, name)().state_dict())
            for name in ("resnet18", "resnet34", "resnet50", "resnet101")}


def paddleclas_models():
    from ppcls.arch.backbone.legendary_models import resnet
    calls = {"ResNet18()": resnet.ResNet18, "ResNet34()": resnet.ResNet34,
             "ResNet18(use_first_short_conv=False)": lambda: resnet.ResNet18(use_first_short_conv=False),
             "ResNet34(use_first_short_conv=False)": lambda: resnet.ResNet34(use_first_short_conv=False),
             "ResNet50()": resnet.ResNet50, "ResNet101()": resnet.ResNet101}
    return {call: shapes(build().state_dict()) for call, build in calls.items()}


def paddledet_models():
    from ppdet.modeling.backbones.resnet import ResNet
    return {f"ResNet(depth={depth})": shapes(ResNet(depth=depth).state_dict()) for depth in (18, 34, 50, 101)}


def write(name, origin, models):
    """JSON with one line per tensor, so that a new release's changes read as a short diff."""
    path = os.path.join(HERE, "reference_keys", f"{name}.json")
    header = dict(origin, generated_by="tests/transfer/dump_reference_keys.py")
    lines = [f"{json.dumps(key)}: {json.dumps(value)}," for key, value in header.items()]
    blocks = []
    for model, keys in models.items():
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(shape)}" for k, shape in keys.items())
        blocks.append(f" {json.dumps(model)}: {{\n{rows}\n }}")
    text = "{\n" + "\n".join(lines) + '\n"models": {\n' + ",\n".join(blocks) + "\n}\n}\n"
    assert json.loads(text) == dict(header, models=models)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {path}: {', '.join(f'{m} ({len(k)})' for m, k in models.items())}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deps", required=True, help="folder holding paddleclas and paddledet")
    parser.add_argument("--torchvision", required=True, help="folder holding the unpacked torchvision wheel")
    args = parser.parse_args()
    import_real_frameworks(args.deps)
    write("torchvision", TORCHVISION, torchvision_models(os.path.join(os.path.abspath(args.torchvision),
                                                                      "torchvision")))
    write("paddleclas", PADDLECLAS, paddleclas_models())
    write("paddledet", PADDLEDET, paddledet_models())


if __name__ == "__main__":
    main()
