#!/usr/bin/env bash
# Installs ppmoco and what it needs into the active Python environment (use a virtual environment).
#   bash tools/install.sh          PaddlePaddle where none is installed, ppmoco, oneDNN's headers
#   bash tools/install.sh --test   the same, plus what the test suite needs
# A Paddle already installed is kept when ppmoco is tested on it (a GPU build installed from
# Paddle's index, for instance), and refused in one line otherwise (python -m ppmoco.versions).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") test=0 ;;
    --test) test=1 ;;
    *) echo "error: unknown option '$1'; usage: bash tools/install.sh [--test]" >&2; exit 2 ;;
esac
pip_install() {
    echo "+ pip install $*"
    python -m pip install --quiet --disable-pip-version-check "$@"
}

# PaddlePaddle on a line of its own: the CPU build, only where no Paddle is installed.
paddle=$(python -m ppmoco.versions)
if [ -n "$paddle" ]; then
    pip_install "$paddle"
fi
# ppmoco itself (editable: the tools run from this checkout) with its dependencies, pyproject.toml.
if [ "$test" = 1 ]; then
    pip_install -e ".[test]"
else
    pip_install -e .
fi
# oneDNN's C++ headers, of the version of the libdnnl Paddle ships, for ppmoco's convolution
# operator (compiled at first use). --no-deps: the package's dependencies are a second oneDNN
# library and SYCL runtimes, which nothing here uses.
pip_install --no-deps onednn-devel==2025.0.1
if [ "$test" = 1 ]; then
    # PaddleClas and PaddleDetection, for the tests that load converted backbones into their real
    # classes: into a folder of their own, without their dependencies (requirements-transfer.txt).
    pip_install --no-deps --target .transfer_deps --upgrade -r requirements-transfer.txt
fi
python - <<'PY'
import shutil

from ppmoco.host_allocator import find_jemalloc
from ppmoco.versions import describe_runtime

print(f"installed: {describe_runtime()}")
if find_jemalloc() is None:
    print("optional: libjemalloc2 is not installed; the training tools run on ppmoco's large-block cache "
          "(apt install libjemalloc2 to use jemalloc), and the tests that need jemalloc skip")
if shutil.which("etcd") is None:
    print("optional: etcd-server is not installed; paddle.distributed.launch restarts a failed job in place only "
          "with an etcd master (apt install etcd-server), and the tests that need it skip")
PY
