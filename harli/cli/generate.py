"""``harli generate "text" --max-tokens N [--json]``: stream one generation from the daemon."""

from __future__ import annotations

import argparse
import json
import sys

from harli.cli.command import (
    Command,
    CommandError,
    add_endpoint_arguments,
    curve_kwargs,
    resolve_endpoint,
)


def endpoint_of(args: argparse.Namespace) -> str:
    return resolve_endpoint(args, "inference")


class GenerateCommand(Command):
    name = "generate"
    help = "generate text through the running daemon"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        d = _protocol_defaults()
        p.add_argument("prompt", help="prompt text")
        p.add_argument("--max-tokens", type=int, default=d["max_tokens"],
                       help="tokens to generate (default: %(default)s, the protocol's)")
        p.add_argument("--temperature", type=float, default=d["temperature"],
                       help="sampling temperature, 0 = greedy (default: %(default)s, the "
                       "protocol's)")
        p.add_argument("--top-p", type=float, default=d["top_p"],
                       help="nucleus sampling mass in (0, 1] (default: %(default)s)")
        p.add_argument("--seed", type=int,
                       help="sampling seed, for a repeatable sample (default: none)")
        p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        p.add_argument("--ignore-eos", action="store_true",
                       help="keep generating past the end-of-sequence token")
        p.add_argument("--model", help="the base model (default) or a registered adapter's "
                       "name (harli models lists them)")
        p.add_argument("--json", action="store_true", help="print one JSON object at the end")
        p.add_argument("--timeout", type=float, default=120.0,
                       help="seconds to wait for a reply (default: %(default)s)")
        add_endpoint_arguments(p)

    def validate(self, args: argparse.Namespace) -> None:
        if args.max_tokens < 1:
            raise CommandError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        if args.temperature < 0:
            raise CommandError(f"--temperature must be >= 0, got {args.temperature}")
        if not 0 < args.top_p <= 1:
            raise CommandError(f"--top-p must be in (0, 1], got {args.top_p}")

    def run(self, args: argparse.Namespace) -> int:
        from harli.client.inference import Completion, InferenceClient, RequestError

        endpoint = endpoint_of(args)
        with InferenceClient(endpoint, timeout_s=args.timeout, **curve_kwargs(args)) as client:
            kw = dict(max_tokens=args.max_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed, stop=args.stop,
                      ignore_eos=args.ignore_eos, model=args.model)
            try:
                if args.json:
                    c = client.complete(args.prompt, **kw)
                    print(json.dumps(_as_json(c)))
                    return 0
                c = Completion(request_id="")
                for chunk in client.generate(args.prompt, **kw):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    c.add(chunk, 0.0)
                sys.stdout.write("\n")
                print(f"[{len(c.token_ids)} tokens, finish_reason={c.finish_reason}]",
                      file=sys.stderr)
            except RequestError as e:
                print(f"harli generate: {e.code}: {e.message}", file=sys.stderr)
                return 1
        return 0


def _protocol_defaults() -> dict[str, object]:
    """The ``generate`` message's defaults, so the CLI cannot drift from the protocol."""
    import msgspec

    from harli.ipc.inference import Generate

    return {f.name: f.default for f in msgspec.structs.fields(Generate)
            if f.default is not msgspec.NODEFAULT}


def _as_json(c: object) -> dict[str, object]:
    from harli.client.inference import Completion

    assert isinstance(c, Completion)
    return {"request_id": c.request_id, "text": c.text, "token_ids": c.token_ids,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            "num_prompt_tokens": c.num_prompt_tokens, "token_times_s": c.token_times_s,
            "ttft_s": c.ttft_s, "tpot_s": c.tpot_s}
