"""User-facing tools: the inference client library and the ``harli`` command line. They talk
to the daemon only through the wire types of ``harli.ipc``."""
