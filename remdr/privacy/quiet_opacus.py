"""Import Opacus without letting it configure logging.

`opacus.utils.module_utils` calls `logging.basicConfig` when Opacus is first imported. In a
process that logs through its own handlers (Flower's ServerApp and ClientApp) that root handler
prints every record a second time, so the coordinator's log doubled each line. Call
`import_opacus()` before any `from opacus ...` import."""

from __future__ import annotations

import logging


def import_opacus() -> None:
    """Import the package once, removing any root handler the import added."""
    root = logging.getLogger()
    before = list(root.handlers)
    import opacus  # noqa: F401

    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
