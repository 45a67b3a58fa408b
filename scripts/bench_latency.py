#!/usr/bin/env python
"""Latency-table benchmark: prediction throughput and held-out accuracy per space and thread count.

Run on a quiet machine; each table is this machine's, as a search gets it (adapted where needed)::

    python scripts/bench_latency.py --spaces search_spaces/mnasnet.yaml search_spaces/mobilenetv2.yaml \\
        --threads 1 2 --n 100 --out latency_tables/bench-cpu.json --plots latency_tables/plots
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnxruntime as ort

from nas.cli import ArgumentParser, parse_with_progress
from nas.errors import exit_on_user_error
from nas.latency.build import default_num_classes
from nas.latency.machine import table_for_machine
from nas.latency.targets import cpu_model, get_target
from nas.latency.validate import format_summary, plot_validation, prediction_throughput, validate_table
from nas.space import load_space


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--target", default="cpu", help="execution provider (default cpu)")
    p.add_argument("--spaces", nargs="+", required=True, help="search-space YAML files")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts (one table each)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--n", type=int, default=100, help="held-out networks per table (0: throughput only)")
    p.add_argument("--seed", type=int, default=1, help="random.Random seed of the held-out networks")
    p.add_argument("--throughput-archs", type=int, default=20000, help="architectures per throughput pass")
    p.add_argument("--out", required=True, help="JSON summary file")
    p.add_argument("--plots", help="directory for predicted-vs-measured PNGs")
    return parse_with_progress(p, argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = []
    for space_file in args.spaces:
        space = load_space(space_file)
        for threads in args.threads:
            target = get_target(args.target, threads, args.batch)
            table, provenance = table_for_machine(space, target, resolution=space.resolution,
                                                  num_classes=default_num_classes(space.resolution))
            path = Path(provenance.path)
            result = {"space": space.name, "threads": threads, "table": str(path), "provenance": provenance.to_dict(),
                      "throughput": prediction_throughput(table, space, args.throughput_archs)}
            print(f"{path}: {result['throughput']['per_s']:,} architectures/s predicted")
            if args.n:
                report = validate_table(table, space, target, args.n, args.seed)
                print(format_summary(report))
                result["validation"] = report
                if args.plots:
                    Path(args.plots).mkdir(parents=True, exist_ok=True)
                    plot_validation(report, Path(args.plots) / f"{path.stem}-validation.png")
            results.append(result)
    summary = {"cpu": cpu_model(), "onnxruntime": ort.__version__, "target": args.target, "results": results}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
