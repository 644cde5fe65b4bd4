"""Every configuration key is in the configuration reference (docs/configuration.md, or the
page a row there sends its subtree to), under its section, so the reference cannot fall
behind the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from esp.config import Config

DOCS = Path(__file__).parent.parent / "docs"


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue  # set by ESP (where the file was), not by the operator
        annotation: Any = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def documented_keys() -> set[str]:
    """Full keys of the table rows of the reference: a row's key is relative to the section
    heading above it (``## `server```, ``### `server.outbound```); ``x.*`` or ``x.<name>``
    documents a subtree."""
    found: set[str] = set()
    pages = [("configuration.md", ""), ("certificates.md", "security.tls.acme")]
    for page, start in pages:
        section = start
        for line in (DOCS / page).read_text().splitlines():
            heading = re.match(r"^#{2,3} `([a-z0-9_.]+)`", line)
            if heading:
                section = heading.group(1)
                continue
            row = re.match(r"^\| `([a-z0-9_.<>*]+)`", line)
            if row and section:
                for key in row.group(1).split("`, `"):
                    found.add(f"{section}.{key}")
            many = re.match(r"^\| `([a-z0-9_]+)`, `([a-z0-9_]+)` \|", line)
            if many and section:
                found.update({f"{section}.{many.group(1)}", f"{section}.{many.group(2)}"})
    return found


def is_documented(key: str, documented: set[str]) -> bool:
    if key in documented:
        return True
    parts = key.split(".")
    return any(".".join(parts[:i]) + suffix in documented
               for i in range(1, len(parts) + 1) for suffix in (".*", ".<name>"))


def test_every_configuration_key_is_in_the_reference() -> None:
    documented = documented_keys()
    missing = [k for k in leaf_keys(Config) if not is_documented(k, documented)]
    assert missing == [], "keys missing from docs/configuration.md"
