"""``python -m featcache`` == the ``featcache`` command."""

from .cli import main

raise SystemExit(main())
