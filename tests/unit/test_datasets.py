"""Finetune datasets: four JSONL formats, loss masked exactly off the prompt, bad files named."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harli import datasets
from harli.datasets import (
    FORMATS,
    IGNORE_INDEX,
    DatasetError,
    DatasetLimits,
    Example,
    check_jsonl,
    default_chat_render,
    detect_format,
    load_dataset,
    read_jsonl,
    tokenize_record,
)

SAMPLE = Path(datasets.__file__).parent / "data" / "digits.jsonl"
EOS = "<|eos|>"


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harli.model.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture(scope="session")
def tok(tiny_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def decode(tok: Any, ids: list[int]) -> str:
    return str(tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))


def labelled_runs(tok: Any, ex: Example) -> list[str]:
    """The decoded text of each maximal run of tokens that carry a label."""
    runs: list[list[int]] = []
    prev_labelled = False
    for tid, label in zip(ex.input_ids, ex.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == tid
            if not prev_labelled:
                runs.append([])
            runs[-1].append(tid)
        prev_labelled = label != IGNORE_INDEX
    return [decode(tok, r) for r in runs]


def check_split(tok: Any, ex: Example, prompt: str, response: str) -> None:
    """No loss on ``prompt``, loss on every token of ``response`` (which ends with eos)."""
    assert len(ex.input_ids) == len(ex.labels)
    assert decode(tok, ex.input_ids) == prompt + response
    assert labelled_runs(tok, ex) == [response]
    n_prompt = sum(1 for label in ex.labels if label == IGNORE_INDEX)
    assert decode(tok, ex.input_ids[:n_prompt]) == prompt
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt


# ------------------------------------------------------------------------------ formats


def test_tokenizer_adds_no_bos(tok: Any) -> None:
    assert tok("hello", add_special_tokens=False)["input_ids"] == tok("hello")["input_ids"]
    assert tok.bos_token_id not in tok("hello")["input_ids"]


def test_alpaca_with_input_has_loss_only_on_response(tok: Any) -> None:
    rec = {"instruction": "Write these numbers as digits.", "input": "three one four",
           "output": "3 1 4"}
    assert detect_format(rec, "d.jsonl:1") == "alpaca"
    ex, cut = tokenize_record(rec, "alpaca", tok, 512)
    assert not cut
    prompt = ("### Instruction:\nWrite these numbers as digits.\n\n"
              "### Input:\nthree one four\n\n### Response:\n")
    check_split(tok, ex, prompt, "3 1 4" + EOS)
    # Tokenizing the two parts separately gives the same ids as the whole text here.
    assert ex.input_ids == tok(prompt + "3 1 4" + EOS, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("extra", [{}, {"input": ""}])
def test_alpaca_without_input_leaves_out_the_input_section(tok: Any, extra: dict[str, str]
                                                           ) -> None:
    rec = {"instruction": "Say hi.", "output": "hi there", **extra}
    ex, _ = tokenize_record(rec, detect_format(rec, "d.jsonl:1"), tok, 512)
    check_split(tok, ex, "### Instruction:\nSay hi.\n\n### Response:\n", "hi there" + EOS)


def test_prompt_completion_has_loss_on_completion_and_eos(tok: Any) -> None:
    rec = {"prompt": "The river ran", "completion": " past the old mill."}
    assert detect_format(rec, "d.jsonl:1") == "prompt_completion"
    ex, _ = tokenize_record(rec, "prompt_completion", tok, 512)
    check_split(tok, ex, "The river ran", " past the old mill." + EOS)


def test_text_has_loss_everywhere_and_ends_with_eos(tok: Any) -> None:
    rec = {"text": "Once upon a time."}
    assert detect_format(rec, "d.jsonl:1") == "text"
    ex, _ = tokenize_record(rec, "text", tok, 512)
    check_split(tok, ex, "", "Once upon a time." + EOS)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a river."},
    {"role": "assistant", "content": "The Nile."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "The Amazon, in South America."},
]


def test_chat_has_loss_only_on_assistant_contents(tok: Any) -> None:
    rec = {"messages": CONVERSATION}
    assert detect_format(rec, "d.jsonl:1") == "chat"
    ex, cut = tokenize_record(rec, "chat", tok, 512)
    assert not cut and len(ex.input_ids) == len(ex.labels)
    assert labelled_runs(tok, ex) == ["The Nile." + EOS, "The Amazon, in South America." + EOS]


def test_chat_render_equals_the_chat_template_of_the_whole_conversation(tok: Any) -> None:
    ex, _ = tokenize_record({"messages": CONVERSATION}, "chat", tok, 512)
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert decode(tok, ex.input_ids) == rendered
    assert ex.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]


def test_chat_default_template_without_a_tokenizer_template(tok: Any, tiny_path: Path) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_path)
    plain.chat_template = None
    rendered = default_chat_render(CONVERSATION, plain.eos_token)
    assert rendered == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert default_chat_render(CONVERSATION[:2], add_generation_prompt=True).endswith(
        "<|eos|>\n<|assistant|>\n")
    ex, _ = tokenize_record({"messages": CONVERSATION}, "chat", plain, 512)
    assert decode(plain, ex.input_ids) == rendered
    assert labelled_runs(plain, ex) == ["The Nile." + EOS, "The Amazon, in South America." + EOS]


def test_chat_assistant_content_that_looks_like_a_header_is_still_located(tok: Any) -> None:
    msgs = [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "assistant"}]
    ex, _ = tokenize_record({"messages": msgs}, "chat", tok, 512)
    assert labelled_runs(tok, ex) == ["assistant" + EOS]


def test_chat_template_that_is_not_incremental_is_refused(tok: Any, tiny_path: Path) -> None:
    from transformers import AutoTokenizer

    odd = AutoTokenizer.from_pretrained(tiny_path)
    odd.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(DatasetError, match=r"d\.jsonl:4: .*incrementally"):
        tokenize_record({"messages": CONVERSATION}, "chat", odd, 512, where="d.jsonl:4")


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"messages": [{"role": "assistant", "content": "x"}], "text": "t"}, "chat"),
        ({"instruction": "i", "output": "o", "prompt": "p", "completion": "c"}, "alpaca"),
        ({"prompt": "p", "completion": "c", "text": "t"}, "prompt_completion"),
        ({"text": "t", "instruction": "only half of alpaca"}, "text"),
    ],
)
def test_detection_order(record: dict[str, Any], fmt: str) -> None:
    assert fmt in FORMATS
    assert detect_format(record, "d.jsonl:1") == fmt


@settings(max_examples=40, deadline=None)
@given(prompt=st.text(st.characters(codec="utf-8", exclude_characters="<"), max_size=40),
       completion=st.text(st.characters(codec="utf-8", exclude_characters="<"), max_size=40))
def test_prompt_completion_split_is_exact_for_any_text(tok: Any, prompt: str, completion: str
                                                       ) -> None:
    ex, _ = tokenize_record({"prompt": prompt, "completion": completion}, "prompt_completion",
                            tok, 4096)
    check_split(tok, ex, prompt, completion + EOS)


# ------------------------------------------------------------------------------ truncation


def test_truncation_is_counted_and_logged_once(tok: Any, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    long = "word " * 40
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": long, "completion": "end"},   # loss tokens all past the cut
        {"prompt": "a", "completion": long},     # cut inside the completion
        {"prompt": "a", "completion": "b"},      # fits
    ])
    caplog.set_level(logging.WARNING, logger="harli.datasets")
    examples, report = load_dataset(path, tok, 16)
    assert report.records == 3 and report.truncated == 2 and report.format == "prompt_completion"
    assert [len(e.input_ids) for e in examples[:2]] == [16, 16]
    assert all(len(e.labels) == len(e.input_ids) for e in examples)
    assert all(label == IGNORE_INDEX for label in examples[0].labels)
    assert report.tokens == sum(len(e.input_ids) for e in examples)
    assert report.loss_tokens == sum(
        1 for e in examples for label in e.labels[1:] if label != IGNORE_INDEX)
    assert report.loss_tokens == 15 + len(tok("b", add_special_tokens=False)["input_ids"]) + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "t.jsonl" in warnings[0].getMessage() and "2 of 3" in warnings[0].getMessage()


def test_tokenize_record_reports_truncation(tok: Any) -> None:
    ex, cut = tokenize_record({"text": "one two three four five"}, "text", tok, 3)
    assert cut and len(ex.input_ids) == 3
    _, cut = tokenize_record({"text": "hi"}, "text", tok, 64)
    assert not cut


def test_max_seq_len_must_be_positive(tok: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}]), tok, 0)


# ------------------------------------------------------------------------------ files


def test_read_jsonl_skips_blank_lines_and_accepts_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n   \n{"text": "b"}')
    records, fmt = read_jsonl(path)
    assert fmt == "text" and records == [{"text": "a"}, {"text": "b"}]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.jsonl.*does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DatasetError, match=r"dir\.jsonl.*directory"):
        read_jsonl(tmp_path / "dir.jsonl")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(tmp_path / "secret.jsonl", [{"text": "x"}])
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything; make the read fail the way it would otherwise
        real_open = os.open

        def refuse(file: Any, flags: int, *args: Any) -> int:
            if str(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, flags, *args)

        monkeypatch.setattr(os, "open", refuse)
    try:
        with pytest.raises(DatasetError, match=r"secret\.jsonl.*permission denied"):
            read_jsonl(path)
    finally:
        path.chmod(0o644)


@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n"])
def test_no_records(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=r"empty\.jsonl.*has no records"):
        read_jsonl(path)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:3: not valid JSON: .+"):
        read_jsonl(path)


def test_check_jsonl_counts_records_and_names_the_upload_in_errors(tmp_path: Path) -> None:
    path = tmp_path / ".upload-1.tmp"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    summary = check_jsonl(path, shown_as="train.jsonl")
    assert (summary.format, summary.records) == ("prompt_completion", 2)
    path.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(DatasetError, match=r"^train\.jsonl:2: not valid JSON") as e:
        check_jsonl(path, shown_as="train.jsonl")
    assert ".upload-1" not in str(e.value)
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DatasetError, match=r"^train\.jsonl:2: more than 1 records"):
        check_jsonl(path, DatasetLimits(max_records=1), shown_as="train.jsonl")


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: not valid UTF-8"):
        read_jsonl(path)


def test_a_lone_surrogate_escape_names_file_and_line(tmp_path: Path, tok: Any) -> None:
    """Valid JSON, no text: hypothesis found that "\\ud800" reached the tokenizer, which raised
    a TypeError that named no line."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n'
                    '{"prompt": "a", "completion": "x\\ud800y"}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: .*lone UTF-16 surrogate \('\\ud800'\)"):
        read_jsonl(path)
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: "):
        load_dataset(path, tok, 64)


@pytest.mark.parametrize(("line", "what"), [("[1, 2]", "an array"), ('"text"', "a string"),
                                            ("3", "a number"), ("null", "null")])
def test_record_that_is_not_an_object(tmp_path: Path, line: str, what: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n' + line + "\n")
    with pytest.raises(DatasetError, match=rf"d\.jsonl:2: .*JSON object, got {what}"):
        read_jsonl(path)


def test_mixed_formats_name_the_line_and_both_formats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "a"}, {"text": "b"}, {"prompt": "p", "completion": "c"},
    ])
    with pytest.raises(DatasetError,
                       match=r"d\.jsonl:3: .*'prompt_completion'.*line 1.*'text'"):
        read_jsonl(path)


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: .*'question', 'answer'"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"instruction": "i", "output": 3}, "'output'"),
        ({"instruction": ["i"], "output": "o"}, "'instruction'"),
        ({"instruction": "i", "output": "o", "input": 1}, "'input'"),
        ({"prompt": "p", "completion": None}, "'completion'"),
        ({"prompt": 1, "completion": "c"}, "'prompt'"),
        ({"text": {"a": 1}}, "'text'"),
        ({"messages": "hi"}, "'messages'"),
        ({"messages": []}, "'messages' is an empty list"),
        ({"messages": ["hi"]}, r"'messages\[0\]'"),
        ({"messages": [{"role": "assistant"}]}, r"'messages\[0\]\.content' is missing"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"'messages\[0\]\.role' is 'bot'"),
        ({"messages": [{"role": "assistant", "content": 5}]}, r"'messages\[0\]\.content'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ],
)
def test_bad_fields_name_file_line_and_field(tmp_path: Path, record: dict[str, Any],
                                             field: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + json.dumps(record) + "\n")
    with pytest.raises(DatasetError, match=rf"bad\.jsonl:3: .*{field}"):
        read_jsonl(path)


def test_load_dataset_names_the_line_of_a_bad_record(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"text": 7}])
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: field 'text'"):
        load_dataset(path, tok, 64)


# ------------------------------------------------------------------------------ sample


def test_sample_dataset_loads(tok: Any) -> None:
    records, fmt = read_jsonl(SAMPLE)
    assert fmt == "alpaca" and len(records) == 400
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for r in records:
        assert r["instruction"] == "Write these numbers as digits."
        nums = r["input"].split()
        assert 3 <= len(nums) <= 8
        assert r["output"] == " ".join(str(words.index(w)) for w in nums)
    # The alpaca prompt alone is about 55 tokens with this tokenizer; the longest record is 91.
    examples, report = load_dataset(SAMPLE, tok, 128)
    assert report.records == 400 and report.format == "alpaca" and report.truncated == 0
    assert len(examples) == 400 and max(len(e.input_ids) for e in examples) <= 128
    for r, ex in zip(records[:20], examples[:20], strict=True):
        assert labelled_runs(tok, ex) == [r["output"] + EOS]


# --------------------------------------------------------------------------------------------
# The tokenized cache: the daemon tokenizes at attach, the finetune reads the result


def test_cache_hit_gives_the_same_examples_and_does_not_tokenize(
        tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = datasets.TokenizedCache(tmp_path / "cache")
    first, report = load_dataset(SAMPLE, tok, 64, cache)
    assert report.source == "file" and cache.path(report.cache_key).exists()

    def no_tokenizing(*a: Any, **k: Any) -> Any:
        raise AssertionError("a cache hit must not tokenize")

    monkeypatch.setattr(datasets, "tokenize_record", no_tokenizing)
    again, cached = load_dataset(SAMPLE, tok, 64, cache)
    assert list(again) == first and again[-1] == first[-1] and again[1:3] == first[1:3]
    assert cached.source == "cache" and cached.cache_key == report.cache_key
    assert (cached.records, cached.tokens, cached.loss_tokens, cached.truncated, cached.format) \
        == (report.records, report.tokens, report.loss_tokens, report.truncated, report.format)


def test_cache_key_follows_the_bytes_the_tokenizer_and_max_seq_len(
        tok: Any, tmp_path: Path) -> None:
    cache = datasets.TokenizedCache(tmp_path / "cache")
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one two"}])
    _, a = load_dataset(path, tok, 64, cache)
    _, b = load_dataset(path, tok, 32, cache)
    assert a.cache_key != b.cache_key and b.source == "file"
    write_jsonl(path, [{"text": "one two three"}])  # changed since it was cached
    examples, c = load_dataset(path, tok, 64, cache)
    assert c.source == "file" and c.cache_key not in (a.cache_key, b.cache_key)
    assert examples[0].input_ids[-1] == tok.eos_token_id and c.tokens > a.tokens
    digest = datasets.tokenizer_fingerprint(tok)
    assert datasets.cache_key("x", digest, 8) != datasets.cache_key("x", digest + "0", 8)


def test_an_unreadable_cache_entry_is_a_miss_that_is_rewritten(
        tok: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = datasets.TokenizedCache(tmp_path / "cache")
    first, report = load_dataset(SAMPLE, tok, 64, cache)
    cache.path(report.cache_key).write_bytes(b"\x93not msgpack of a dataset")
    with caplog.at_level(logging.WARNING, logger="harli.datasets"):
        again, r = load_dataset(SAMPLE, tok, 64, cache)
    assert again == first and r.source == "file"
    assert "unreadable" in caplog.text
    assert load_dataset(SAMPLE, tok, 64, cache)[1].source == "cache"


def test_a_bad_file_is_refused_before_any_cache_lookup(tok: Any, tmp_path: Path) -> None:
    cache = datasets.TokenizedCache(tmp_path / "cache")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "missing.jsonl", tok, 64, cache)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: not valid JSON"):
        load_dataset(bad, tok, 64, cache)
    assert not list((tmp_path / "cache").glob("*.msgpack"))


def test_prune_keeps_only_the_named_entries(tok: Any, tmp_path: Path) -> None:
    cache = datasets.TokenizedCache(tmp_path / "cache")
    _, a = load_dataset(SAMPLE, tok, 64, cache)
    _, b = load_dataset(SAMPLE, tok, 32, cache)
    assert cache.prune({a.cache_key}) == 1
    assert cache.path(a.cache_key).exists() and not cache.path(b.cache_key).exists()
    assert datasets.TokenizedCache(tmp_path / "none").prune(set()) == 0


def test_report_as_dict_round_trips_the_wire_type(tok: Any, tmp_path: Path) -> None:
    import msgspec

    from harli.ipc.finetune import JobStarted

    _, report = load_dataset(SAMPLE, tok, 64, datasets.TokenizedCache(tmp_path / "c"))
    msg = JobStarted(job_id=1, resumed_from_step=None, total_steps=3,
                     dataset_report=report.as_dict())
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=JobStarted)
    assert back.dataset_report == report.as_dict()


@pytest.mark.parametrize(("line", "problem"), [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ('{"text": ' + "9" * 5000 + "}", "not usable JSON"),
])
def test_a_pathological_json_line_is_refused_with_file_and_line(
        tok: Any, tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DatasetError, match=rf"p\.jsonl:2: {problem}"):
        load_dataset(path, tok, 64)


def test_records_with_nothing_to_train_on_count_no_loss_tokens(tok: Any, tmp_path: Path) -> None:
    # An empty text is its eos alone: the first token is never predicted, so no loss.
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": ""}])
    examples, report = load_dataset(path, tok, 64)
    assert [e.input_ids for e in examples] == [[tok.eos_token_id]] * 2
    assert report.loss_tokens == 0


# --------------------------------------------------------------------------------------------
# Only regular files, within limits: no file can hang the reader or exhaust the host


def test_a_named_pipe_is_refused_at_once_without_waiting_for_a_writer(
        tok: Any, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DatasetError, match="not a regular file"):
        load_dataset(fifo, tok, 64)  # before the fix: blocked forever in open()


def test_a_device_is_refused_without_reading_it(tok: Any) -> None:
    with pytest.raises(DatasetError, match="/dev/zero: not a regular file"):
        load_dataset("/dev/zero", tok, 64)


@pytest.mark.parametrize(("limits", "says"), [
    (datasets.DatasetLimits(max_bytes=100), r"over the limit of 100 \(finetune.max_dataset_bytes"),
    (datasets.DatasetLimits(max_line_bytes=30), r"d\.jsonl:2: line of 40 bytes, over the limit "
                                                r"of 30 bytes \(finetune.max_line_bytes\)"),
    (datasets.DatasetLimits(max_records=2), r"d\.jsonl:3: more than 2 records"),
])
def test_a_file_over_a_limit_is_refused_naming_the_limit(
        tok: Any, tmp_path: Path, limits: datasets.DatasetLimits, says: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "x" * 28}, {"text": "b"},
                                              {"text": "c" * 60}])
    with pytest.raises(DatasetError, match=says):
        load_dataset(path, tok, 64, limits=limits)


def test_a_set_cancel_event_stops_the_read(tok: Any) -> None:
    import threading

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(datasets.DatasetCancelled, match="the daemon is stopping"):
        load_dataset(SAMPLE, tok, 64, cancel=cancel)


@pytest.mark.parametrize("line_bytes", [31, 32, 200])
def test_a_long_line_is_refused_when_it_is_reached_whatever_its_ending(
        tok: Any, tmp_path: Path, line_bytes: int) -> None:
    path = tmp_path / "d.jsonl"
    # A good line, then one over the limit with and without a line ending at the file's end.
    path.write_bytes(b'{"text": "a"}\r\n' + b'{"text": "' + b"x" * (line_bytes - 12) + b'"}')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: line .*over the limit"):
        load_dataset(path, tok, 64, limits=datasets.DatasetLimits(max_line_bytes=30))


def test_lines_at_the_limit_with_crlf_endings_are_read(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    line = b'{"text": "' + b"y" * 18 + b'"}'  # 30 bytes
    path.write_bytes((line + b"\r\n") * 3)
    examples, report = load_dataset(path, tok, 64,
                                    limits=datasets.DatasetLimits(max_line_bytes=30))
    assert report.records == 3 and len(examples) == 3


def test_records_are_checked_as_they_stream_so_a_bad_line_stops_the_read_there(
        tok: Any, tmp_path: Path) -> None:
    # The bad line comes before a tail far over max_bytes: it is reported, not the size,
    # because the file is read one line at a time (st_size is within the limit when opened).
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": 3}\n' + b'{"text": "b"}\n' * 1000)
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: "):
        load_dataset(path, tok, 64)
