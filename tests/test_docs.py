"""The docs say what is true: every command block in README.md and docs/*.md that shows output
(lines after a `$ command` that are not commands themselves) says where that output comes from,
in an HTML comment on the line before the block, either
    <!-- output checked by tests/test_<name>.py[::test_<name>] -->  a test runs the command and checks it, or
    <!-- illustrative: <why> -->                                    a transcript from one machine, one day;
and every file or module of the project the docs name exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from components.core.paths import ROOT

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# Pages whose blocks are being marked by the owners of ongoing work (issue 21); drop a page from here once marked.
UNMARKED: set[str] = set()
BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SOURCE = re.compile(r"<!-- (?:output checked by (tests/test_\w+\.py)(?:::(test_\w+))?|illustrative: \S.*?) -->\s*\Z")
PATH = re.compile(r"(?<![\w./$-])((?:components|pipelines|serve|bench|tests|conf|docs|\.github|\.ci)/[\w./-]*)(?![{*<\w])")
MODULE = re.compile(r"(?:python3? -m |`)((?:components|pipelines|serve|bench)(?:\.\w+)+)")


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def output_blocks(text: str):
    """(line number, text before the block) of each block holding a `$ command` line and output."""
    for match in BLOCK.finditer(text):
        lines, continued, output = match.group(1).splitlines(), False, False
        commands = False
        for line in lines:
            if line.startswith("$ "):
                commands = True
            elif commands and not continued and line.strip() and not line.lstrip().startswith(("#", "...")):
                output = True
            continued = line.endswith("\\")
        if commands and output:
            yield text[: match.start()].count("\n") + 1, text[: match.start()]


def test_every_block_that_shows_output_says_where_it_comes_from():
    unsourced, missing_tests = [], []
    for page in PAGES:
        if name(page) in UNMARKED:
            continue
        for line, before in output_blocks(page.read_text()):
            source = SOURCE.search(before)
            if source is None:
                unsourced.append(f"{name(page)}:{line}")
            elif source.group(1):
                file, test = ROOT / source.group(1), source.group(2)
                tests = {n.name for n in ast.parse(file.read_text()).body if isinstance(n, ast.FunctionDef)} if file.exists() else set()
                if not tests or (test and test not in tests):
                    missing_tests.append(f"{name(page)}:{line}: {source.group(0)}")
    assert unsourced == [], "blocks showing output without <!-- output checked by ... --> or <!-- illustrative: ... -->"
    assert missing_tests == [], "blocks naming a test that does not exist"


def module_exists(dotted: str) -> bool:
    """components.core.config, or a function, class or constant defined at the top of such a module."""
    parts = dotted.split(".")
    for k in range(len(parts), 1, -1):
        base = ROOT.joinpath(*parts[:k])
        file = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if file.exists():
            rest = parts[k:]
            return not rest or (len(rest) == 1 and bool(re.search(rf"^(def|class) {rest[0]}\b|^{rest[0]}\s*[:=]", file.read_text(), re.M)))
    return False


def prose_and_commands(text: str):
    """Each line of a page but the output lines of its blocks (output names what a run wrote, which need not exist here)."""
    in_block, commands = False, False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block, commands = not in_block, False
            continue
        commands = commands or (in_block and line.startswith("$ "))
        if not in_block or not commands or line.startswith(("$ ", "#")) or line.lstrip().startswith("#"):
            yield number, line


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_files_and_modules_named_in_the_docs_exist(page):
    missing = []
    for number, line in prose_and_commands(page.read_text()):
        missing += [f"line {number}: {m[1].rstrip('.,:;)')}" for m in PATH.finditer(line) if not (ROOT / m[1].rstrip(".,:;)")).exists()]
        missing += [f"line {number}: {m[1]}" for m in MODULE.finditer(line)
                    if (m[0].startswith("python") or m[1].startswith("components.")) and not module_exists(m[1])]
    assert missing == []
