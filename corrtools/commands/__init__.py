"""Subcommands of the ``corrtools`` CLI, one module each (see ``corrtools/cli.py``)."""
