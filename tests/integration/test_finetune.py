"""The finetune half on the real daemon: LoRA jobs attached while decode serves, the adapter
learns and loads in PEFT and vLLM, cancel in every state, priorities."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harli.bench.local_daemon import LocalDaemon
from harli.client.control import ControlClient
from harli.client.inference import RequestError
from harli.datasets import SAMPLE_DATASET
from harli.ipc.control import JobInfo
from harli.ipc.jobs import JobSpec

from .conftest import make_daemon

pytestmark = [pytest.mark.integration, pytest.mark.multiproc, pytest.mark.slow]

DIGITS = SAMPLE_DATASET
TASK_PROMPT = ("### Instruction:\nWrite these numbers as digits.\n\n### Input:\n{}\n\n"
               "### Response:\n")


def spec(tmp: Path, name: str, **kw: object) -> JobSpec:
    fields: dict[str, object] = {"name": name, "dataset": str(DIGITS),
                                 "output_dir": str(tmp / name), "max_seq_len": 128,
                                 "micro_batch_size": 8, "learning_rate": 5e-3,
                                 "lr_schedule": "constant", "max_steps": 40,
                                 "checkpoint_every": 10}
    fields.update(kw)
    return JobSpec(**fields)  # type: ignore[arg-type]


def wait_job(c: ControlClient, job_id: int, pred: Callable[[JobInfo], bool],
             timeout_s: float = 300) -> JobInfo:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = c.show(job_id).job
        if pred(job):
            return job
        assert job.status != "failed", job.error
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached the state; last: {job}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ft(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[LocalDaemon]:
    with make_daemon(tmp_path_factory.mktemp("ft"), tiny_model,
                     f"metrics.port={free_port()}") as d:
        yield d


@pytest.fixture
def ctl(ft: LocalDaemon) -> Iterator[ControlClient]:
    with ControlClient(ft.cfg.control_endpoint) as c:
        yield c


def test_sample_job_learns_while_decode_serves(ft: LocalDaemon, ctl: ControlClient,
                                               tmp_path: Path) -> None:
    from harli.bench.offline import OfflineRunner
    from harli.finetune_proc.evaluate import evaluate_adapter

    job = ctl.attach(spec(tmp_path, "learn", max_steps=150, checkpoint_every=50))
    assert job.status == "validating_files" and job.dataset_report is None
    job = ctl.wait_validated(job.job_id)
    assert job.status in ("queued", "running") and job.dataset_report is not None
    assert job.dataset_report["records"] == 400 and job.dataset_report["truncated"] == 0

    served: list[int] = []
    stop = threading.Event()

    def serve() -> None:  # decode traffic all along; every request gets all its tokens
        with ft.client(timeout_s=60) as c:
            while not stop.is_set():
                out = c.complete([11, 12, 13], max_tokens=32, ignore_eos=True)
                assert len(out.token_ids) == 32
                served.append(len(out.token_ids))

    t = threading.Thread(target=serve)
    t.start()
    try:
        done = wait_job(ctl, job.job_id, lambda j: j.status == "succeeded", 600)
    finally:
        stop.set()
        t.join(60)
    assert len(served) >= 5
    assert done.step == 150 and done.micro_steps == 150 and done.checkpoint_step == 150
    assert done.first_loss is not None and done.loss is not None
    assert done.loss <= done.first_loss / 2, (done.first_loss, done.loss)
    assert done.tokens > 0 and done.level == ft.cfg.finetune.level
    assert done.adapter_path == str(tmp_path / "learn" / "adapter")

    # The adapter, loaded with PEFT, halves the response loss and predicts the task's tokens.
    ev = evaluate_adapter(ft.cfg.model_path, done.adapter_path, DIGITS, 128)
    assert ev.adapter_loss <= ev.base_loss / 2, ev
    assert ev.adapter_accuracy >= ev.base_accuracy + 0.3, ev

    # The same adapter loads in vLLM (LoRARequest) and moves greedy output towards digits.
    prompts = [TASK_PROMPT.format(w) for w in ("three one four", "two seven", "nine nine one")]
    with OfflineRunner(ft.cfg, max_lora_rank=8) as llm:
        base = llm.generate(prompts, 8)["text"]
        tuned = llm.generate(prompts, 8, lora_path=done.adapter_path)["text"]

    def digit_share(texts: list[str]) -> float:
        chars = [ch for t in texts for ch in t if not ch.isspace()]
        return sum(ch.isdigit() for ch in chars) / max(len(chars), 1)

    assert digit_share(tuned) >= 0.8 > digit_share(base) + 0.5, (base, tuned)


def _scrape(url: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_prometheus_metrics_for_decode_and_jobs(ft: LocalDaemon, ctl: ControlClient,
                                                tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    job = ctl.attach(spec(tmp_path, "metrics", max_steps=5))
    wait_job(ctl, job.job_id, lambda j: j.status == "succeeded")
    with ft.client() as c:
        c.complete([1, 2, 3], max_tokens=4, ignore_eos=True)
        c.complete([4, 5, 6], max_tokens=4, ignore_eos=True, model="metrics")  # its adapter
    url = f"http://127.0.0.1:{ft.cfg.metrics.port}/metrics"
    values = _scrape(url)
    deadline = time.monotonic() + 10
    m = 'engine="0",model_name="tiny"'  # the base model's directory name
    while values[f"vllm:num_requests_running{{{m}}}"] != 0:  # vLLM's last step records 0
        assert time.monotonic() < deadline, "running requests never went back to 0"
        time.sleep(0.1)
        values = _scrape(url)
    j = str(job.job_id)
    # The job's series stay a while after it ends: a scrape sees its final values.
    assert values[f'harli_job_steps{{job="{j}"}}'] == 5
    assert values[f'harli_job_micro_steps{{job="{j}"}}'] == 5
    assert values[f'harli_job_tokens_trained{{job="{j}"}}'] > 0
    assert f'harli_job_loss{{job="{j}"}}' in values
    assert values["harli_finetune_quota_level"] == ft.cfg.finetune.level
    assert values["harli_decode_iterations_total"] >= 4
    assert values['harli_requests_total{outcome="length"}'] >= 2
    assert values['harli_child_restarts_total{child="decode"}'] == 0
    assert values["harli_tpot_slo_seconds"] == ft.cfg.scheduler.tpot_slo_ms / 1000
    assert values["harli_slo_tokens_total"] >= values["harli_slo_tokens_within_total"] > 0
    # vLLM's contract, as a router reads it.
    assert values[f"vllm:num_requests_waiting{{{m}}}"] == 0
    assert values[f"vllm:kv_cache_usage_perc{{{m}}}"] == 0
    assert values['vllm:request_success_total{engine="0",finished_reason="length",'
                  'model_name="tiny"}'] >= 2
    assert values[f"vllm:prompt_tokens_total{{{m}}}"] >= 6
    assert values[f"vllm:generation_tokens_total{{{m}}}"] >= 8
    for hist in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert values[f"vllm:{hist}_seconds_count{{{m}}}"] >= 2, hist
    assert values[f"vllm:inter_token_latency_seconds_count{{{m}}}"] >= 6
    # vLLM keeps a series per combination of adapters seen, stamped with the time it was
    # last true: a router reads the newest. The adapter ran; nothing runs now.
    infos = [k for k in values if k.startswith("vllm:lora_requests_info{")]
    assert any('running_lora_adapters="metrics"' in k for k in infos), infos
    newest = max(infos, key=lambda k: values[k])
    assert 'max_lora="4"' in newest and 'running_lora_adapters=""' in newest
    assert values[newest] > 1e9
    assert not [k for k in values if k.startswith(("process_", "python_"))]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url.replace("/metrics", "/"), timeout=10)
    assert e.value.code == 404
    page = ctl.metrics_page()  # the same page over the control API
    assert f"vllm:num_requests_running{{{m}}} 0.0" in page.text
    # The attach tokenized the dataset; the finetune read it from the cache, not the file.
    assert ctl.show(job.job_id).job.dataset_report["source"] == "cache"
    assert values["harli_dataset_retokenized_total"] == 0


def test_a_job_with_a_validation_file_logs_scores_checkpoints_and_plots(
        ft: LocalDaemon, ctl: ControlClient, tmp_path: Path) -> None:
    import subprocess
    import sys

    from transformers import TrainerState

    from harli.ipc.control import TrainMetric, ValidMetric

    valid = tmp_path / "valid.jsonl"  # 32 records of the task (it is learnt, not memorised)
    valid.write_text("\n".join(DIGITS.read_text().splitlines()[-32:]) + "\n")
    job = ctl.wait_validated(ctl.attach(spec(tmp_path, "scored", validation_file=str(valid),
                                             max_steps=20, checkpoint_every=10)).job_id)
    assert job.dataset_report is not None and job.dataset_report["validation_records"] == 32
    done = wait_job(ctl, job.job_id, lambda j: j.status == "succeeded")
    logs = ctl.all_logs(job.job_id)
    train = [m for m in logs.metrics if isinstance(m, TrainMetric)]
    scores = [m for m in logs.metrics if isinstance(m, ValidMetric)]
    # A metric event at every optimizer step, a score at each checkpoint.
    assert [m.step for m in train] == list(range(1, 21))
    assert all(m.train_loss is not None and m.tokens_per_s > 0 for m in train)
    assert {m.level for m in train} == {ft.cfg.finetune.level}
    assert train[-1].tokens == done.tokens and train[-1].epoch > train[0].epoch
    assert [(m.step, m.examples) for m in scores] == [(10, 32), (20, 32)]
    assert scores[1].valid_loss < scores[0].valid_loss < train[0].train_loss  # type: ignore[operator]
    assert scores[1].valid_accuracy > scores[0].valid_accuracy
    assert (done.valid_loss, done.valid_accuracy) == (scores[1].valid_loss,
                                                      scores[1].valid_accuracy)
    assert "valid_loss" in [e.message for e in logs.events if e.kind == "checkpoint"][-1]

    # The last checkpoint's trainer_state.json, read by HF's own loader, holds the whole run.
    ckpt = tmp_path / "scored" / "checkpoint-20"
    hf = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    assert hf.global_step == 20 and hf.max_steps == 20 and hf.save_steps == 10
    assert [e["loss"] for e in hf.log_history if "loss" in e] == pytest.approx(
        [m.train_loss for m in train])
    evals = [e for e in hf.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [m.step for m in scores]
    assert [e["eval_loss"] for e in evals] == pytest.approx([m.valid_loss for m in scores])
    assert hf.best_global_step == 20 and hf.best_model_checkpoint == str(ckpt)

    def harli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "harli.cli.main", *argv, "--endpoint",
                               ft.cfg.control_endpoint], capture_output=True, text=True,
                              timeout=60, check=False)

    png = tmp_path / "loss.png"
    res = harli("job", "plot", str(job.job_id), "--out", str(png))
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = harli("job", "logs", str(job.job_id))
    assert res.returncode == 0, res.stderr
    assert " step 20: valid_loss " in res.stdout and " step 1: train_loss " in res.stdout
    res = harli("job", "plot", "999999", "--out", str(tmp_path / "none.png"))
    assert (res.returncode, res.stderr) == (1, "harli job: unknown_request: no job with id "
                                               "999999\n")


def test_cancel_in_every_state_and_priority_order(ft: LocalDaemon, ctl: ControlClient,
                                                  tmp_path: Path) -> None:
    running = ctl.attach(spec(tmp_path, "long", max_steps=10_000, checkpoint_every=5))
    wait_job(ctl, running.job_id, lambda j: j.step >= 6)
    low = ctl.attach(spec(tmp_path, "low", priority=0))
    high = ctl.attach(spec(tmp_path, "high", priority=5))
    assert ctl.cancel(low.job_id).status == "cancelled"  # validating -> cancelled at once
    assert ctl.cancel(low.job_id).status == "cancelled"  # cancelling again changes nothing
    ctl.cancel(running.job_id)  # running -> stops at its next micro-step boundary
    stopped = wait_job(ctl, running.job_id, lambda j: j.status == "cancelled")
    assert stopped.checkpoint_step is not None and stopped.checkpoint_step >= 5
    assert (tmp_path / "long" / f"checkpoint-{stopped.checkpoint_step}").is_dir()
    # The higher-priority job runs next and finishes; cancel after success changes nothing.
    finished = wait_job(ctl, high.job_id, lambda j: j.status == "succeeded")
    assert ctl.cancel(high.job_id).status == "succeeded"
    assert finished.started_s is not None
    kinds = [e.kind for e in ctl.logs(running.job_id).events]
    assert kinds[0] == "attached" and "cancel" in kinds and kinds[-1] == "cancelled"


def test_cancel_a_paused_job(tmp_path: Path, tiny_model: Path) -> None:
    with make_daemon(tmp_path / "d", tiny_model, "finetune.level=0",
                     'scheduler.policy="static:0"') as d, \
            ControlClient(d.cfg.control_endpoint) as c:
        job = c.attach(spec(tmp_path, "paused"))
        paused = wait_job(c, job.job_id, lambda j: j.status == "paused")
        assert paused.micro_steps == 0
        c.cancel(job.job_id)
        wait_job(c, job.job_id, lambda j: j.status == "cancelled")


# -- bad input: refused at attach time (nothing stored), or failed by the check of its files ----


def _refused(ctl: ControlClient, s: JobSpec) -> str:
    """What the daemon says of a spec it refuses at once: an ``invalid`` error, nothing
    stored."""
    before = len(ctl.jobs())
    with pytest.raises(RequestError) as ei:
        ctl.attach(s)
    assert len(ctl.jobs()) == before, "a refused job was stored"
    assert ei.value.code == "invalid"
    return ei.value.message


def _failed(ctl: ControlClient, s: JobSpec) -> str:
    """The error of a job stored at once whose files then failed their check."""
    job = ctl.attach(s)
    assert job.status == "validating_files"
    done = ctl.wait_validated(job.job_id)
    assert done.status == "failed" and done.error is not None, done
    assert done.error in ctl.logs(job.job_id).events[-1].message
    return done.error


def test_missing_dataset(ctl: ControlClient, tmp_path: Path) -> None:
    msg = _failed(ctl, spec(tmp_path, "b1", dataset=str(tmp_path / "nope.jsonl")))
    assert "nope.jsonl" in msg and "does not exist" in msg


def test_dataset_that_is_a_directory(ctl: ControlClient, tmp_path: Path) -> None:
    assert str(tmp_path) in _failed(ctl, spec(tmp_path, "b2", dataset=str(tmp_path)))


def test_empty_dataset(ctl: ControlClient, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    msg = _failed(ctl, spec(tmp_path, "b3", dataset=str(tmp_path / "empty.jsonl")))
    assert "no records" in msg


def test_malformed_line_names_file_and_line(ctl: ControlClient, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    assert f"{bad}:3" in _failed(ctl, spec(tmp_path, "b4", dataset=str(bad)))
    msg = _failed(ctl, spec(tmp_path, "b4v", validation_file=str(bad)))
    assert msg.startswith(f"validation_file: {bad}:3"), msg


def test_unknown_target_module(ctl: ControlClient, tmp_path: Path) -> None:
    s = spec(tmp_path, "b5")
    s = JobSpec(**{**{f: getattr(s, f) for f in s.__struct_fields__},
                   "lora": type(s.lora)(target_modules=["q_proj", "qkv_fused"])})
    msg = _refused(ctl, s)
    assert "qkv_fused" in msg and "q_proj" in msg


def test_job_for_another_base_model(ctl: ControlClient, tmp_path: Path) -> None:
    msg = _refused(ctl, spec(tmp_path, "b6", base_model="/models/Llama-3-8B"))
    assert "/models/Llama-3-8B" in msg and "serves" in msg


def test_output_dir_is_confined_to_the_output_roots(ft: LocalDaemon, ctl: ControlClient,
                                                    tmp_path: Path) -> None:
    for outside in ("/", "/proc/harli-out", "/tmp/harli-elsewhere"):
        msg = _refused(ctl, spec(tmp_path, "b7", output_dir=outside))
        assert outside in msg and "outside the output roots" in msg, msg
    assert not Path("/adapter").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("someone else's")
    msg = _refused(ctl, spec(tmp_path, "b7", output_dir=str(full)))
    assert "not empty" in msg
    assert (full / "notes.txt").read_text() == "someone else's"
    # No output_dir: the daemon's output root, named for the job.
    job = ctl.attach(spec(tmp_path, "b7-default", output_dir="", max_steps=1))
    assert job.spec.output_dir == str(ft.cfg.output_roots[0] / "b7-default")


def test_duplicate_job_name(ctl: ControlClient, tmp_path: Path) -> None:
    ctl.attach(spec(tmp_path, "dup", max_steps=1))
    msg = _refused(ctl, spec(tmp_path, "dup", output_dir=str(tmp_path / "other")))
    assert "'dup'" in msg


def test_records_longer_than_max_len_are_truncated_and_reported(
        ctl: ControlClient, tmp_path: Path) -> None:
    long = tmp_path / "long.jsonl"
    long.write_text("".join(f'{{"prompt": "{"one two " * 40}", "completion": "3"}}\n'
                            for _ in range(5)) + '{"prompt": "a", "completion": "b"}\n')
    job = ctl.wait_validated(ctl.attach(spec(tmp_path, "trunc", dataset=str(long),
                                             max_seq_len=32, max_steps=1)).job_id)
    assert job.dataset_report is not None and job.dataset_report["truncated"] == 5
    assert any("5 truncated to 32 tokens" in e.message for e in ctl.logs(job.job_id).events)


def test_cli_attach_waits_for_the_check_and_prints_the_id_or_the_line_at_fault(
        ft: LocalDaemon, tmp_path: Path) -> None:
    import subprocess
    import sys

    def attach(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "harli.cli.main", "attach", *args,
                               "--endpoint", ft.cfg.control_endpoint], capture_output=True,
                              text=True, timeout=120, check=False)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    res = attach(str(bad), "--name", "cli-bad")
    assert res.returncode == 1 and res.stdout.strip().isdigit(), res
    assert f"failed the check of its files: {bad}:2: field 'text'" in res.stderr
    res = attach(str(DIGITS), "--name", "cli-good", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "cli-good"))
    assert res.returncode == 0 and res.stdout.strip().isdigit(), res  # the id alone
    with ControlClient(ft.cfg.control_endpoint) as c:
        assert c.show(int(res.stdout)).job.status != "validating_files"


def test_cli_job_file_with_a_bad_key(ft: LocalDaemon, tmp_path: Path) -> None:
    import subprocess
    import sys

    f = tmp_path / "job.toml"
    f.write_text(f'dataset = "{DIGITS}"\nname = "cli"\nlearning_rat = 0.1\n')
    res = subprocess.run([sys.executable, "-m", "harli.cli.main", "attach", "--spec", str(f),
                          "--endpoint", ft.cfg.control_endpoint], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 2 and "learning_rat" in res.stderr
