"""system-packages.txt: one list for the Makefile, .ci/run and the README; tools/system-packages as a user."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.world import ROOT


def packages(target: str | None = None) -> list[str]:
    found = []
    for line in (ROOT / "system-packages.txt").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words and (target is None or target in words[1:]):
            found.append(words[0])
    return found


def test_the_readme_prerequisites_line_is_the_list():
    assert f"apt-get install -y {' '.join(packages())}\n" in (ROOT / "README.md").read_text()


def test_ci_and_the_makefile_use_the_list():
    assert "tools/system-packages test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "sh tools/system-packages $*" in makefile
    for target in ("test", "test-unit", "demo"):
        assert any(line.startswith(f"{target}: system-packages-") for line in makefile.splitlines()), target
    assert set(packages("demo")) <= set(packages("test")) and set(packages("unit")) <= set(packages("test"))


@pytest.fixture
def unprivileged_copy():
    """The script and a list of our own, where an unprivileged user can read them; a way to run it as one."""
    base = Path(tempfile.mkdtemp(prefix="kw-system-packages-"))
    try:
        (base / "tools").mkdir()
        shutil.copy(ROOT / "tools" / "system-packages", base / "tools")
        base.chmod(0o755)
        as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []

        def run(list_text: str, target: str = "demo") -> subprocess.CompletedProcess:
            (base / "system-packages.txt").write_text(list_text)
            return subprocess.run(
                [*as_user, "sh", str(base / "tools" / "system-packages"), target],
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )

        yield run
    finally:
        shutil.rmtree(base)


def test_not_root_it_prints_the_one_apt_get_line_for_what_is_missing_and_exits_2(unprivileged_copy):
    result = unprivileged_copy("# comment\ndpkg  demo test\nkw-no-such-package  demo  # why\nother-one  test\n")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == "apt-get install -y kw-no-such-package"


def test_nothing_missing_is_silent(unprivileged_copy):
    result = unprivileged_copy("dpkg  demo\nkw-no-such-package  test\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
