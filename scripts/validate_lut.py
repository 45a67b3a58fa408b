#!/usr/bin/env python
"""Predicted vs measured latency of held-out random networks of a space (see docs/latency.md).

    python scripts/validate_lut.py --target cpu --space search_spaces/mnasnet.yaml --n 100 --seed 1

The table is this machine's, as a search gets it (``nas.latency.machine.table_for_machine``): adapted
here when it comes from another CPU or the machine check reads beyond +-5%, with missing entries
measured. An adapted table is scored beside its source re-levelled by one factor and as built, on the
same measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nas.cli import ArgumentParser, add_table_arguments, parse_with_progress, table_arguments
from nas.errors import exit_on_user_error
from nas.latency.machine import ADAPT_MODES, BUDGET_S, table_for_machine
from nas.latency.table import LatencyTable
from nas.latency.validate import VALIDATION_PASSES, format_summary, plot_validation, validate_table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    add_table_arguments(p)
    p.add_argument("--table", help="latency table (default: the build_lut.py default name for these settings)")
    p.add_argument("--n", type=int, default=100, help="held-out networks to measure (default 100)")
    p.add_argument("--seed", type=int, default=1, help="random.Random seed of the networks (default 1)")
    p.add_argument("--passes", type=int, default=VALIDATION_PASSES,
                   help=f"measure every network this many times and keep the geometric mean (default "
                        f"{VALIDATION_PASSES}); their agreement is this machine's repeatability ceiling")
    p.add_argument("--adapt", choices=ADAPT_MODES, default="auto",
                   help="adapt the table to this machine: auto (another CPU, or the machine check beyond +-5%%), "
                        "always, or never (only missing entries are measured)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"adaptation time budget (default {BUDGET_S:g} s)")
    p.add_argument("--json", help="write the summary and per-network rows here")
    p.add_argument("--plot", help="predicted-vs-measured PNG (default: the --json file with .png, else "
                                  "<table name>-validation.png here)")
    return parse_with_progress(p, argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target, space, resolution, num_classes = table_arguments(args)
    table, provenance = table_for_machine(space, target, resolution=resolution, num_classes=num_classes,
                                          table=args.table, budget_s=args.budget_s, adapt=args.adapt)
    compare, exclude = {}, frozenset()
    if provenance.path != provenance.source:
        source = LatencyTable.load(provenance.source)
        if (source.resolution, source.num_classes) == (resolution, num_classes):
            exclude = frozenset(row.key for row in source.calibration.rows) if source.calibration else frozenset()
            if provenance.relevel_ratio:  # what one factor, from the same networks, would have made of it
                ratio = provenance.relevel_ratio
                compare["relevelled"] = lambda arch: source.predict(arch) * ratio
            compare["as_built"] = source.predict
    report = validate_table(table, space, target, args.n, args.seed, passes=args.passes, compare=compare,
                            exclude=exclude, progress=not args.quiet)
    report["provenance"] = provenance.to_dict()
    print(f"latency table: {provenance.summary}")
    print(format_summary(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    plot = args.plot or (Path(args.json).with_suffix(".png") if args.json
                         else f"{Path(provenance.path).stem}-validation.png")
    plot_validation(report, plot)
    print(f"wrote {plot}" + (f" and {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
