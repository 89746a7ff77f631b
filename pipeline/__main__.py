"""``python -m pipeline`` == the ``featcache`` command."""

from .cli import main

raise SystemExit(main())
