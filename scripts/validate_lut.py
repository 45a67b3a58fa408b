#!/usr/bin/env python
"""Predicted vs measured latency of held-out random networks of a space (see docs/latency.md).

    python scripts/validate_lut.py --target cpu --space search_spaces/mnasnet.yaml --n 100 --seed 1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nas.cli import ArgumentParser, add_target_arguments
from nas.errors import exit_on_user_error
from nas.latency.table import LatencyTable, default_table_path
from nas.latency.targets import get_target
from nas.latency.validate import VALIDATION_PASSES, format_summary, plot_validation, validate_table
from nas.space import load_space


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    add_target_arguments(p)
    p.add_argument("--table", help="latency table (default: the build_lut.py default name for these settings)")
    p.add_argument("--resolution", type=int, help="resolution of the default table name (default: the space's)")
    p.add_argument("--n", type=int, default=100, help="held-out networks to measure (default 100)")
    p.add_argument("--seed", type=int, default=1, help="random.Random seed of the networks (default 1)")
    p.add_argument("--no-anchor", action="store_true",
                   help="skip timing the table's calibration networks again (which re-anchors the figures to the "
                        "machine's speed of the moment)")
    p.add_argument("--as-built", action="store_true",
                   help="predict with the table as built even where the machine check (60 of its calibration "
                        "networks timed first) finds this machine more than 5%% faster or slower than the table's "
                        "(otherwise every prediction is scaled by that ratio, as search.py does)")
    p.add_argument("--passes", type=int, default=VALIDATION_PASSES,
                   help=f"measure every network this many times, minutes apart, and keep the geometric mean "
                        f"(default {VALIDATION_PASSES})")
    p.add_argument("--json", help="write the summary and per-network rows here")
    p.add_argument("--plot", help="predicted-vs-measured PNG (default: the --json file with .png, else "
                                  "<table name>-validation.png here)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    target = get_target(args.target, args.threads, args.batch)
    space = load_space(args.space)
    path = args.table or default_table_path(space.name, args.resolution or space.resolution, target)
    table = LatencyTable.load(path, expect_target=target.name, expect_threads=target.threads, expect_batch=target.batch)
    speed = table.check_machine_speed(target)  # warns when the table comes from a faster or slower machine
    if not args.as_built:
        table.relevel(speed)  # beyond +-5%, predictions at this machine's speed; the report keeps the as-built ones
    report = validate_table(table, space, target, args.n, args.seed, progress=not args.quiet,
                            anchor=not args.no_anchor, passes=args.passes)
    report["machine_speed_check"] = speed
    print(format_summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    plot = args.plot or (Path(args.json).with_suffix(".png") if args.json else f"{Path(path).stem}-validation.png")
    plot_validation(report, plot)
    print(f"wrote {plot}" + (f" and {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
