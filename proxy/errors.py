"""One exception hierarchy for the whole project.

Each exception's docstring is its default message.
"""

from __future__ import annotations


class DnschaosError(Exception):
    """dnschaos failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class MalformedQuery(DnschaosError):
    """The packet is not a query the proxy can forward."""

    def __init__(self, message: str | None = None, *, rcode: int | None) -> None:
        super().__init__(message)
        self.rcode = rcode  # the rcode to answer with, or None to drop silently


class ConfigError(DnschaosError):
    """The configuration is invalid."""


class FieldProblem(DnschaosError):
    """A value in a file is invalid."""

    def __init__(self, file: str, line: int | None, path: str, message: str) -> None:
        self.file, self.line, self.path, self.message = file, line, path, message
        super().__init__(self.render())

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class InvalidFile(DnschaosError):
    """A scenario or configuration file has problems."""

    def __init__(self, problems: list[FieldProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(p.render() for p in problems))
