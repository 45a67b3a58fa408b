"""Describe architectures: canonical string, parameters, FLOPs, resolution (and predicted latency).

    python scripts/describe.py mobilenet_v2
    python scripts/describe.py --space search_spaces/mnasnet.yaml --sample 5 --seed 0
"""

from __future__ import annotations

import json
import random
import sys

from nas.cli import ArgumentParser, parse_arch_argument
from nas.cost import arch_cost
from nas.errors import NasError, exit_on_user_error
from nas.space import load_space


def describe(arch, num_classes: int, table=None) -> dict:
    cost = arch_cost(arch, num_classes)
    row = {"arch": arch.to_string(), "key": arch.key, "resolution": arch.resolution,
           "params": cost.params, "flops": cost.flops, "num_classes": num_classes}
    if table is not None:
        row["predicted_latency_ms"] = round(table.predict(arch), 6)
    return row


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("arch", nargs="?", help="reference name, canonical architecture string or JSON file")
    parser.add_argument("--space", help="search-space YAML file to sample from")
    parser.add_argument("--sample", type=int, default=0, help="number of architectures to sample from --space")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, help="override the input resolution")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier width (default 1000, ImageNet)")
    parser.add_argument("--table", help="latency table JSON: adds predicted_latency_ms")
    parser.add_argument("--build", action="store_true", help="also build the torch module and check its parameter count")
    args = parser.parse_args(argv)
    if (args.arch is None) == (args.space is None):
        raise NasError("give either ARCH or --space FILE --sample N")
    table = None
    if args.table:
        from nas.latency.table import LatencyTable

        table = LatencyTable.load(args.table)
    if args.arch is not None:
        archs = [parse_arch_argument(args.arch)]
    else:
        if args.sample < 1:
            raise NasError(f"--sample must be at least 1, got {args.sample}")
        space = load_space(args.space)
        rng = random.Random(args.seed)
        archs = [space.decode(space.sample(rng)) for _ in range(args.sample)]
    for arch in archs:
        if args.resolution:
            arch = arch.with_resolution(args.resolution)
        row = describe(arch, args.num_classes, table)
        if args.build:
            from nas.builder import build_model

            model = build_model(arch, args.num_classes)
            row["built_params"] = sum(p.numel() for p in model.parameters())
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
