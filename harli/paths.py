"""Paths a client names (a job's dataset and output directory, an adapter's directory), checked
as paths before any system call sees them.

``open``, ``stat`` and ``realpath`` raise on what is no path at all (``ValueError: embedded
null byte``, ``OSError: [Errno 36] File name too long``, ``UnicodeEncodeError`` for a lone
surrogate), and those exceptions name neither the field nor the rule. ``check_path`` refuses
such a value with a :class:`BadPath` that says which field and why, so the caller answers the
request with an error instead of failing somewhere below.
"""

from __future__ import annotations

import os

# Linux's limits: NAME_MAX bytes per component, PATH_MAX bytes in all (with the NUL).
NAME_MAX_BYTES = 255
PATH_MAX_BYTES = 4095


class BadPath(ValueError):
    """A value that cannot name a file: the message names the field and the rule."""


def check_path(value: object, field: str, *, absolute: bool = False) -> str:
    """``value`` if it can name a file on this host, else :class:`BadPath` naming ``field``:
    a string without NUL, encodable in the file-system encoding, every component at most
    ``NAME_MAX_BYTES`` bytes and the whole at most ``PATH_MAX_BYTES``; with ``absolute``, also
    absolute. Makes no system call."""
    if not isinstance(value, str):
        raise BadPath(f"{field} must be a string path, got {type(value).__name__}")
    if "\x00" in value:
        raise BadPath(f"{field} holds a NUL character, which no path can hold")
    try:
        encoded = os.fsencode(value)
    except UnicodeEncodeError as e:
        raise BadPath(f"{field} holds {value[e.start:e.end]!a}, which is not text (a lone "
                      f"UTF-16 surrogate)") from None
    if len(encoded) > PATH_MAX_BYTES:
        raise BadPath(f"{field} is {len(encoded)} bytes long, over the limit of "
                      f"{PATH_MAX_BYTES} bytes for a path")
    for part in encoded.split(b"/"):
        if len(part) > NAME_MAX_BYTES:
            shown = os.fsdecode(part[:40])
            raise BadPath(f"{field} has a component of {len(part)} bytes ({shown!r}...), over "
                          f"the limit of {NAME_MAX_BYTES} bytes for a file name")
    if absolute and not value.startswith("/"):
        raise BadPath(f"{field} {value} must be an absolute path")
    return value
