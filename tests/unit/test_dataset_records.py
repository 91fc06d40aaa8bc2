"""The structural check at disk speed (``scan_jsonl``) says exactly what the exact reader
(``iter_records``) says: the same summary of a good file, the same first error of a bad one,
for files hypothesis builds from good records, records of other formats, fields of the wrong
type, broken JSON, odd line ends and blank lines; and it reads a file in bounded blocks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harli.dataset_records import (
    DatasetError,
    DatasetLimits,
    JsonlSummary,
    iter_records,
    scan_jsonl,
)

_text = st.text(max_size=12)
_value = st.one_of(_text, st.integers(-5, 5), st.none(), st.booleans(), st.floats(allow_nan=False),
                   st.lists(_text, max_size=2))
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": _text})
_records = st.one_of(
    st.fixed_dictionaries({"text": _text}),
    st.fixed_dictionaries({"prompt": _text, "completion": _text}),
    st.fixed_dictionaries({"instruction": _text, "output": _text},
                          optional={"input": _text}),
    st.fixed_dictionaries({"messages": st.lists(_message, max_size=3)}),
    # the keys of one format beside another's, and wrong types
    st.dictionaries(st.sampled_from(["text", "prompt", "completion", "instruction", "output",
                                     "input", "messages", "other"]), _value, max_size=4),
)
_lines = st.one_of(
    _records.map(lambda r: json.dumps(r).encode()),
    _records.map(lambda r: json.dumps(r, ensure_ascii=False).encode()),
    st.sampled_from([b"", b"   ", b"{", b"[1, 2]", b'"text"', b"null", b'{"text": "\\ud800"}',
                     b'{"text": NaN}', b"\xff\xfe", b'{"text": "a"} x', b'{"text": 1e999}']),
)


def _outcome(fn: object, path: Path, limits: DatasetLimits) -> tuple[str, object]:
    try:
        if fn is scan_jsonl:
            s = scan_jsonl(path, limits)
            return "ok", (s.format, s.records)
        seen = [fmt for _, _, fmt in iter_records(path, limits)]
        return "ok", (seen[-1], len(seen))
    except DatasetError as e:
        return "error", str(e)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_lines, min_size=0, max_size=12),
       ends=st.sampled_from([b"\n", b"\r\n"]), bom=st.booleans(),
       last_end=st.booleans())
def test_the_fast_check_says_what_the_exact_reader_says(
        tmp_path: Path, lines: list[bytes], ends: bytes, bom: bool, last_end: bool) -> None:
    path = tmp_path / "d.jsonl"
    data = ends.join(lines) + (ends if last_end and lines else b"")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    limits = DatasetLimits(max_line_bytes=200, max_records=8)
    assert _outcome(scan_jsonl, path, limits) == _outcome(iter_records, path, limits)


def test_a_bad_line_across_block_boundaries_is_named(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import harli.dataset_records as records

    monkeypatch.setattr(records, "BLOCK_BYTES", 64)  # many blocks, lines cut across them
    path = tmp_path / "d.jsonl"
    good = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(50)]
    path.write_text("\r\n".join([*good, '{"prompt": "p", "completion": 7}', *good]) + "\r\n")
    with pytest.raises(DatasetError, match=r"d\.jsonl:51: field 'completion'"):
        scan_jsonl(path)
    path.write_text("\n".join(good) + "\n")
    seen: list[tuple[int, int]] = []
    assert scan_jsonl(path, progress=lambda b, n: seen.append((b, n))) == JsonlSummary(
        format="prompt_completion", records=50)
    assert seen[-1] == (path.stat().st_size, 50)
    assert all(a <= b for a, b in itertools.pairwise(seen))


def test_a_line_over_the_limit_is_refused_without_reading_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n' + b"x" * (3 << 20))  # no line end in sight
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: line over the limit of 1024 bytes"):
        scan_jsonl(path, DatasetLimits(max_line_bytes=1024))


def test_a_record_holding_a_higher_format_s_keys_is_not_taken_for_the_first_format(
        tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    # Escaped keys decode to the same names: a chat record, whatever the text format says.
    path.write_text('{"text": "a"}\n{"text": "b", "\\u006dessages": [{"role": "user", '
                    '"content": "x"}]}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: .*no assistant message"):
        scan_jsonl(path)
