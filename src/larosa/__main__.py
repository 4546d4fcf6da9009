"""``python -m larosa``: the same as the ``larosa`` command."""

from .cli import main

raise SystemExit(main())
