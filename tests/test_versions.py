"""ppmoco/versions.py: the Paddle check every tool and tools/install.sh run, and what a run says it ran on."""
import importlib.metadata
import os
import subprocess
import sys

import paddle
import pytest
import tomllib

import ppmoco
from ppmoco import versions
from ppmoco.versions import CPU_WHEEL, PaddleVersionError, check_paddle, installed_paddles, paddle_to_install

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeDistribution:
    def __init__(self, name, version):
        self.metadata = {"Name": name}
        self.version = version


def fake_dist_info(folder, name, version):
    """An installed-distribution record of `name` (what pip writes) in `folder`, for a subprocess's path."""
    record = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    record.mkdir(parents=True)
    (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


def test_every_paddle_build_is_found_and_nothing_else():
    # catches: missing the GPU build (or a name written with '_'), counting paddle2onnx or PaddleClas as a Paddle
    found = installed_paddles([FakeDistribution("paddlepaddle_gpu", "3.3.1"), FakeDistribution("paddle2onnx", "2.1.0"),
                               FakeDistribution("paddleclas", "2.6.0"), FakeDistribution("PaddlePaddle", "3.3.0"),
                               FakeDistribution("numpy", "2.4.6")])
    assert found == {"paddlepaddle-gpu": "3.3.1", "paddlepaddle": "3.3.0"}


def test_this_environments_paddle_is_found():
    assert installed_paddles() == {"paddlepaddle": paddle.__version__}


@pytest.mark.parametrize("version", ["3.3.1", "3.3.2", "3.3.10", "3.3.1.post126", "3.3.2rc1"])
def test_a_paddle_in_the_tested_range_passes(version):
    check_paddle({"paddlepaddle-gpu": version}, environ={})
    assert paddle_to_install({"paddlepaddle-gpu": version}, environ={}) == ""


@pytest.mark.parametrize("version", ["3.3.0", "3.3.1rc1", "3.3.1.dev0", "3.2.2", "3.4.0", "3.4.0rc1", "2.6.2", "0.0.0"])
def test_a_paddle_outside_the_tested_range_is_refused_in_one_line(version):
    # catches: a range check off by one at either end, a development build (0.0.0) let through
    with pytest.raises(PaddleVersionError) as err:
        check_paddle({"paddlepaddle": version}, environ={})
    message = str(err.value)
    assert "\n" not in message and f"paddlepaddle {version} is installed" in message
    assert ">=3.3.1,<3.4" in message and "PPMOCO_SKIP_PADDLE_CHECK=1" in message


def test_the_skip_variable_lets_any_paddle_run():
    check_paddle({"paddlepaddle": "3.5.0"}, environ={"PPMOCO_SKIP_PADDLE_CHECK": "1"})


def test_two_builds_over_each_other_are_refused_with_the_fix():
    # catches: the CPU wheel installed over a GPU one going unnoticed (the tools would run on either)
    with pytest.raises(PaddleVersionError) as err:
        paddle_to_install({"paddlepaddle": "3.3.1", "paddlepaddle-gpu": "3.3.1"}, environ={})
    message = str(err.value)
    assert "paddlepaddle 3.3.1 and paddlepaddle-gpu 3.3.1 are installed over each other" in message
    assert "pip uninstall -y paddlepaddle paddlepaddle-gpu" in message


def test_no_paddle_means_the_cpu_wheel_is_installed_and_the_tools_refuse():
    assert paddle_to_install({}, environ={}) == CPU_WHEEL == "paddlepaddle==3.3.1"
    with pytest.raises(PaddleVersionError, match=r"PaddlePaddle is not installed: pip install paddlepaddle==3.3.1"):
        check_paddle({}, environ={})


def test_the_cpu_wheel_is_in_the_tested_range():
    low, high = versions.TESTED_PADDLE
    assert low <= versions.release_key(CPU_WHEEL.split("==")[1]) < high


def test_install_status_command_as_install_sh_runs_it(tmp_path):
    # tools/install.sh installs what `python -m ppmoco.versions` prints; here Paddle is installed: nothing.
    run = subprocess.run([sys.executable, "-m", "ppmoco.versions"], cwd=ROOT, capture_output=True, text=True)
    assert (run.returncode, run.stdout, run.stderr) == (0, "\n", "")
    # A GPU build recorded beside the CPU one: one error line, exit 2 (install.sh stops there).
    env = dict(os.environ, PYTHONPATH=str(fake_dist_info(tmp_path, "paddlepaddle-gpu", "3.3.1")))
    run = subprocess.run([sys.executable, "-m", "ppmoco.versions"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert run.returncode == 2 and run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line.startswith("error: paddlepaddle ") and "paddlepaddle-gpu 3.3.1 are installed over each other" in line


def test_a_tool_refuses_an_untested_paddle_before_writing_anything(tmp_path):
    # catches: the check not run by the tools (cli.run), or run after the output folder was made
    fake = fake_dist_info(tmp_path / "site", "paddlepaddle-gpu", "3.2.0")
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(fake))
    run = subprocess.run([sys.executable, "tools/train.py", "-c", "configs/mocov2_pt_digits_1n2c.yaml",
                          "-o", f"Engine.save_load.output_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("error: paddlepaddle ") and "installed over each other" in line
    assert not out.exists()


def test_install_command_lists_the_pinned_extra_of_pyproject(monkeypatch):
    # The independent reference: pyproject.toml itself.
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        pins = tomllib.load(f)["project"]["optional-dependencies"]["export"]
    assert versions.install_command("export") == "pip install " + " ".join(pins)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "requires", not_installed)
    assert versions.install_command("export") == f'pip install -e "{ROOT}[export]"'


def test_the_run_description_names_ppmoco_and_paddle():
    line = versions.describe_runtime()
    assert line.startswith(f"ppmoco {ppmoco.__version__} on PaddlePaddle {paddle.__version__} (paddlepaddle, ")
    assert ("CPU build" in line) != paddle.device.is_compiled_with_cuda()
    assert paddle.version.commit[:10] in line


def test_the_package_version_is_the_one_pip_installed():
    # pyproject.toml reads the version from ppmoco.__version__; an editable install records it.
    assert importlib.metadata.version("ppmoco") == ppmoco.__version__
