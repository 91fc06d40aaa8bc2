"""``python -m harli.decode_proc --incarnation N --config-json JSON``: spawned by the daemon."""

from __future__ import annotations

import argparse
import sys

from harli.config import from_json
from harli.decode_proc.proc import run_decode_proc


def main() -> int:
    p = argparse.ArgumentParser(prog="harli.decode_proc")
    p.add_argument("--incarnation", type=int, required=True)
    p.add_argument("--config-json", required=True)
    p.add_argument("--cpu-cores", default="none", help="pin to these cores ('none': don't)")
    p.add_argument("--arena", default="", help="ArenaHandle as JSON: KV cache goes there")
    args = p.parse_args()
    return run_decode_proc(from_json(args.config_json), args.incarnation, args.cpu_cores,
                           args.arena)


if __name__ == "__main__":
    sys.exit(main())
