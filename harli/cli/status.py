"""``harli status [--json]``: the daemon's children, decode, the arena ledger and jobs."""

from __future__ import annotations

import argparse
import json
import time

from harli.cli.command import Command, add_endpoint_arguments, control_client
from harli.ipc.control import PredictorStatus


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


class StatusCommand(Command):
    name = "status"
    help = "show the daemon's state, the memory ledger and jobs"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON, not tables")
        add_endpoint_arguments(p)

    def run(self, args: argparse.Namespace) -> int:
        from rich.console import Console
        from rich.table import Table

        from harli.client.control import to_jsonable

        with control_client(args, timeout_s=10.0) as c:
            st = c.status()
        if args.json:
            print(json.dumps(to_jsonable(st)))
            return 0
        con = Console()
        con.print(f"daemon pid {st.pid}: [bold]{st.state}[/bold], model {st.model or '-'}, "
                  f"{st.decode_iterations} decode iterations; job running: "
                  f"{st.job_running or '-'}, queued: {st.jobs_queued}")
        t = Table(title="children")
        for col in ("child", "state", "incarnation", "restarts", "pid"):
            t.add_column(col)
        for ch in st.children:
            restarts = str(ch.restarts)
            if ch.forced_restarts:
                restarts += f" ({ch.forced_restarts} forced)"
            t.add_row(ch.name, ch.state, str(ch.incarnation), restarts, str(ch.pid or "-"))
        con.print(t)
        if st.http_url:
            con.print(f"OpenAI-compatible HTTP API: {st.http_url}/v1")
        if st.finetune_quota:
            con.print(f"finetune quota: {st.finetune_quota}")
        p = st.predictor
        if p is not None:
            err = "-" if p.recent_mean_abs_pct_error is None else \
                f"{p.recent_mean_abs_pct_error:.1f} %"
            seen = ", ".join(f"L{k}: {v}" for k, v in sorted(p.samples_seen.items())) or "none"
            con.print(f"finetune level {st.level}; predictor: {_predictor_in_force(p)}"
                      f"; iterations seen {seen}; recent error {err}; drift events "
                      f"{p.drift_events}")
        sc = st.scheduler
        if sc is not None:
            def pct(x: float | None) -> str:
                return "-" if x is None else f"{x:.2%}"

            p99 = "-" if sc.decision_p99_us is None else \
                f"{sc.decision_cpu_p99_us or 0:.0f} us cpu, {sc.decision_p99_us:.0f} us wall"
            con.print(f"policy {sc.policy}, TPOT SLO {sc.tpot_slo_ms:.1f} ms "
                      f"(target {sc.attainment_target:.0%}): attainment per token "
                      f"{pct(sc.per_token)} of {sc.tokens}, per request {pct(sc.per_request)} "
                      f"of {sc.requests}; {sc.decisions} decisions (p99 {p99}), "
                      f"{sc.level_changes} level changes; last: {sc.last_reason or '-'}"
                      + ("" if sc.bound_quantile is None else
                         f" (bound at quantile {sc.bound_quantile:g})"))
            if sc.decisions_by_reason:
                con.print("decisions by reason (level: count): " + "; ".join(
                    f"{kind} " + ", ".join(f"{lv}: {n}" for lv, n in sorted(by.items()))
                    for kind, by in sorted(sc.decisions_by_reason.items())))
            if sc.busy_rates_tok_s:
                con.print("finetune tok/s beside a busy decode, by level: " + ", ".join(
                    f"{lv}: {v:.0f}" for lv, v in sorted(sc.busy_rates_tok_s.items())))
        m = st.memory
        if m is None:
            con.print("arena: off (memory.arena = false)")
            return 0
        total = sum(m.pages.values())
        t = Table(title=f"arena: {total} pages of {_mib(m.page_bytes)}")
        for col in ("owner", "pages", "bytes", "share"):
            t.add_column(col, justify="right")
        for owner in ("decode", "finetune", "free"):
            n = m.pages.get(owner, 0)
            t.add_row(owner, str(n), _mib(n * m.page_bytes), f"{n / total:.0%}" if total else "-")
        con.print(t)
        saved = m.saved_lease_bytes + m.saved_private_bytes
        reclaims = ", ".join(f"{k} {v}" for k, v in sorted(m.reclaims.items())) or "none"
        p50 = "-" if m.reclaim_p50_s is None else f"{m.reclaim_p50_s * 1000:.0f} ms"
        mx = "-" if m.reclaim_max_s is None else f"{m.reclaim_max_s * 1000:.0f} ms"
        con.print(
            f"KV: {m.kv_blocks_free} of {m.kv_blocks_total} blocks free; lending "
            f"{'on' if m.lending else 'off'}: {m.groups_lent} of {m.kv_groups} groups of "
            f"{m.blocks_per_group} blocks lent{'; reclaim pending' if m.reclaim_pending else ''}"
            f"\nreclaims: {reclaims} (p50 {p50}, max {mx}); vLLM preemptions: {m.preemptions}"
            f"\nsaved for backward: {_mib(saved)}, "
            f"{(m.saved_lease_bytes / saved if saved else 0):.1%} in the lease, "
            f"{m.fallback_tensors} tensors fell back to private memory")
        return 0


class LevelCommand(Command):
    name = "level"
    help = "set the finetune's quota level (0 pauses it) until changed again"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("level", type=int,
                       help="0 pauses the finetune; 1..K are the quota levels of the config")
        add_endpoint_arguments(p)

    def run(self, args: argparse.Namespace) -> int:
        with control_client(args, timeout_s=10.0) as c:
            st = c.set_level(args.level)
        print(f"finetune quota level {st.level}")
        return 0


class PolicyCommand(Command):
    name = "policy"
    help = "switch the quota policy: harli, static:L, naive or decode-only"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("policy", help="harli, static:L (L a level), naive or decode-only")
        add_endpoint_arguments(p)

    def run(self, args: argparse.Namespace) -> int:
        with control_client(args, timeout_s=10.0) as c:
            st = c.set_policy(args.policy)
        print(f"policy {st.scheduler.policy if st.scheduler else '-'}; level {st.level}")
        return 0


def _when(t: float) -> str:
    ago = max(0.0, time.time() - t)
    span = f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200 else \
        f"{ago / 3600:.1f} h"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} ({span} ago)"


def _predictor_in_force(p: PredictorStatus) -> str:
    """Which profile is in force and since when."""
    if p.profile:
        return f"profile {p.profile}, in force since {_when(p.since)}" if p.since else \
            f"profile {p.profile}"
    if p.since is None:
        return "no profile: on the conservative prior until enough decode-alone iterations " \
               "are seen to fit stage 1 online"
    levels = ", ".join(f"L{lv} since {_when(t)}" for lv, t in sorted(p.levels_learnt.items()))
    refit = f", last refit {_when(p.last_fit)}" if p.last_fit and p.online_refits > 1 else ""
    return (f"no profile: learnt online, stage 1 since {_when(p.since)} ({p.online_refits} "
            f"fits{refit}); levels on their own measured ratio: {levels or 'none yet'}")

