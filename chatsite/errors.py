"""The one base for errors that carry a code.

Inside the project, code raises a specific subclass; at the edges (the
websocket's `chat.error`, the HTTP APIs' error bodies, a task's failure) the
`code` and `detail` of a `CodedError` become what the client reads, and
anything else is `internal_error`.
"""
from __future__ import annotations


class CodedError(Exception):
    """`CodedError(code, detail)`; a subclass that always means one thing
    names its `code` and is raised as `Subclass(detail)`."""

    #: The code of a subclass raised with a detail alone.
    code: str = "internal_error"

    def __init__(self, code_or_detail: str, detail: str | None = None) -> None:
        if detail is None:
            code, detail = type(self).code, code_or_detail
        else:
            code = code_or_detail
        super().__init__(detail)
        self.code = code
        self.detail = detail


def error_code(exc: BaseException) -> str:
    """The code a client is told for any exception."""
    return exc.code if isinstance(exc, CodedError) else "internal_error"
