"""The docs stay true: every flag and setting is in docs/reference.md, every link resolves,
nothing points outside the repository."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kwbackup import settings

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "reference.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = sorted(p.name for p in (ROOT / "bin").iterdir() if p.is_file())
# In "Every script": what every script takes.
COMMON_FLAGS = {"--help", "--env-file", "--verbose", "--quiet"}


def sections(text: str) -> dict[str, str]:
    """Each `## ` heading's first word and its body."""
    parts = re.split(r"^## ", text, flags=re.M)
    return {part.split(maxsplit=1)[0]: part for part in parts[1:]}


def flags_in_help(script: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bin" / script), "--help"], capture_output=True, text=True, check=True
    ).stdout
    # An option line of argparse's help: indented, starts with a dash; its description follows two spaces.
    return {
        flag
        for line in out.splitlines()
        if re.match(r"\s+-", line)
        for flag in re.findall(r"--[a-z][a-z0-9-]*", re.split(r"(?<=\S)\s{2,}", line.strip(), maxsplit=1)[0])
    }


def mentions(text: str, flag: str) -> bool:
    """The flag as a word: in prose, a table or the section's examples."""
    return re.search(rf"(?<![\w-]){flag}(?![\w-])", text) is not None


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_of_a_script_is_in_its_reference_section(script):
    ref = sections(REFERENCE.read_text())
    assert f"bin/{script}" in ref, f"docs/reference.md has no section '## bin/{script}'"
    common = ref["Every"]
    flags = flags_in_help(script)
    assert flags >= {"--help", "--env-file"}
    missing = [
        f
        for f in sorted(flags)
        if not mentions(ref[f"bin/{script}"], f) and not (f in COMMON_FLAGS and mentions(common, f))
    ]
    assert not missing, f"bin/{script} --help has flags docs/reference.md does not describe: {missing}"


def test_every_setting_is_in_the_reference():
    table = sections(REFERENCE.read_text())["Settings"]
    env_example = re.findall(r"^#?\s?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), flags=re.M)
    names = {s.name for s in settings.SETTINGS} | set(env_example)
    assert set(env_example) <= {s.name for s in settings.SETTINGS}, "a setting in .env.example the code ignores"
    missing = sorted(n for n in names if f"`{n}`" not in table)
    assert not missing, f"settings missing from docs/reference.md's Settings: {missing}"


def test_every_setting_is_in_env_example():
    text = (ROOT / ".env.example").read_text()
    missing = [s.name for s in settings.SETTINGS if not re.search(rf"^#?\s?{s.name}=", text, flags=re.M)]
    assert not missing, f".env.example lacks {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(doc):
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # a URL
            continue
        path = target.split("#", 1)[0]
        if path:
            resolved = (doc.parent / path).resolve()
            assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
            assert resolved.exists(), f"{doc.name} links to a missing file: {target}"
        if "#" in target:
            anchor = target.split("#", 1)[1]
            heads = (doc.parent / path).read_text() if path else text
            slugs = {
                re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", heads, flags=re.M)
            }
            assert anchor in slugs, f"{doc.name}: no heading for #{anchor} in {path or doc.name}"


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if name == "tests/unit/test_docs.py" or not path.is_file() or path.suffix in {".gz", ".png"}:
            continue
        text = path.read_text(errors="replace")
        if re.search(r"\.\./shared|CONTRACT\.md|ARCHITECTURE\.md", text):
            offenders.append(name)
    assert not offenders, f"files that point outside the repository: {offenders}"


def test_every_module_is_in_the_design_module_map():
    design = (ROOT / "docs" / "design.md").read_text()
    table = design.split("## The module map\n", 1)[1].split("\n## ", 1)[0]
    modules = [p.name for p in (ROOT / "lib" / "kwbackup").glob("*.py") if p.name != "__init__.py"]
    assert not [m for m in modules if f"`{m}`" not in table], "docs/design.md's module map lacks modules"
