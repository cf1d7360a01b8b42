"""The exceptions of catbatch's Python API, one per exit code of the ``catbatch`` command.

Each carries the ``exit_code`` the command exits with for it (README, "Commands")::

    CatbatchError           1  (base: catch this for any of them)
    ├── InputError          2  bad input: manifest, prompt source, model, output; nothing started
    │   └── ManifestError   2  an invalid manifest, with one Problem per bad field
    ├── OutputBusy          3  another submission holds the output's lease
    ├── RunFailed           1  some shards failed after retries, the workers could not start,
    │                          or the lease was lost (``summary`` when the run got that far)
    └── Stopped        143/130 SIGTERM / SIGINT (128 + the signal); committed shards are kept

This module imports nothing heavy (it is loaded by ``import catbatch``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from catbatch.job.driver import RunSummary


class CatbatchError(Exception):
    """Any error of catbatch; ``exit_code`` is what ``catbatch`` exits with for it."""

    exit_code: int = 1


class InputError(CatbatchError, ValueError):
    """Bad input (manifest, prompt source, model, output not writable or holding another run):
    nothing was started or written."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One invalid value of a manifest: where it is and what is wrong."""

    file: str  # the manifest's path ("<dict>" for a manifest given as a dict)
    line: int | None  # 1-based, where the YAML has one
    column: int | None
    field: str  # dotted field path, e.g. "variants[1].pruning.alpha"; "(manifest)" for the whole
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}"


class ManifestError(InputError):
    """An invalid manifest. The message names the file, line, column and field of each problem
    (one line each); :attr:`problems` holds them as :class:`Problem` values."""

    def __init__(self, message: str | list[Problem]):
        self.problems: list[Problem] = [] if isinstance(message, str) else list(message)
        text = message if isinstance(message, str) else "\n".join(map(str, self.problems))
        super().__init__(text)

    @property
    def field(self) -> str | None:
        """The first problem's field path."""
        return self.problems[0].field if self.problems else None

    @property
    def file(self) -> str | None:
        return self.problems[0].file if self.problems else None

    @property
    def line(self) -> int | None:
        return self.problems[0].line if self.problems else None


class OutputBusy(CatbatchError):
    """Another submission holds the output's lease (renewed every 10 s, free 30 s after its
    driver dies)."""

    exit_code = 3


class RunFailed(CatbatchError):
    """The run ended without every shard committed: some failed after retries (``summary`` says
    which), the workers could not start, or the lease was lost to another submission."""

    def __init__(self, message: str, summary: RunSummary | None = None):
        super().__init__(message)
        self.summary = summary


class Stopped(CatbatchError):
    """SIGTERM or SIGINT stopped the submission (only a main-thread caller gets signals);
    committed shards are kept, submitting the same manifest again goes on."""

    def __init__(self, message: str, signum: int, summary: RunSummary | None = None):
        super().__init__(message)
        self.signum = signum
        self.summary = summary

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum


__all__ = [
    "CatbatchError",
    "InputError",
    "ManifestError",
    "OutputBusy",
    "Problem",
    "RunFailed",
    "Stopped",
]
