"""The ``exosphere`` command (installed with the package): graph files, runs, states and
nodes from a terminal or a CI script. See ``docs/cli.md``.

Run it as ``exosphere ...`` or ``python -m exospherehost.cli ...``. Importing
:mod:`exospherehost` does not import this package.
"""

from .app import cli, main

__all__ = ["cli", "main"]
