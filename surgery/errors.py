"""The one error type users see: a message naming the problem and a hint naming the fix, printed on one line."""


class SurgeryError(Exception):
    """Bad input or an impossible request. The CLI prints it as one line and exits non-zero, without a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
