"""``harli profile``: measure decode iteration latency and fit the two-stage predictor
(``--out``), score a profile on held-out configurations (``--evaluate``), or fit a stored
profile again (``--refit``). The measuring is ``harli.bench.profile``'s."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harli.cli.command import Command, CommandError, add_config_arguments


class ProfileCommand(Command):
    name = "profile"
    help = "measure decode iteration latency (solo and beside the finetune) and fit the predictor"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, help="write the profile here")
        p.add_argument("--quick", action="store_true",
                       help="a smaller grid (about 12 minutes on 2 cores with LoRA serving "
                            "on, 5 without)")
        p.add_argument("--evaluate", type=Path, metavar="PROFILE",
                       help="measure held-out configurations against this profile")
        p.add_argument("--refit", type=Path, metavar="PROFILE",
                       help="fit again the iterations stored in PROFILE (after an upgrade of "
                       "harli's fits) and write the result to --out; measures nothing")
        p.add_argument("--png", type=Path, help="plot of predicted vs measured (--evaluate; "
                       "default: PROFILE.eval.png, with PROFILE.eval.json beside it)")
        p.add_argument("--repeats", type=int,
                       help="runs of each configuration, spread over the measurement in a "
                       "shuffled order, as this host drifts +-30 %% from run to run "
                       "(default 4; 3 with --quick)")
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the configuration order and prompts (default: %(default)s)")
        p.add_argument("--dir", type=Path, help="working dir (default: a temporary one)")
        add_config_arguments(p)

    def validate(self, args: argparse.Namespace) -> None:
        if args.refit is not None and (args.out is None or args.evaluate is not None):
            raise CommandError("--refit OLD needs --out NEW (and no --evaluate)")
        if args.refit is None and (args.out is None) == (args.evaluate is None):
            raise CommandError("give --out PROFILE to profile, or --evaluate PROFILE")
        if args.repeats is None:
            args.repeats = 3 if args.quick else 4
        if args.repeats < 1:
            raise CommandError("--repeats must be >= 1")

    def run(self, args: argparse.Namespace) -> int:
        from rich.console import Console

        from harli.bench import plotting
        from harli.bench import profile as bench_profile
        from harli.predictor import Profile, ProfileError

        console = Console(stderr=True)
        profile = None
        source = args.evaluate if args.evaluate is not None else args.refit
        if source is not None:
            try:
                profile = Profile.from_json(source.read_bytes(), source=str(source),
                                            any_features=args.refit is not None)
            except OSError as e:
                raise CommandError(f"cannot read {source}: {e.strerror}") from None
            except ProfileError as e:
                raise CommandError(str(e)) from None
        if args.refit is not None:
            assert profile is not None
            try:
                refitted = bench_profile.refit_profile(profile)
            except ValueError as e:
                raise CommandError(f"{args.refit}: {e}") from None
            args.out.write_bytes(refitted.to_json())
            console.print(f"{len(profile.samples)} iterations of {args.refit} fitted again, "
                          f"written to {args.out}")
            return 0
        with tempfile.TemporaryDirectory(prefix="harli-profile-") as tmp:
            try:
                m = bench_profile.measure(args.dir or Path(tmp), list(args.overrides),
                                          Path(args.config) if args.config else None,
                                          quick=args.quick, repeats=args.repeats,
                                          seed=args.seed, console=console, reference=profile,
                                          reference_name=str(args.evaluate))
            except ProfileError as e:
                raise CommandError(str(e)) from None
        if profile is None:
            out = bench_profile.new_profile(m, args.quick, args.repeats)
            args.out.write_bytes(out.to_json())
            console.print(f"profile of {len(m.samples)} iterations in {len(m.configs)} "
                          f"configurations ({m.elapsed_s:.0f} s) written to {args.out}")
            return 0
        reports = bench_profile.evaluate_profile(profile, m)
        bench_profile.print_report(reports, console)
        out = args.evaluate.with_name(args.evaluate.stem + ".eval.json")  # never the profile
        out.write_bytes(bench_profile.report_json(reports, m.samples, m.elapsed_s))
        png = args.png or args.evaluate.with_name(args.evaluate.stem + ".eval.png")
        try:
            bench_profile.plot(reports["profile + online"], png,
                               f"{m.key.model}, {m.key.dtype}, {m.key.backend}: held-out "
                               f"configurations, online correction on ({m.elapsed_s:.0f} s)")
        except plotting.PlotsUnavailable as e:
            console.print(f"report and samples: {out}; no plot: {e}")
            return 1 if args.png else 0  # a plot asked for by name and not drawn is a failure
        console.print(f"plot: {png}; report and samples: {out}")
        return 0
