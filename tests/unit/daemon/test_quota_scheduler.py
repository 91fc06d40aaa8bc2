"""The daemon's ``QuotaScheduler``: the next-iteration view from telemetry, level changes sent
only when the level changes, idle -> highest level, policy switch, SLO counting."""

from __future__ import annotations

import msgspec
import pytest

from harli.config import SchedulerConfig
from harli.daemon.metrics import Metrics
from harli.daemon.quota_scheduler import QuotaScheduler, next_view, with_arrival
from harli.ipc.decode import IterationTelemetry
from harli.ipc.finetune import MicroStepReport
from harli.predictor import BatchShape, Prediction
from tests.unit.scheduler.fake_predictors import BoundsFromPredict


class Linear(BoundsFromPredict):
    """A fake predictor: 2 ms + 0.5 ms per sequence, x (1 + 0.25 level); bound x1.2."""

    def predict(self, shape: BatchShape, level: int,
                quantile: float | None = None) -> Prediction:
        est = (0.002 + 0.0005 * shape.num_seqs) * self.slowdown(shape, level)
        return Prediction(est, est * 1.2)

    def slowdown(self, shape: BatchShape, level: int) -> float:
        return 1 + 0.25 * level


def tele(running: int, waiting: int = 0, waiting_tokens: int = 0) -> IterationTelemetry:
    return IterationTelemetry(incarnation=1, iteration=1, start_s=0, end_s=0.01,
                              num_running=running, num_waiting=waiting, decode_tokens=running,
                              prefill_tokens=0, context_tokens=100 * running,
                              kv_blocks_total=10, kv_blocks_free=5,
                              waiting_tokens=waiting_tokens)


class FakeQuota:
    """The level in force, recording every level it is handed (``QuotaController``'s part)."""

    def __init__(self, level: int = 2) -> None:
        self.level = level
        self.sent: list[int] = []

    def set_level(self, level: int) -> None:
        self.sent.append(level)
        self.level = level


def make(policy: str = "harli", slo_ms: float = 10.0) -> tuple[QuotaScheduler, list[int]]:
    quota = FakeQuota()
    qs = QuotaScheduler(SchedulerConfig(policy=policy, tpot_slo_ms=slo_ms), 4, Linear(),
                        quota, Metrics(), 2048)
    return qs, quota.sent


def test_next_view_grows_context_and_admits_waiting_prompts() -> None:
    v = next_view(tele(3, waiting=2, waiting_tokens=300), 2048)
    assert (v.num_running, v.decode_tokens, v.prefill_tokens) == (4, 3, 300)
    assert v.context_tokens == 300 + 3
    assert next_view(tele(3, waiting=1, waiting_tokens=5000), 1000).prefill_tokens == 997


def test_level_follows_the_load_and_is_sent_only_on_change() -> None:
    qs, sent = make()
    qs.on_idle(0.0)
    assert sent == [4]  # idle: the highest level at once
    qs.on_idle(0.1)
    assert sent == [4]  # no resend
    # 8 running: bound (2 + 4.5) ms x (1 + 0.25 L) x 1.2 <= 10 ms holds up to level 1.
    qs.on_telemetry(tele(8), 0.2)
    assert sent == [4, 1]
    assert qs.last is not None and qs.last.predicted_upper_s is not None
    assert qs.last.predicted_upper_s <= 0.010
    qs.on_telemetry(tele(40), 0.3)  # nothing fits: decode only
    assert sent[-1] == 0 and "infeasible" in (qs.last.reason if qs.last else "")
    st = qs.status()
    # The second idle tick decided nothing: the level was the highest already.
    assert st.decisions == 3 and st.level_changes == 3 and st.decision_p99_us is not None
    assert st.decision_cpu_p99_us is not None and st.decision_cpu_p99_us >= 0
    assert st.decisions_by_reason == {"idle": {4: 1}, "down": {1: 1}, "infeasible": {0: 1}}


def test_policy_switch_and_bad_policy() -> None:
    qs, sent = make()
    qs.set_policy("static:3", 1.0)
    assert sent[-1] == 3 and qs.status().policy == "static:3"
    qs.on_telemetry(tele(40), 1.1)
    assert sent[-1] == 3  # static ignores the load
    # The counts start again with the policy: the switch's own decision and this one.
    assert qs.status().decisions_by_reason == {"static": {3: 2}}
    with pytest.raises(ValueError, match=r"0\.\.4"):
        qs.set_policy("static:9", 1.2)
    with pytest.raises(ValueError, match="accepted forms"):
        qs.set_policy("fastest", 1.2)
    assert qs.status().policy == "static:3"


def test_slo_is_counted_per_token_and_per_request() -> None:
    qs, _ = make(slo_ms=10.0)
    qs.on_tokens([0.005, 0.012, 0.009, 0.0])
    qs.on_request_done(0.0, 0.026, 4)  # mean TPOT 8.7 ms
    qs.on_request_done(0.0, 0.060, 4)  # 20 ms
    qs.on_request_done(0.0, 0.0, 1)  # one token: no TPOT to judge
    st = qs.status()
    assert st.per_token == pytest.approx(0.75) and st.per_request == pytest.approx(0.5)
    # The metrics are counters, so attainment can be taken over any window.
    sample = qs.metrics.registry.get_sample_value
    assert (sample("harli_slo_tokens_total"), sample("harli_slo_tokens_within_total")) == (4, 3)
    assert (sample("harli_slo_requests_total"),
            sample("harli_slo_requests_within_total")) == (2, 1)


def test_the_slo_and_the_last_decisions_bound_are_exported() -> None:
    qs, _ = make(slo_ms=10.0)
    assert qs.predicted_upper_s is None
    assert qs.metrics.registry.get_sample_value("harli_tpot_slo_seconds") == 0.010
    qs.on_telemetry(tele(8), 0.2)
    assert qs.last is not None and qs.predicted_upper_s == qs.last.predicted_upper_s
    qs.set_policy("harli", 0.3, tpot_slo_ms=25.0)
    assert qs.metrics.registry.get_sample_value("harli_tpot_slo_seconds") == 0.025


def test_measured_tokens_feed_harlis_error_budget_and_status_shows_its_quantile() -> None:
    from harli.scheduler.policy import HarliPolicy

    qs, _ = make(slo_ms=10.0)
    policy = qs.policy
    assert isinstance(policy, HarliPolicy) and policy.budget is not None
    assert policy.budget.window_tokens == SchedulerConfig().budget_tokens
    qs.on_telemetry(tele(8), 0.0)
    assert qs.status().bound_quantile == 0.99  # on target before any token
    qs.on_tokens([0.005] * 3000)  # all within 10 ms
    qs.on_telemetry(tele(8), 0.1)
    assert (qs.status().bound_quantile or 1.0) < 0.99
    before = policy.budget.miss_share
    qs.on_tokens([0.005, 0.02, 0.03])  # two over the SLO
    assert policy.budget.miss_share > before
    qs.set_policy("harli:strict", 1.0)
    qs.on_telemetry(tele(8), 1.1)
    assert qs.status().bound_quantile is None  # the model's own quantile
    # Back to harli: its budget goes on from the tokens it served (the strict turn's tokens
    # are not its own), as if it had run throughout.
    qs.on_tokens([0.05] * 100)
    qs.set_policy("harli", 2.0)
    assert qs.policy.budget is policy.budget  # type: ignore[attr-defined]
    qs.on_telemetry(tele(8), 2.1)
    assert (qs.status().bound_quantile or 1.0) < 0.99
    # A new SLO: the misses counted were against the old one, so the budget starts afresh.
    qs.set_policy("harli", 3.0, tpot_slo_ms=12.0)
    assert qs.policy.budget is not policy.budget  # type: ignore[attr-defined]
    qs.on_telemetry(tele(8), 3.1)
    assert qs.status().bound_quantile == 0.99


def step_report(level: int, tokens: int = 1000, duration_s: float = 0.5,
                job_id: int = 1) -> MicroStepReport:
    return MicroStepReport(job_id=job_id, micro_step=1, step=1, epoch=0, tokens=tokens,
                           step_tokens=tokens, duration_s=duration_s, level=level, loss=1.0,
                           paused_s=0.0, total_steps=10, idle_after_s=0.0)


def test_micro_steps_beside_a_busy_decode_at_one_level_set_its_rate() -> None:
    qs, sent = make(slo_ms=100.0)  # every level feasible at 8 running
    assert qs.rates is not None
    qs.on_telemetry(tele(8), 0.0)
    assert sent == [4]
    qs.on_micro_step(step_report(4), 0.3)  # started at -0.2, before decode was busy
    qs.on_micro_step(step_report(4), 0.7)  # wholly busy at level 4: counts
    assert sum(qs.rates.samples) == 1 and qs.rates.samples[4] == 1
    qs.on_idle(1.0)
    qs.on_micro_step(step_report(4), 1.8)  # decode idle: not a busy rate
    qs.on_micro_step(step_report(3), 1.9)  # not the level in force
    assert sum(qs.rates.samples) == 1
    assert qs.status().busy_rates_tok_s == {}  # fewer than min_samples yet


def test_harli_moves_to_the_level_that_trained_fastest_beside_decode() -> None:
    qs, sent = make(slo_ms=100.0)
    assert qs.rates is not None
    speed = {1: 1000, 2: 2500, 3: 1500, 4: 2000}
    tokens = 1000
    t = 0.0

    def busy_micro_steps(n: int) -> None:
        """``n`` micro-steps of ``tokens`` back to back beside a busy decode, each at the level
        harli (or the static policy) sets as it starts, reported when it ends."""
        nonlocal t
        for _ in range(n):
            qs.on_telemetry(tele(8), t)
            level = sent[-1]
            duration_s = tokens / speed[level]
            qs.on_telemetry(tele(8), t + 0.5 * duration_s)  # still busy, mid-way
            t += duration_s
            qs.on_micro_step(step_report(level, tokens=tokens, duration_s=duration_s), t)

    # Level 2 measured under static:2 (as in the bench), then harli alone.
    qs.on_idle(t)
    qs.set_policy("static:2", t)
    assert sent == [4, 2]
    busy_micro_steps(qs.rates.min_samples)
    qs.set_policy("harli", t)
    busy_micro_steps(qs.rates.min_samples)
    assert qs.rates.samples[4] == qs.rates.min_samples  # harli ran the allowed level first
    busy_micro_steps(2 * qs.rates.min_samples)  # then levels 3 and 1, the unmeasured ones
    qs.on_telemetry(tele(8), t)
    assert sent[-1] == 2
    # Level 1 is left unmeasured: half-way into its first micro-step, the running bound (1000
    # tokens not trained in 0.5 s: under 2000 tok/s) already put it under level 2.
    assert qs.status().busy_rates_tok_s == {lv: pytest.approx(v) for lv, v in speed.items()
                                            if lv != 1}
    assert qs.rates.cap_tok_s[1] == pytest.approx(2000.0)


def test_a_level_that_never_finishes_a_micro_step_beside_a_busy_decode_gets_measured() -> None:
    """Level 4 on CPU: one of its threads on decode's busy core, a micro-step spans several
    busy stretches and ends in an idle one; the busy seconds it had at the level bound the
    level's rate."""
    qs, sent = make(slo_ms=100.0)
    assert qs.rates is not None
    t = 0.0
    qs.on_micro_step(step_report(4, tokens=1024), t)  # a first one, while decode idles
    for _ in range(qs.rates.min_samples):
        for _stretch in range(2):
            qs.on_telemetry(tele(8), t + 0.5)  # busy, the finetune at 4
            assert sent[-1] == 4
            qs.on_idle(t + 2.5)  # 2 s of the micro-step beside a busy decode
            t += 3.0
        qs.on_micro_step(step_report(4, tokens=1024), t)  # it ends while decode idles
    assert qs.rates.samples[4] == qs.rates.min_samples
    assert qs.rates.rate_tok_s[4] == pytest.approx(1024 / 4.0)  # < its tokens in 4 busy s
    qs.on_telemetry(tele(8), t)
    assert sent[-1] == 3  # the next level down is tried now


def test_a_trial_of_a_slow_level_ends_before_its_micro_step_reports() -> None:
    """Seen in a bench: harli tried level 3 (~270 tok/s beside a busy decode) through a whole
    busy phase, waiting for its micro-step to report, with level 2 measured at ~1900. The
    micro-step in flight already bounds level 3 under that once it has had tokens / 1900 s
    there."""
    qs, sent = make(slo_ms=100.0)
    assert qs.rates is not None
    for _ in range(qs.rates.min_samples):
        qs.rates.observe(1, 4, 400, 1.0)
        qs.rates.observe(1, 2, 1900, 1.0)
    qs.on_micro_step(step_report(4, tokens=1024), 0.0)  # ends while decode idles
    qs.on_telemetry(tele(8), 0.1)  # busy: level 4 measured, so level 3 is tried
    assert sent[-1] == 3
    qs.on_telemetry(tele(8), 0.4)  # 0.3 s at 3: 1024 tokens could still take 0.54 s at 1900
    assert sent[-1] == 3 and qs.rates.samples[3] == 0
    qs.on_telemetry(tele(8), 0.7)  # 0.6 s: under 1707 tok/s, slower than level 2
    assert sent[-1] == 1 and qs.rates.samples[3] == 0  # the next unmeasured level, no sample
    assert qs.rates.cap_tok_s[3] == pytest.approx(1024 / 0.6)
    # A job's end leaves no micro-step in flight: the time after it bounds nothing.
    qs.on_step_gap(0.8, same_job=False)
    qs.on_telemetry(tele(8), 5.0)
    assert qs.rates.cap_tok_s[1] == float("inf") and sent[-1] == 1


def test_a_checkpoint_or_a_job_change_starts_the_next_micro_step_afresh() -> None:
    qs, sent = make(slo_ms=100.0)
    assert qs.rates is not None
    qs.on_telemetry(tele(8), 0.0)
    assert sent[-1] == 4
    qs.on_step_gap(3.0)  # a checkpoint at 3 s: the micro-step in flight began there
    qs.on_idle(3.5)
    qs.on_micro_step(step_report(4, tokens=1024), 4.0)
    assert qs.rates.samples[4] == 0  # 0.5 s beside a busy decode bounds nothing


def test_level_by_rate_off_keeps_the_feasible_level() -> None:
    quota = FakeQuota(level=0)
    qs = QuotaScheduler(SchedulerConfig(tpot_slo_ms=100.0, level_by_rate=False), 4, Linear(),
                        quota, Metrics(), 2048)
    assert qs.rates is None
    qs.on_telemetry(tele(8), 0.0)
    qs.on_micro_step(step_report(4), 1.0)
    assert quota.sent == [4] and qs.rates is None


def test_an_arriving_prompt_joins_the_next_iteration_within_the_token_budget() -> None:
    idle = next_view(tele(0), 32)
    v = with_arrival(idle, 100, 32)
    assert (v.num_running, v.num_waiting, v.prefill_tokens, v.prefill_attn_tokens) == \
        (1, 0, 32, 32 * 32)
    busy = next_view(tele(30), 32)  # 30 decode tokens leave room for 2 prompt tokens
    assert with_arrival(busy, 100, 32).prefill_tokens == 2
    full = with_arrival(with_arrival(busy, 100, 32), 50, 32)
    assert (full.num_waiting, full.prefill_tokens) == (1, 2)  # no room left: it waits


def test_adapter_requests_are_counted_in_the_view_the_predictor_sees() -> None:
    t = msgspec.structs.replace(tele(6), lora_requests=2, lora_adapters=2)
    v = next_view(t, 2048)
    assert v.lora_requests == 2 and v.shape().lora_requests == 2
    assert with_arrival(v, 10, 2048, lora=True).lora_requests == 3
    assert with_arrival(v, 10, 2048).lora_requests == 2
    # An arrival that must wait is not in the next batch, adapter or not.
    assert with_arrival(next_view(tele(32), 32), 10, 32, lora=True).lora_requests == 0


def test_an_arrival_on_an_idle_decode_lowers_the_level_before_any_telemetry() -> None:
    # Idle: level 4. One prompt of 32 tokens: bound 2.5 ms x (1 + 0.25 L) x 1.2 <= 4 ms
    # holds up to level 1, so the finetune steps back at the arrival, not one iteration later.
    qs, sent = make(slo_ms=4.0)
    qs.on_idle(0.0)
    assert sent == [4]
    qs.on_arrival(32, 0.1)
    assert sent == [4, 1]
    assert qs.view.num_running == 1


@pytest.mark.parametrize("attainment", [0.95, 0.99, 0.999])
def test_the_daemons_predictor_bound_stands_for_the_attainment_target(attainment: float) -> None:
    from harli.config import load
    from harli.daemon.latency import LatencyTracker

    cfg = load(None, [f"scheduler.attainment={attainment}"])
    tracker = LatencyTracker.load(cfg, Metrics())
    assert tracker.model.stats()["bound_quantile"] == attainment


def test_each_policys_decision_times_are_kept_across_switches() -> None:
    qs, _ = make()
    for i in range(5):
        qs.on_telemetry(tele(8), 0.1 * i)
    assert qs.status().decisions == 5
    qs.set_policy("static:2", 1.0)
    assert qs.status().decisions == 1  # its own: the switch's decision
    qs.set_policy("harli", 2.0)
    qs.on_telemetry(tele(8), 2.1)
    st = qs.status()
    # harli's five, the switch's decision and one more; by reason only since the switch.
    assert st.decisions == 7 and sum(sum(v.values()) for v in
                                     st.decisions_by_reason.values()) == 2
