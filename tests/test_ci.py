"""CI runs what the README tells a newcomer to run: .ci/run takes the README's two commands from its
first code block and runs them as written, installing nothing the README does not."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_first_block():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("```")
    body = text[text.index("\n", start) + 1:text.index("```", start + 3)]
    return body.splitlines()


def test_ci_runs_the_readmes_two_commands():
    # catches: .ci/run reading another block, a changed README command CI does not follow
    printed = subprocess.run(["bash", ".ci/run", "--print"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert printed.stdout.splitlines() == readme_first_block()


def test_the_readmes_commands_are_the_demo_and_the_tests():
    demo, tests = readme_first_block()
    assert demo.endswith("bash tools/digits_demo.sh") and tests.endswith("python -m pytest -q")
    # Both install through the one script, the tests' with their extras.
    assert demo.startswith("bash tools/install.sh && ") and tests.startswith("bash tools/install.sh --test && ")


def test_ci_installs_nothing_beyond_the_readme():
    # catches: a pip install in .ci/run that a newcomer's machine would lack (the suite then passes in
    # CI only), or an apt package the README does not name as optional (libjemalloc2, etcd-server)
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        script = f.read()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        optional = re.search(r"Optional: `apt install ([^`]*)`", f.read()).group(1).split()
    assert not re.search(r"pip\b[^\n]*\binstall", script)
    assert re.findall(r'apt-get install [^\n|;}]*"\$\{packages\[@\]\}"', script)
    assert sorted(re.findall(r"packages\+=\(([^)]*)\)", script)) == sorted(optional) == ["etcd-server", "libjemalloc2"]
    # It runs every command of the README, as written, in a fresh virtual environment.
    assert 'bash -c "$command"' in script and "python -m venv .venv" in script
