"""Errors that speak to the user.

A `LadleError` carries a message fit to print as one line: what was wrong, which file or field,
and what to do. The CLI prints it without a traceback and exits with code 2; the server turns the
request-level ones into OpenAI-style 4xx responses.
"""


class LadleError(Exception):
    """A problem the user can fix (bad input, bad file, bad flag)."""


class ModelLoadError(LadleError):
    """A model path, file or format that cannot be loaded."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InvalidRequestError(LadleError):
    """A request parameter that is out of range or inconsistent."""

    def __init__(self, message: str, param: str | None = None):
        self.param = param
        super().__init__(message)
