"""tools/install.sh, the install step of both README commands: which pip installs it runs for which
Paddle is already there (recorded by a stand-in `python` whose pip does nothing), and that nothing of
ppmoco's pulls the CPU wheel onto a machine with Paddle's GPU build."""
import os
import subprocess
import sys

import pytest
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def machine(tmp_path):
    """run(paddles, *args) -> (exit code, stderr, recorded pip calls): tools/install.sh in an empty
    virtual environment whose installed distributions are `paddles` ({name: version}); its pip calls
    and its closing Python check are recorded instead of run."""
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    shim = tmp_path / "bin"
    shim.mkdir()
    log = tmp_path / "pip.log"
    (shim / "python").write_text(f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then shift 2; echo "$*" >> {log}; exit 0; fi
if [ "$1" = "-" ]; then cat > /dev/null; echo "check" >> {log}; exit 0; fi
exec {env_dir}/bin/python "$@"
""")
    (shim / "python").chmod(0o755)

    def run(paddles, *args):
        for name, version in paddles.items():
            record = os.path.join(site, f"{name.replace('-', '_')}-{version}.dist-info")
            os.makedirs(record)
            with open(os.path.join(record, "METADATA"), "w") as f:
                f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}")
        env.pop("PYTHONPATH", None)
        proc = subprocess.run(["bash", "tools/install.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        calls = [call.replace("--quiet --disable-pip-version-check ", "") for call in calls]
        return proc.returncode, proc.stderr, calls
    return run


ONEDNN = "install --no-deps onednn-devel==2025.0.1"
TRANSFER = "install --no-deps --target .transfer_deps --upgrade -r requirements-transfer.txt"


def test_a_machine_without_paddle_gets_the_cpu_wheel_first(machine):
    code, err, calls = machine({}, "--test")
    assert code == 0, err
    assert calls == ["install paddlepaddle==3.3.1", "install -e .[test]", ONEDNN, TRANSFER, "check"]


@pytest.mark.parametrize("gpu", ["paddlepaddle-gpu", "paddlepaddle_gpu"])
def test_a_gpu_build_in_the_tested_range_is_kept(machine, gpu):
    # catches: the CPU wheel installed over the GPU build (two distributions writing one `paddle`)
    code, err, calls = machine({gpu: "3.3.1"})
    assert code == 0, err
    assert calls == ["install -e .", ONEDNN, "check"]


@pytest.mark.parametrize("paddles, message", [
    ({"paddlepaddle": "3.3.1", "paddlepaddle-gpu": "3.3.1"}, "are installed over each other"),
    ({"paddlepaddle-gpu": "2.6.2"},
     "paddlepaddle-gpu 2.6.2 is installed; ppmoco is tested on PaddlePaddle >=3.3.1,<3.4"),
])
def test_an_unfit_paddle_stops_the_install_before_anything_is_installed(machine, paddles, message):
    code, err, calls = machine(paddles)
    assert code == 2 and calls == []
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and message in line


def test_an_unknown_option_is_a_one_line_error(machine):
    code, err, calls = machine({}, "--tests")
    assert code == 2 and calls == []
    assert err.strip() == "error: unknown option '--tests'; usage: bash tools/install.sh [--test]"


def test_no_requirement_of_ppmoco_names_a_paddle_build():
    # pip installs every dependency and extra listed; any Paddle among them would land beside a GPU build.
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert requirements and not [r for r in requirements if r.lower().replace("_", "-").startswith("paddlepaddle")]


def test_the_installed_ppmoco_imports_from_any_directory(tmp_path):
    # what `pip install -e .` gives users' own code: the package of this checkout, from anywhere
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import ppmoco; from ppmoco import load_backbone; print(ppmoco.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == os.path.join(ROOT, "ppmoco", "__init__.py")
