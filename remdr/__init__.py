"""remdr: federated multi-site training of Re-M3Dr (visual-field MD from OCT + fundus).

The core package has no Flower imports; `remdr.server`, `remdr.client` and `remdr.sim` add the
federation on top of it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("remdr")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
