#!/usr/bin/env python
"""Build a latency lookup table for a search space on a target (resumable; see latency_tables/README.md).

    python scripts/build_lut.py --target cpu --space search_spaces/mnasnet.yaml
"""

from __future__ import annotations

import argparse
import json
import sys

from nas.cli import ArgumentParser, add_table_arguments, parse_with_progress, table_arguments
from nas.errors import exit_on_user_error
from nas.latency.build import (CALIBRATION_ARCHS, CALIBRATION_PASSES, PASSES, build_table, estimate_build_seconds,
                               refit_calibration)
from nas.latency.measure import AGGREGATES, Protocol
from nas.latency.table import LatencyTable, default_table_path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    add_table_arguments(p)
    p.add_argument("--out", help="table file (default latency_tables/<space>-r<res>-<target>-t<threads>-b<batch>.json)")
    p.add_argument("--sessions", type=int, default=Protocol.sessions, help="measurement sessions per entry")
    p.add_argument("--aggregate", choices=AGGREGATES, default=Protocol.aggregate,
                   help="an entry's figure: the fastest run of all sessions, the best session median, or the median one")
    p.add_argument("--calibration-archs", type=int, default=CALIBRATION_ARCHS,
                   help=f"whole networks measured for calibration (default {CALIBRATION_ARCHS}; a fifth of them "
                        "the fastest of many random ones)")
    p.add_argument("--calibration-seed", type=int, default=0, help="random.Random seed of those networks")
    p.add_argument("--passes", type=int, default=PASSES,
                   help=f"passes over every entry, minutes apart (default {PASSES}): each keeps its fastest")
    p.add_argument("--calibration-passes", type=int, default=CALIBRATION_PASSES,
                   help=f"passes over the calibration networks (default {CALIBRATION_PASSES}), each keeping their "
                        "geometric mean: the calibration's level is the machine's state while they run")
    p.add_argument("--fresh", action="store_true", help="discard an unfinished build or an existing table")
    p.add_argument("--refit", action="store_true",
                   help="measure nothing: fit the calibration of the existing --out table again to the networks it keeps "
                        "(rewrites a schema-2 table in schema 3)")
    p.add_argument("--estimate", type=int, metavar="N", help="only time N random entries and project the build time")
    return parse_with_progress(p, argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target, space, resolution, num_classes = table_arguments(args)
    protocol = Protocol(sessions=args.sessions, aggregate=args.aggregate)
    if args.estimate:
        estimate = estimate_build_seconds(space, target, resolution=resolution, num_classes=num_classes,
                                          sample=args.estimate, protocol=protocol, passes=args.passes)
        print(json.dumps(estimate))
        return 0
    out = args.out or default_table_path(space.name, resolution, target)
    if args.refit:
        old = LatencyTable.load(out)
        table = refit_calibration(old)
        table.save(out)
        print(f"refitted {out}: {_describe(table)}")
        return 0
    try:
        table = build_table(space, target, out, resolution=resolution, num_classes=num_classes, protocol=protocol,
                            calibration_archs=args.calibration_archs, calibration_seed=args.calibration_seed,
                            passes=args.passes, calibration_passes=args.calibration_passes, fresh=args.fresh,
                            progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: progress is kept in {out}.partial; run the same command to resume", file=sys.stderr)
        return 130
    print(f"wrote {out}: {_describe(table)}")
    return 0


def _describe(table: LatencyTable) -> str:
    cal = table.calibration
    if not cal:
        return f"{len(table.entries)} entries, no calibration"
    cache = f", spill terms beyond {cal.cache_mb} MB" if cal.cache_mb is not None else ""
    return (f"{len(table.entries)} entries, calibration on {len(cal.rows)} networks{cache}, "
            f"leave-one-out error {cal.loo_mape:.2f}%")


if __name__ == "__main__":
    sys.exit(main())
