"""``check_path``: every string either passes and can be handed to the OS without the errors
that are no answer to a client (NUL, not text, a name too long), or is refused naming the field."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harli.paths import NAME_MAX_BYTES, BadPath, check_path


@given(st.text(max_size=600) | st.text(alphabet="ab/\x00\ud800é", max_size=600))
def test_a_path_passes_or_is_refused_by_name_and_a_passing_one_never_trips_the_os(
        value: str) -> None:
    try:
        check_path(value, "output_dir")
    except BadPath as e:
        refusal = str(e)
    else:
        refusal = ""
    if refusal:
        assert refusal.startswith("output_dir ")
        return
    try:
        os.stat(value or ".")
        tripped = 0
    except OSError as e:
        tripped = e.errno or 0
    assert tripped != errno.ENAMETOOLONG


@pytest.mark.parametrize(("value", "says"), [
    ("/a\x00b", "holds a NUL character"),
    ("/a/\ud800", "which is not text"),
    ("/" + "x" * (NAME_MAX_BYTES + 1), "a component of 256 bytes"),
    ("/" + "é" * 128, "a component of 256 bytes"),  # bytes, not characters
    ("/a/" * 1400, "over the limit of 4095 bytes"),
    ("relative/path", "must be an absolute path"),
])
def test_what_is_refused_and_why(value: str, says: str) -> None:
    with pytest.raises(BadPath, match=says):
        check_path(value, "dataset", absolute=True)


def test_a_type_that_is_no_string_is_refused() -> None:
    with pytest.raises(BadPath, match="dataset must be a string path, got int"):
        check_path(3, "dataset")
    assert check_path("/" + "x" * NAME_MAX_BYTES, "dataset") == "/" + "x" * NAME_MAX_BYTES
