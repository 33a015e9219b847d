"""One exception hierarchy for the whole project.

Each exception's docstring is its default message.
"""

from __future__ import annotations

import errno


class DnschaosError(Exception):
    """dnschaos failed."""

    exit_code = 2
    """The `dnschaos` command's exit status: 2 for a usage or configuration error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class MalformedQuery(DnschaosError):
    """The packet is not a query the proxy can forward."""

    def __init__(self, message: str | None = None, *, rcode: int | None) -> None:
        super().__init__(message)
        self.rcode = rcode  # the rcode to answer with, or None to drop silently


class ConfigError(DnschaosError):
    """The configuration is invalid."""


class ControlUnavailable(DnschaosError):
    """The control plane (Redis) cannot be reached: nothing was changed."""


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


class ListenError(DnschaosError):
    """The proxy cannot listen on an address."""

    exit_code = 1  # the machine's state, not the command line, is at fault

    @staticmethod
    def from_os_error(address: str, proto: str, exc: OSError, flag: str) -> ListenError:
        cause = exc.__cause__  # uvloop raises its own OSError, from the system's
        if exc.errno is None and isinstance(cause, OSError):
            exc = cause
        if exc.errno == errno.EADDRINUSE:
            return AddressInUse(address, proto, flag)
        return ListenError(f"cannot listen on {address} ({proto}): {exc.strerror or exc}")


class AddressInUse(ListenError):
    """An address the proxy would listen on is held by another program."""

    def __init__(self, address: str, proto: str, flag: str = "--listen") -> None:
        self.address, self.proto = address, proto
        super().__init__(f"{address} ({proto}) is already in use by another program: "
                         f"pick another {flag} port or stop that program")
