"""The one error type users see: a message naming the problem and a hint naming the fix, printed on one line."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def root_reason(error: BaseException) -> str:
    """The first line of the innermost cause: a wrapper (huggingface_hub's strict-dataclass validation, say) puts its
    own heading first and the reason that tells the user what to fix below it, or in its cause."""
    while error.__cause__ is not None:
        error = error.__cause__
    return first_line(error)


class SurgeryError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits non-zero, without a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
