"""How ESP starts Python child processes of its own (the Maildir writer, worker processes):
with the code the parent runs.

``python -m`` would put the current directory first on ``sys.path`` (a directory holding
another ``esp/``, a checkout of another version, would win), and without it an installed ESP
could differ from the one the parent imported (a checkout run in place).  So the child runs
with ``-P`` (nothing of the current directory) and the directory the parent imported ``esp``
from first on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import esp

# The directory holding the ``esp`` package this process runs.
PACKAGE_ROOT = str(Path(esp.__file__).resolve().parent.parent)


def python_command(module: str, *arguments: str) -> list[str]:
    """The argv that runs ``module`` as ``__main__`` in a child (``-P``: see above)."""
    return [sys.executable, "-P", "-m", module, *arguments]


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with this ``esp`` first on ``PYTHONPATH``."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": PACKAGE_ROOT + (os.pathsep + path if path else ""),
        **(extra or {}),
    }
