"""``python -m harli.finetune_proc --incarnation N --config-json JSON``: spawned by the daemon."""

from __future__ import annotations

import argparse
import sys

from harli.config import from_json
from harli.finetune_proc.proc import run_finetune_proc


def main() -> int:
    p = argparse.ArgumentParser(prog="harli.finetune_proc")
    p.add_argument("--incarnation", type=int, required=True)
    p.add_argument("--config-json", required=True)
    p.add_argument("--arena", default="", help="ArenaHandle as JSON: leased pages live there")
    p.add_argument("--decode-cores", default="none",
                   help="decode's cores, which the top quota levels may also use")
    args = p.parse_args()
    return run_finetune_proc(from_json(args.config_json), args.incarnation, args.arena,
                             args.decode_cores)


if __name__ == "__main__":
    sys.exit(main())
