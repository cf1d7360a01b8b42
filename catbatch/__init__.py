"""catbatch: batch text-to-image generation on Ray, with CAT token pruning.

The Python API (see README, "In your pipeline")::

    import catbatch

    summary = catbatch.submit("job.yaml")            # or a dict of the manifest's fields
    table = catbatch.open_output(summary.output).to_table(columns=["sample_id", "prompt"])

:func:`submit`, :func:`validate`, :func:`status`, :func:`open_output` and :func:`load` live in
:mod:`catbatch.api`, the exceptions in :mod:`catbatch.errors`. Importing ``catbatch`` loads
neither torch, Ray nor pyarrow: the names below are imported when first used (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from catbatch.errors import (
    CatbatchError,
    InputError,
    ManifestError,
    OutputBusy,
    Problem,
    RunFailed,
    Stopped,
)

if TYPE_CHECKING:
    from catbatch.api import load, open_output, status, submit, validate
    from catbatch.job.driver import RunSummary
    from catbatch.job.status import OutputStatus

__version__ = "0.1.0"

_LAZY = {
    "submit": "catbatch.api",
    "validate": "catbatch.api",
    "status": "catbatch.api",
    "open_output": "catbatch.api",
    "load": "catbatch.api",
    "RunSummary": "catbatch.job.driver",
    "OutputStatus": "catbatch.job.status",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'catbatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CatbatchError",
    "InputError",
    "ManifestError",
    "OutputBusy",
    "OutputStatus",
    "Problem",
    "RunFailed",
    "RunSummary",
    "Stopped",
    "load",
    "open_output",
    "status",
    "submit",
    "validate",
]
