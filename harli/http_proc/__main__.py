"""``python -m harli.http_proc --incarnation N --config-json JSON --listen-fd FD``: the
OpenAI-compatible HTTP front, spawned by the daemon with the listening socket it bound."""

from __future__ import annotations

import argparse
import sys

from harli.config import from_json
from harli.runtime import configure_logging, die_with_parent, set_title


def main() -> int:
    p = argparse.ArgumentParser(prog="harli.http_proc")
    p.add_argument("--incarnation", type=int, required=True)
    p.add_argument("--config-json", required=True)
    p.add_argument("--listen-fd", type=int, required=True,
                   help="the daemon's listening TCP socket, inherited")
    args = p.parse_args()
    cfg = from_json(args.config_json)
    if not die_with_parent():
        print("harli.http_proc: the daemon that started it is gone; exiting", file=sys.stderr)
        return 1
    set_title(f"harli::http[{args.incarnation}]")
    configure_logging("http", cfg.daemon.log_level)

    from harli.http_proc.proc import HttpProc

    return HttpProc(cfg, args.incarnation, args.listen_fd).run()


if __name__ == "__main__":
    sys.exit(main())
