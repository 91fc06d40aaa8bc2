"""``QuotaScheduler``: the daemon's side of the SLO scheduler.

After every decode iteration's telemetry it builds the view of the next iteration (the same
running requests, each one token longer, plus the prompts waiting), asks the configured policy
for the finetune's quota level and, when the level changes, hands it to the ``QuotaController``
(which sends the new ``Decision``). It also counts SLO attainment from the engine's token
times, per token and per request, and hands the per-token counts to the policy (``harli``'s
error budget). From the finetune's micro-step reports it measures each level's training rate
beside a busy decode (``LevelRates``, kept across policy switches). The policy is switchable at
run time (``harli policy SPEC``); each budgeted spelling's error budget is kept across
switches too, so a policy that comes back (``harli bench`` turns them every few seconds) goes
on from the tokens it served before, as it would had it run throughout.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from typing import Protocol

from harli.config import HarliConfig, SchedulerConfig
from harli.daemon.disabled import NullScheduler
from harli.daemon.metrics import Metrics
from harli.ipc.control import SchedulerStatus
from harli.ipc.decode import IterationTelemetry
from harli.ipc.finetune import MicroStepReport
from harli.scheduler.budget import ErrorBudget
from harli.scheduler.policy import (
    BatchView,
    LatencyPredictor,
    Policy,
    PolicyDecision,
    parse_policy,
)
from harli.scheduler.rates import LevelRates
from harli.scheduler.slo import SloCounter, SloTarget

logger = logging.getLogger(__name__)

_TIMES_KEPT = 20_000  # decision times per policy; status() sorts them on the daemon's loop
_IDLE = BatchView(num_running=0, num_waiting=0, decode_tokens=0, prefill_tokens=0,
                  context_tokens=0)


def with_arrival(view: BatchView, prompt_tokens: int, max_batched_tokens: int,
                 lora: bool = False) -> BatchView:
    """``view`` once a new prompt of ``prompt_tokens`` (for an adapter when ``lora``) joins
    the queue: it prefills in the next iteration as far as the token budget left by the
    running requests allows."""
    room = max(0, max_batched_tokens - view.decode_tokens - view.prefill_tokens)
    take = min(prompt_tokens, room)
    if not take:
        return dataclasses.replace(view, num_waiting=view.num_waiting + 1)
    return dataclasses.replace(view, num_running=view.num_running + 1,
                               prefill_tokens=view.prefill_tokens + take,
                               prefill_attn_tokens=view.prefill_attn_tokens + take * take,
                               lora_requests=view.lora_requests + int(lora))


def next_view(t: IterationTelemetry, max_batched_tokens: int) -> BatchView:
    """The next iteration as far as the daemon can tell from this one's telemetry: the running
    requests decode one more token each, and waiting prompts start prefilling (vLLM admits at
    most ``max_batched_tokens`` per iteration). Which model a waiting prompt names is not in
    the telemetry: the adapter requests counted are those running."""
    prefill = min(t.waiting_tokens, max(0, max_batched_tokens - t.num_running))
    return BatchView(num_running=t.num_running + (1 if prefill else 0),
                     num_waiting=t.num_waiting, decode_tokens=t.num_running,
                     prefill_tokens=prefill,
                     context_tokens=t.context_tokens + t.decode_tokens + t.prefill_tokens,
                     prefill_attn_tokens=prefill * prefill, lora_requests=t.lora_requests)


class QuotaLevel(Protocol):
    """Who holds the level in force and sends each new one (``QuotaController``)."""

    @property
    def level(self) -> int: ...

    def set_level(self, level: int) -> None: ...


class QuotaScheduler:
    def __init__(self, cfg: SchedulerConfig, levels: int, model: LatencyPredictor,
                 quota: QuotaLevel, metrics: Metrics, max_batched_tokens: int,
                 dominated_by: Sequence[int | None] = (),
                 spills: Sequence[bool] = ()) -> None:
        self.cfg = cfg
        self.levels = levels
        self.model = model
        self.slo = SloTarget(cfg.tpot_slo_ms, cfg.attainment)
        self.counter = SloCounter(self.slo)
        self._quota = quota
        self.metrics = metrics
        self.max_batched_tokens = max_batched_tokens
        self.rates = LevelRates(levels, dominated_by=dominated_by, spills=spills) \
            if cfg.level_by_rate else None
        # Since when the level in force and decode's busy/idle state have held: a micro-step
        # report counts toward a level's rate only if neither changed while it ran.
        self._level_since = -float("inf")
        self._busy = False
        self._busy_since = -float("inf")
        # When the finetune's micro-step in flight began, as far as the daemon knows, and the
        # seconds of it each level has run beside a busy decode (stretches that ended).
        self._step_since = -float("inf")
        self._busy_s_by_level: defaultdict[int, float] = defaultdict(float)
        # The job and tokens of the micro-step in flight, from the last report (0: none known,
        # after a job's start or end or the finetune's exit).
        self._job_id = -1
        self._step_tokens = 0
        self.spec = ""
        # Each budgeted spelling's error budget (harli, harli:max), fed only while it is in
        # force; dropped when the SLO changes (they count misses of the old one).
        self._budgets: dict[str, ErrorBudget] = {}
        self.policy: Policy = self._parse(cfg.policy)
        self.spec = cfg.policy.strip().lower()
        self._keep_budget(self.policy)
        self.last: PolicyDecision | None = None
        self.view = _IDLE  # what the last decision was made for
        # Decision times (wall and thread CPU, us) of each policy spelling, the last
        # _TIMES_KEPT of them, kept across switches like the budgets: status() shows the
        # percentiles of the one in force over all its turns.
        self._times: dict[str, tuple[deque[float], deque[float]]] = {}
        self.decision_us, self.decision_cpu_us = self._times_of(self.spec)
        self.level_changes = 0
        self.by_reason: defaultdict[str, Counter[int]] = defaultdict(Counter)
        metrics.tpot_slo_s.set_function(lambda: self.slo.tpot_s)

    @property
    def predicted_upper_s(self) -> float | None:
        """The last decision's predicted upper bound on a token's latency (None: none)."""
        return self.last.predicted_upper_s if self.last is not None else None

    @property
    def tpot_slo_s(self) -> float:
        return self.slo.tpot_s

    def _parse(self, spec: str, slo: SloTarget | None = None) -> Policy:
        key = spec.strip().lower()
        budgets = self._budgets if slo is None or slo == self.slo else {}
        return parse_policy(spec, self.model, self.levels, slo or self.slo,
                            budget_tokens=self.cfg.budget_tokens,
                            budget_max_factor=self.cfg.budget_max_factor, rates=self.rates,
                            infeasible_slowdown=self.cfg.infeasible_slowdown,
                            budget=budgets.get(key))

    def _times_of(self, spec: str) -> tuple[deque[float], deque[float]]:
        if spec not in self._times:
            self._times[spec] = (deque(maxlen=_TIMES_KEPT), deque(maxlen=_TIMES_KEPT))
        return self._times[spec]

    def _keep_budget(self, policy: Policy) -> None:
        budget = getattr(policy, "budget", None)
        if isinstance(budget, ErrorBudget):
            self._budgets[self.spec] = budget

    def set_policy(self, spec: str, now: float, tpot_slo_ms: float | None = None) -> None:
        """Switch policy, and the SLO with it if given (ValueError naming the accepted forms
        or the bad SLO; nothing changes then)."""
        slo = self.slo if tpot_slo_ms is None else SloTarget(tpot_slo_ms, self.slo.attainment)
        policy = self._parse(spec, slo)
        if slo != self.slo:
            self.slo = slo
            self.counter = SloCounter(slo)
            self._budgets.clear()
            logger.info("[scheduler] TPOT SLO -> %.2f ms", slo.tpot_ms)
        self.policy = policy
        self.by_reason.clear()  # why it decided what, since this switch
        self.spec = spec.strip().lower()
        self.decision_us, self.decision_cpu_us = self._times_of(self.spec)
        self._keep_budget(policy)
        logger.info("[scheduler] policy -> %s", self.spec)
        self.decide(_IDLE if self.last is None else None, now)

    def decide(self, view: BatchView | None, now: float) -> None:
        view = view or _IDLE
        self.view = view
        self._note_busy(not view.idle, now)
        t0 = time.perf_counter()
        c0 = time.thread_time()
        d = self.policy.decide(view, now)
        dt_us = (time.perf_counter() - t0) * 1e6
        self.decision_us.append(dt_us)
        self.decision_cpu_us.append((time.thread_time() - c0) * 1e6)
        self.metrics.decision_s.observe(dt_us / 1e6)
        self.last = d
        self.by_reason[d.kind][d.level] += 1
        if d.level != self._quota.level:
            self._stretch_ends(now)
            self.level_changes += 1
            self._level_since = now
            self._quota.set_level(d.level)

    def on_telemetry(self, t: IterationTelemetry, now: float) -> None:
        self._bound_trial(now)
        self.decide(next_view(t, self.max_batched_tokens), now)

    def _bound_trial(self, now: float) -> None:
        """While decode is busy at a level ``LevelRates`` is still trying (unmeasured), the
        micro-step in flight bounds that level's rate already: it has not trained its tokens
        in the busy seconds it has had there (``LevelRates.bound_running``)."""
        rates, level = self.rates, self._quota.level
        if (rates is None or not self._busy or not self._step_tokens
                or not 1 <= level <= self.levels or rates.samples[level] >= rates.min_samples):
            return
        seconds = self._busy_s_by_level.get(level, 0.0) + self._open_stretch_s(now)
        rates.bound_running(self._job_id, level, self._step_tokens, seconds)

    def _open_stretch_s(self, now: float) -> float:
        """Seconds the micro-step in flight has run, up to ``now``, since decode's busy/idle
        state, the level in force and the micro-step itself last changed."""
        return now - max(self._busy_since, self._level_since, self._step_since)

    def on_arrival(self, prompt_tokens: int, now: float, lora: bool = False) -> None:
        """A request was handed to decode: decide now, not after its first iteration's
        telemetry. From an idle decode this is the moment the finetune must step back (the
        highest level is taken when nothing runs), and the prefill is the iteration that
        would otherwise run beside it."""
        self.decide(with_arrival(self.view, prompt_tokens, self.max_batched_tokens, lora), now)

    def _note_busy(self, busy: bool, now: float) -> None:
        if busy != self._busy:
            self._stretch_ends(now)
            self._busy, self._busy_since = busy, now

    def _stretch_ends(self, now: float) -> None:
        """Decode's busy stretch, or the level in force, ends at ``now``: the micro-step in
        flight ran the part of it since it began at that level beside a busy decode."""
        level = self._quota.level
        if self._busy and 1 <= level <= self.levels:
            seconds = self._open_stretch_s(now)
            if seconds > 0.0:
                self._busy_s_by_level[level] += seconds

    def on_idle(self, now: float) -> None:
        """No request is left in the engine: the next decision is for an idle decode."""
        self._note_busy(False, now)
        if self.last is None or self.last.level != self.levels or \
                self._quota.level != self.last.level:
            self.decide(_IDLE, now)

    def on_tokens(self, gaps_s: list[float]) -> None:
        """One decode iteration's inter-token gaps, of every request that got a token."""
        missed = self.counter.on_token_gaps(gaps_s)
        self.policy.on_tokens(len(gaps_s), missed)
        self.metrics.on_slo_tokens(len(gaps_s), len(gaps_s) - missed)
        for g in gaps_s:
            self.metrics.tpot_s.observe(g)

    def on_micro_step(self, r: MicroStepReport, now: float) -> None:
        """A finetune micro-step ended (reported at ``now``): if it ran wholly at the level in
        force, beside a busy decode, it counts toward that level's rate."""
        if self.rates is None or r.level < 1 or r.level > self.levels:
            return
        seconds = r.duration_s + r.idle_after_s
        started = now - r.duration_s
        if (self._busy and self._busy_since <= started and self._level_since <= started
                and r.level == self._quota.level and seconds > 0.0):
            self.rates.observe(r.job_id, r.level, r.step_tokens, seconds)
        else:
            # Not wholly at one level beside a busy decode, but each level it ran at there
            # trained fewer than its tokens in the time it had: a bound on that level's rate.
            # Without it a level too slow to finish a micro-step within one busy stretch
            # (level 4 on CPU) would never be measured.
            self._stretch_ends(now)
            for level, busy_s in self._busy_s_by_level.items():
                self.rates.observe_unfinished(r.job_id, level, r.step_tokens, busy_s)
        self.on_step_gap(now + r.idle_after_s)  # the next one starts after the duty idle
        self._job_id, self._step_tokens = r.job_id, r.step_tokens  # and is as long

    def on_step_gap(self, now: float, same_job: bool = True) -> None:
        """The finetune's next micro-step starts only at ``now``: after a report's duty idle
        or a checkpoint (``same_job``: one as long as the last), or a job's start or end or
        the finetune's exit (none in flight whose length the daemon knows)."""
        self._step_since = now
        self._busy_s_by_level.clear()
        if not same_job:
            self._step_tokens = 0

    def on_request_done(self, first_s: float, last_s: float, n_tokens: int) -> None:
        c = self.counter
        judged, within = c.requests, c.requests_ok
        c.on_request(first_s, last_s, n_tokens)
        if c.requests > judged:
            self.metrics.on_slo_request(within=c.requests_ok > within)

    def status(self) -> SchedulerStatus:
        us = sorted(self.decision_us)
        cpu = sorted(self.decision_cpu_us)
        return SchedulerStatus(
            policy=self.spec, tpot_slo_ms=self.slo.tpot_ms, attainment_target=self.slo.attainment,
            per_token=self.counter.per_token(), per_request=self.counter.per_request(),
            tokens=self.counter.tokens, requests=self.counter.requests,
            decisions=len(us), level_changes=self.level_changes,
            decision_p50_us=us[len(us) // 2] if us else None,
            decision_p99_us=_p99(us),
            last_reason=self.last.reason if self.last else None,
            decision_cpu_p99_us=_p99(cpu),
            bound_quantile=self.last.quantile if self.last else None,
            busy_rates_tok_s=self.rates.snapshot() if self.rates else {},
            decisions_by_reason={k: dict(v) for k, v in self.by_reason.items()})


def scheduler_for(cfg: HarliConfig, model: LatencyPredictor, quota: QuotaLevel, metrics: Metrics,
                  dominated_by: Sequence[int | None],
                  spills: Sequence[bool] = ()) -> QuotaScheduler | NullScheduler:
    """The daemon's scheduler: a null one where finetuning is off (no quota to decide)."""
    if not cfg.finetune.enabled:
        return NullScheduler()
    scheduler = QuotaScheduler(cfg.scheduler, cfg.finetune.levels, model, quota, metrics,
                               cfg.decode.max_num_batched_tokens or 2048, dominated_by, spills)
    logger.info("[scheduler] policy %s, TPOT SLO %.1f ms at %.1f%%", cfg.scheduler.policy,
                cfg.scheduler.tpot_slo_ms, 100 * cfg.scheduler.attainment)
    return scheduler


def _p99(sorted_us: list[float]) -> float | None:
    return sorted_us[min(len(sorted_us) - 1, int(0.99 * len(sorted_us)))] if sorted_us else None
