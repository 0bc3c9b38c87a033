"""The exceptions every script maps to the contract's exit statuses."""


class KwError(Exception):
    """A failure with a one-line message for the operator and its exit status."""

    exit_status = 1

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        """The one line printed for this failure: what failed, then what to do."""
        text = " ".join(self.message.split())
        return f"{text} -- {self.hint}" if self.hint else text


def failure_line(exc: BaseException) -> str:
    """The one line a script prints for a failure: what failed, then what to do."""
    if isinstance(exc, KwError):
        return exc.line()
    if isinstance(exc, OSError):  # a file operation outside the checked paths
        return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    return f"{type(exc).__name__}: {exc}"


class Failed(KwError):
    exit_status = 1


class UsageError(KwError):
    exit_status = 2


class VerificationError(KwError):
    exit_status = 3


class LockHeld(KwError):
    exit_status = 4


class Declined(KwError):
    exit_status = 5
