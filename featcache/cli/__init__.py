"""The ``featcache`` command: :mod:`~featcache.cli.main` (the parser, :func:`main`),
:mod:`~featcache.cli.base` (the command registry, the progress bar), and the commands
(:mod:`~featcache.cli.commands`, :mod:`~featcache.cli.ship`). The only room that prints or
exits.
"""
