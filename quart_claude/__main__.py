"""``python -m quart_claude db upgrade``: see :mod:`quart_claude.migrate`."""

from .migrate import main

main()
