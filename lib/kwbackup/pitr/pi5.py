"""The laptop running one of the pi5's installed scripts (setup-pitr's pi5 side, pitr-recover) over ssh.

What the pi5 says comes out as this run's own lines; its one error line ("<script>: error: what -- what
to do") becomes this run's failure, so the operator reads one line whichever machine failed.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..errors import Failed, KwError
from ..log import log
from ..places import Place
from ..run import holding, run


def run_there(pi5: Place, argv: list[str], what: str, exit_as: dict[int, type[KwError]] | None = None) -> bytes:
    """`argv` (an installed script and its arguments) on the pi5; its stdout. A failure raises the class
    `exit_as` maps its exit status to (else Failed), with the pi5's own error line."""
    code, out, err = run(pi5.command(argv, name=f"{what} on the pi5"), timeout=None, check=False)
    _relay(argv[0], code, err, what, exit_as)
    return out


@contextmanager
def held_there(pi5: Place, argv: list[str], what: str, exit_as: dict[int, type[KwError]] | None = None):
    """`argv` on the pi5, a script that prints one line, then holds what it made until its standard input
    closes (at the end of this block, or when this process dies): yields that line. Failures as run_there."""
    with holding(pi5.command(argv, name=f"{what} on the pi5")) as (proc, err):
        line = proc.stdout.readline()
        if not line:
            code = proc.wait()
            _relay(argv[0], code or 1, _text(err), what, exit_as)  # ended without its line: a failure
        _relay(argv[0], 0, _text(err), what, exit_as)
        yield line


def _text(err) -> str:
    err.seek(0)
    return err.read().decode(errors="replace")


def _relay(script: str, code: int, err: str, what: str, exit_as: dict[int, type[KwError]] | None) -> None:
    """The pi5's lines as this run's; its failure (`code`) as this run's, with its error line."""
    said = err.strip().splitlines()
    marker = f"{script}: error: "
    error = next((line for line in reversed(said) if marker in line), None)
    for line in said:
        if line != error:
            log.info("pi5: %s", line.removeprefix(f"{script}: "))
    if code:
        if error:
            message, _, hint = error.partition(marker)[2].partition(" -- ")
            raise (exit_as or {}).get(code, Failed)(f"on the pi5: {message}", hint)
        raise Failed(
            f"{what} on the pi5 failed (exit {code}): {said[-1] if said else 'no output'}",
            f"make install-pi5 PITR=on on the pi5 (it installs {script}); then run again",
        )
