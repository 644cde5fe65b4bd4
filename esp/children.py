"""How ESP starts Python child processes of its own (the Maildir writer, worker processes):
with the code the parent runs.

``python -m`` would put the current directory first on ``sys.path`` (a directory holding
another ``esp/``, a checkout of another version, would win), and without it an installed ESP
could differ from the one the parent imported (a checkout run in place).  So the child runs
with ``-P`` (nothing of the current directory) and, unless the parent's ``esp`` is the one
installed in a site directory, the directory it was imported from first on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import site
import sys
from collections.abc import Mapping
from pathlib import Path

import esp

# The directory holding the ``esp`` package this process runs.
PACKAGE_ROOT = str(Path(esp.__file__).resolve().parent.parent)


def python_command(module: str, *arguments: str) -> list[str]:
    """The argv that runs ``module`` as ``__main__`` in a child (``-P``: see above)."""
    return [sys.executable, "-P", "-m", module, *arguments]


def _installed() -> bool:
    """Whether this ``esp`` is the one installed in a site directory: a child finds it there
    without help (and putting a site directory before the standard library could let an old
    backport shadow a standard module)."""
    sites = {*site.getsitepackages(), site.getusersitepackages()}
    return any(os.path.realpath(d) == PACKAGE_ROOT for d in sites)


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with this ``esp`` first on ``PYTHONPATH`` unless it is the
    installed one."""
    environment = {**os.environ, **(extra or {})}
    if not _installed():
        path = os.environ.get("PYTHONPATH", "")
        environment["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + path if path else "")
    return environment
