"""The ``harli`` command line: one module per command group, entry point ``harli.cli.main``."""
