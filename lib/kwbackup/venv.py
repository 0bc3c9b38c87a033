"""Run every script under the project's own virtualenv, however it was started.

Standard library only: this runs before the dependencies can be imported.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"


def ensure() -> None:
    """Re-execute the running script with the venv's python when started by another one."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    if python.exists():
        os.execv(python, [str(python), sys.argv[0], *sys.argv[1:]])
    try:
        import dotenv  # noqa: F401
        import plumbum  # noqa: F401
    except ImportError:
        sys.stderr.write(f"kw-backup: no virtualenv at {VENV} -- run `make venv` in {ROOT}\n")
        sys.exit(2)
