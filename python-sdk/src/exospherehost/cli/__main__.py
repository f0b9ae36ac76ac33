"""``python -m exospherehost.cli``: the same as the ``exosphere`` command."""

from .app import main

main()
