"""Which Paddle is installed, whether ppmoco is tested on it, and how a run names both.

ppmoco does not list Paddle among its package dependencies: Paddle comes as several distributions
(`paddlepaddle` for the CPU, `paddlepaddle-gpu` from Paddle's own index, ...) that all write one
`paddle` package, so a dependency on one would install it beside another. tools/install.sh installs
`CPU_WHEEL` only where no Paddle is installed; every tool checks the installed one first.

The check reads the installed distributions' metadata and never imports Paddle: the tools set
Paddle's environment from the config before its first import.

    python -m ppmoco.versions   prints what tools/install.sh must install for Paddle ("" when the
                                installed one is in the tested range), or one error line, exit 2
"""
import importlib.metadata
import os
import re
import sys

from ppmoco import __version__
from ppmoco.errors import PpmocoError

# The range ppmoco/paddle_internals.py and the equivalence tests are checked on (as release_key
# tuples: 3.3.1 up to, not including, 3.4.0 and its pre-releases).
TESTED_PADDLE = ((3, 3, 1, 0), (3, 4, 0, -1))
CPU_WHEEL = "paddlepaddle==3.3.1"
GPU_INSTALL_DOC = "docs/getting_started.md#install-on-a-gpu"
# Set to 1 to run on a Paddle outside the tested range (a nightly build, a newer release) at your own risk.
SKIP_CHECK_VARIABLE = "PPMOCO_SKIP_PADDLE_CHECK"


class PaddleVersionError(PpmocoError):
    """No Paddle, two Paddle builds over each other, or a Paddle outside the tested range."""


def release_key(version):
    """A version string as a comparable tuple: its first three numbers, then -1 for a pre-release or
    development build, else 0: '3.3.1' -> (3, 3, 1, 0), '3.4.0rc1' -> (3, 4, 0, -1), '3.3.1.post1'
    -> (3, 3, 1, 0). A pre-release sorts before its release, as pip orders them."""
    match = re.match(r"(\d+(?:\.\d+)*)(.*)", version)
    if not match:
        return ()
    numbers = [int(part) for part in match.group(1).split(".")][:3]
    pre = re.match(r"[.-]?(a|b|c|rc|alpha|beta|pre|preview|dev)\d*", match.group(2), re.IGNORECASE)
    return tuple(numbers + [0] * (3 - len(numbers))) + (-1 if pre else 0,)


def _range_text():
    low, high = TESTED_PADDLE
    return f">={'.'.join(map(str, low[:3]))},<{'.'.join(map(str, high[:2]))}"


def installed_paddles(distributions=None):
    """{distribution name: version} of every installed Paddle build (paddlepaddle, paddlepaddle-gpu, ...)."""
    if distributions is None:
        distributions = importlib.metadata.distributions()
    found = {}
    for dist in distributions:
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name == "paddlepaddle" or name.startswith("paddlepaddle-"):
            found[name] = dist.version
    return found


def check_paddle(paddles=None, environ=os.environ):
    """Raise PaddleVersionError unless exactly one Paddle build in the tested range is installed.

    `paddles`: installed_paddles()'s answer (the default reads this environment's).
    """
    if environ.get(SKIP_CHECK_VARIABLE) == "1":
        return
    paddles = installed_paddles() if paddles is None else paddles
    if not paddles:
        raise PaddleVersionError(f"PaddlePaddle is not installed: pip install {CPU_WHEEL} (CPU), or the GPU build "
                                 f"as {GPU_INSTALL_DOC} says")
    if len(paddles) > 1:
        names = " and ".join(f"{name} {version}" for name, version in sorted(paddles.items()))
        raise PaddleVersionError(f"{names} are installed over each other (they share one `paddle` package): "
                                 f"pip uninstall -y {' '.join(sorted(paddles))}, then install the one you want "
                                 f"({CPU_WHEEL} for the CPU; the GPU build as {GPU_INSTALL_DOC} says)")
    (name, version), = paddles.items()
    low, high = TESTED_PADDLE
    if not low <= release_key(version) < high:
        raise PaddleVersionError(f"{name} {version} is installed; ppmoco is tested on PaddlePaddle {_range_text()}: "
                                 f"install a {name} in that range, or set {SKIP_CHECK_VARIABLE}=1 to run on this one "
                                 "at your own risk")


def paddle_to_install(paddles=None, environ=os.environ):
    """What tools/install.sh installs for Paddle: CPU_WHEEL where none is installed, else nothing
    (PaddleVersionError where the installed one is unfit)."""
    paddles = installed_paddles() if paddles is None else paddles
    if not paddles:
        return CPU_WHEEL
    check_paddle(paddles, environ)
    return ""


def install_command(extra):
    """The pip command that installs optional dependency group `extra` of pyproject.toml: its pinned
    packages as ppmoco's installed metadata lists them, else (ppmoco run from a checkout it was not
    installed from) the checkout's extra."""
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    try:
        pins = [line.split(";")[0].strip() for line in importlib.metadata.requires("ppmoco") or []
                if marker.search(line)]
    except importlib.metadata.PackageNotFoundError:
        pins = []
    if pins:
        return "pip install " + " ".join(f'"{pin}"' if "<" in pin or ">" in pin else pin for pin in pins)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return f'pip install -e "{root}[{extra}]"'


def describe_runtime():
    """One line for train.log: ppmoco's version and the Paddle it runs on (build, version, CUDA)."""
    import paddle

    paddles = installed_paddles()
    distribution = " / ".join(sorted(paddles)) or "paddle"
    if paddle.device.is_compiled_with_cuda():
        build = f"CUDA {paddle.version.cuda()}, cuDNN {paddle.version.cudnn()}"
    else:
        build = "CPU build"
    return (f"ppmoco {__version__} on PaddlePaddle {paddle.__version__} ({distribution}, {build}, "
            f"commit {paddle.version.commit[:10]})")


def main():
    try:
        print(paddle_to_install())
    except PaddleVersionError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
