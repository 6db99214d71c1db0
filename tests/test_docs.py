"""The README and docs/ say only what is: every relative link and anchor resolves, every tool they
name exists and answers --help, every config they name exists, and no page narrates history (that
is CHANGELOG.md's job) or exceeds what a newcomer reads in five minutes (the README)."""
import functools
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(["README.md", "CHANGELOG.md"] + [os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md")])
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
# Files a run writes (not configs of the repository) that the pages name by their file name.
RUN_FILES = {"config.yaml"}


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def slug(heading):
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(page):
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+?)\s*#*$", FENCE.sub("", read(page)), re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_the_slug_follows_githubs_rules():
    assert slug("Where ppmoco differs from FleetX / PASSL (and follows the paper)") == \
        "where-ppmoco-differs-from-fleetx--passl-and-follows-the-paper"
    assert slug("Install on a GPU") == "install-on-a-gpu" and slug("`tools/eval.py`: kNN") == "toolsevalpy-knn"


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for match in LINK.finditer(FENCE.sub("", read(page))):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):
            continue  # a web address: nothing here can check it
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, resolved)):
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved}")
    assert not broken, f"{page}: " + "; ".join(broken)


def named_tools():
    return sorted({name for page in PAGES for name in re.findall(r"\btools/(\w+\.(?:py|sh))\b", read(page))})


def test_every_named_tool_exists():
    missing = [name for name in named_tools() if not os.path.isfile(os.path.join(ROOT, "tools", name))]
    assert named_tools() and not missing


@pytest.mark.parametrize("tool", [name for name in named_tools() if name.endswith(".py")])
def test_every_named_python_tool_answers_help(tool):
    path = os.path.join(ROOT, "tools", tool)
    if not os.path.isfile(path):
        pytest.fail(f"tools/{tool} is named in the docs but does not exist")
    with open(path, encoding="utf-8") as f:
        is_command = "__main__" in f.read()
    proc = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not is_command or proc.stdout.startswith("usage:")


def test_every_named_config_exists():
    configs = {os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/configs/**/*", recursive=True)}
    names = {os.path.basename(p) for p in configs}
    missing = []
    for page in PAGES:
        text = read(page)
        for path in re.findall(r"\bconfigs/[\w/.-]*\w\.(?:yaml|yml|py)\b", text):
            if path not in configs:
                missing.append(f"{page}: {path}")
        for name in re.findall(r"(?<![/\w.-])([\w.-]+\.ya?ml)\b", text):
            if name not in names and name not in RUN_FILES:
                missing.append(f"{page}: {name}")
    assert not missing


@pytest.mark.parametrize("page", [p for p in PAGES if p != "CHANGELOG.md"])
def test_no_page_narrates_history(page):
    text = read(page)
    found = re.findall(r"(?i)\bissue #?\d+|\(#\d+\)|\bsession \d+|since this release|before this release", text)
    assert not found, f"{page} narrates history (CHANGELOG.md holds it): {found}"


def test_the_changelog_names_no_issue_numbers():
    assert not re.findall(r"(?i)\bissue #?\d+|\(#\d+\)|\bsession \d+", read("CHANGELOG.md"))


def test_the_readme_is_a_front_page():
    text = read("README.md")
    assert text.startswith("# ppmoco\n") and len(text.splitlines()) <= 260
    # The first code block holds the two commands (tests/test_ci.py checks that CI runs them).
    assert text.index("```") > text.index("\n\n")


def test_the_digits_monitor_is_quoted_as_the_config_runs_it():
    # Catches: the pages quoting a monitor frequency the digits configs do not have.
    from ppmoco.config import load_config

    every = load_config(os.path.join(ROOT, "configs", "mocov2_pt_digits_1n2c.yaml"))["Engine"]["eval_freq"]
    quoted = [int(n) for page in PAGES for n in re.findall(r"configs do, every (\d+) epochs", read(page))]
    assert quoted and set(quoted) == {every}
