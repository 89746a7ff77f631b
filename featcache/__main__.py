"""``python -m featcache`` == the ``featcache`` command."""

from featcache.cli.main import main

raise SystemExit(main())
