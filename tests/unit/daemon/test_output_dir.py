"""A job's output_dir: confined to the output roots, new or empty, used by one active job."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harli.daemon.attach import AttachRefused, check_output_dir


def test_a_dir_under_a_root_is_accepted_new_or_empty(tmp_path: Path) -> None:
    root = tmp_path / "jobs"  # need not exist yet: the daemon creates it
    check_output_dir(root / "a", {}, [root])
    (root / "b").mkdir(parents=True)
    check_output_dir(root / "b", {}, [root])
    check_output_dir(root / "deep" / "c", {}, [tmp_path / "other", root])


@pytest.mark.parametrize("outside", ["/", "/adapter", "/etc/harli", "/tmp"])
def test_anything_outside_the_roots_is_refused_naming_them(tmp_path: Path, outside: str) -> None:
    root = tmp_path / "jobs"
    with pytest.raises(AttachRefused, match="outside the output roots") as e:
        check_output_dir(Path(outside), {}, [root])
    assert str(root) in str(e.value) and "extra_output_roots" in str(e.value)


def test_the_root_itself_and_dotdot_escapes_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    root.mkdir()
    for p in (root, root / ".." / "x", root / "a" / ".." / ".."):
        with pytest.raises(AttachRefused, match="outside"):
            check_output_dir(p, {}, [root])


def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    root.mkdir()
    os.symlink("/", root / "escape")
    with pytest.raises(AttachRefused, match="outside"):
        check_output_dir(root / "escape" / "etc", {}, [root])


def test_a_non_empty_dir_or_a_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    (root / "full").mkdir(parents=True)
    (root / "full" / "x").write_text("")
    with pytest.raises(AttachRefused, match="not empty"):
        check_output_dir(root / "full", {}, [root])
    (root / "file").write_text("")
    with pytest.raises(AttachRefused, match="not a directory"):
        check_output_dir(root / "file", {}, [root])


def test_a_dir_of_an_active_job_is_refused_even_through_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    (root / "a").mkdir(parents=True)
    os.symlink(root / "a", root / "alias")
    with pytest.raises(AttachRefused, match="already used by job 'first'"):
        check_output_dir(root / "alias", {str(root / "a"): "first"}, [root])


def test_relative_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AttachRefused, match="absolute"):
        check_output_dir(Path("jobs/a"), {}, [tmp_path])
