#!/usr/bin/env python
"""Adapt a latency table built on another machine to this one, within a time budget (see docs/latency.md).

    python scripts/adapt_lut.py --target cpu --table latency_tables/mnasnet-r32-cpu-t1-b1.json --budget-s 120

Measures here a stratified sample of the table's entries and a set of whole networks, maps every entry
through gradient-boosted trees on block features (the source entry as prior), measures entries the space
needs but the table lacks, refits the calibration, and writes a table for this machine recording its
provenance (source hash, what was measured, the fits and their leave-one-out errors). Without --out it
goes to this machine's cache, where search.py and validate_lut.py find and reuse it.
"""

from __future__ import annotations

import argparse
import sys

from nas.cli import ArgumentParser, parse_with_progress
from nas.errors import NasError, exit_on_user_error
from nas.latency.machine import BUDGET_S, adapt_table, machine_table_path
from nas.latency.table import LatencyTable
from nas.latency.targets import cpu_model, get_target
from nas.space import load_space


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--target", default="cpu", help="execution provider (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--table", required=True, help="the latency table to adapt (built on another machine)")
    p.add_argument("--space", help="search-space YAML file (default: the one the table records)")
    p.add_argument("--resolution", type=int, help="input resolution (default: the table's)")
    p.add_argument("--num-classes", type=int, help="classifier width (default: the table's)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"seconds of measuring (default {BUDGET_S:g}); entries the table lacks come on top")
    p.add_argument("--seed", type=int, default=0, help="random.Random seed of the sampled entries and networks")
    p.add_argument("--out", help="adapted table file (default: this machine's cache, as search.py uses it)")
    return parse_with_progress(p, argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.budget_s <= 0:
        raise NasError(f"--budget-s must be positive, got {args.budget_s:g}")
    target = get_target(args.target, args.threads, args.batch)
    source = LatencyTable.load(args.table)
    source.require_target(target)
    space_file = args.space or source.metadata.get("space_file")
    if not space_file:
        raise NasError(f"{args.table}: the table records no space file; pass --space <space.yaml>")
    space = load_space(space_file)
    source.require_space(space)
    resolution = args.resolution or source.resolution
    num_classes = args.num_classes or source.num_classes
    out = args.out or machine_table_path(source, space, resolution, num_classes, target)
    print(f"adapting {args.table} (built on {source.metadata.get('cpu')!r}) to this machine ({cpu_model()!r}) "
          f"within {args.budget_s:g} s")
    table = adapt_table(source, space, target, resolution=resolution, num_classes=num_classes, budget_s=args.budget_s,
                        seed=args.seed, reason="scripts/adapt_lut.py", log=print)
    table.save(out)
    record = table.metadata["adaptation"]
    entries = record.get("entries", {})
    print(f"wrote {out} in {record['seconds']:.0f} s: {len(entries.get('measured', []))} entries measured "
          f"(transfer cross-validated error {entries.get('cv_mape', float('nan')):.2f}%, global factor "
          f"x{entries.get('global_factor', float('nan')):.3f}), {len(record['on_demand'])} added, "
          f"{record['networks']['measured']} networks measured, calibration {table.calibration.method} "
          f"(leave-one-out error {table.calibration.loo_mape:.2f}%)"
          + (f"; one factor would have re-levelled it by x{record['relevel_ratio']:.3f}"
             if record.get("relevel_ratio") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
