"""``python -m harli.finetune_proc --incarnation N --config-json JSON``: spawned by the daemon.

What must hold before torch loads is set here, and ``main`` (which imports torch) is imported
only after it: the scheduling class, which torch's thread pools inherit, and the CPU mask that
libgomp reads once, when it loads (``quota.openmp_start_mask``).
"""

from __future__ import annotations

import argparse
import sys

from harli.config import from_json, parse_cpu_list
from harli.finetune_proc.quota import openmp_start_mask
from harli.runtime import configure_logging, die_with_parent, set_cpu_scheduling, set_title


def main() -> int:
    p = argparse.ArgumentParser(prog="harli.finetune_proc")
    p.add_argument("--incarnation", type=int, required=True)
    p.add_argument("--config-json", required=True)
    p.add_argument("--arena", default="", help="ArenaHandle as JSON: leased pages live there")
    p.add_argument("--decode-cores", default="none",
                   help="decode's cores, which the top quota levels may also use")
    args = p.parse_args()
    cfg = from_json(args.config_json)
    if not die_with_parent():
        print("harli.finetune_proc: the daemon that started it is gone; exiting",
              file=sys.stderr)
        return 1
    set_title(f"harli::finetune[{args.incarnation}]")
    configure_logging("finetune", cfg.daemon.log_level)
    # The finetune takes only CPU time that the daemon, decode and clients leave (a training
    # thread on the daemon's core otherwise delays the daemon's routing of decode's tokens by
    # up to a scheduler slice); set before torch starts its thread pools, which inherit it.
    set_cpu_scheduling(cfg.finetune.cpu_scheduling_policy, cfg.finetune.nice, "finetune")
    # Started on the cores decode does not use (inherited from the daemon); the top levels
    # may spill onto decode's cores.
    spill = frozenset() if args.decode_cores == "none" else frozenset(
        parse_cpu_list(args.decode_cores))
    own = openmp_start_mask(spill)

    from harli.finetune_proc.main import run_finetune_proc

    return run_finetune_proc(cfg, args.incarnation, own, spill, args.arena)


if __name__ == "__main__":
    sys.exit(main())
