"""Check the analytic cost model against fvcore on random architectures of every space, and time it.

    python scripts/bench_cost.py [--n 200] [--json OUT]

Prints, per space: how many architectures matched fvcore's FLOPs and the built model's parameter
count exactly, and the analytic model's speed in architectures per second (decoding included).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from fvcore.nn import FlopCountAnalysis

from nas.builder import build_model
from nas.cost import arch_cost, clear_cost_caches
from nas.cli import ArgumentParser
from nas.errors import exit_on_user_error
from nas.space import load_space

ROOT = Path(__file__).resolve().parent.parent


def fvcore_check(space, n: int, seed: int) -> int:
    rng = random.Random(seed)
    matched = 0
    for _ in range(n):
        arch = space.decode(space.sample(rng))
        model = build_model(arch, 10).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        analysis = FlopCountAnalysis(model, torch.zeros(1, 3, arch.resolution, arch.resolution))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        cost = arch_cost(arch, 10)
        matched += int(analysis.total()) == cost.flops and sum(p.numel() for p in model.parameters()) == cost.params
    return matched


def speed(space, n: int, seed: int) -> tuple[float, float]:
    """Architectures per second from sampled params: cold (empty block cache) and warm."""
    rng = random.Random(seed)
    points = [space.sample(rng) for _ in range(n)]
    rates = []
    for _ in range(2):
        start = time.perf_counter()
        for params in points:
            arch_cost(space.decode(params), 10)
        rates.append(n / (time.perf_counter() - start))
    clear_cost_caches()
    return rates[0], rates[1]


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200, help="random architectures per space checked against fvcore")
    parser.add_argument("--speed-n", type=int, default=20000, help="architectures per space for the speed figure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    results = {}
    print(f"{'space':12} {'fvcore matches':>16} {'archs/s cold':>13} {'archs/s warm':>13}")
    for name in ("mnasnet", "mobilenetv2", "resnet", "tiny"):
        space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
        clear_cost_caches()
        cold, warm = speed(space, args.speed_n, args.seed)
        matched = fvcore_check(space, args.n, args.seed) if args.n else 0
        results[name] = {"checked": args.n, "matched": matched, "archs_per_s_cold": cold, "archs_per_s_warm": warm}
        print(f"{name:12} {matched:>9}/{args.n:<6} {cold:>13,.0f} {warm:>13,.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["matched"] == r["checked"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
