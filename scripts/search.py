"""Search for a CNN that is accurate and fast on the target, then export it to ONNX.

    python scripts/search.py --target cpu

runs the whole job on the embedded digits data with search_spaces/mnasnet.yaml and writes
runs/<name>/ (printed at the end). Running the same command again resumes an interrupted run.
"""

from __future__ import annotations

import json
import sys

from nas.config import SCHEDULERS, SearchConfig
from nas.cli import ArgumentParser, DefaultsHelpFormatter
from nas.errors import NasError, exit_on_user_error

D = SearchConfig()


def parse(argv: list[str] | None) -> tuple[SearchConfig, str | None]:
    p = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--target", default=D.target, help="where latency counts: cpu, or an ONNX Runtime provider "
                                                       "target such as cuda or openvino")
    p.add_argument("--threads", type=int, default=D.threads, help="ONNX Runtime intra-op threads on the target")
    p.add_argument("--space", default=D.space, help="search-space YAML file")
    p.add_argument("--strategy", default=D.strategy, help="random, grid, evolution, nsga2, rl, tpe or gp")
    p.add_argument("--strategy-options", default=None, help="JSON object of strategy options, e.g. "
                   "'{\"population_size\": 12}' (default for evolution: population 8, tournament 3)")
    p.add_argument("--trials", type=int, default=D.trials, help="candidates to train")
    p.add_argument("--time-budget", type=float, default=D.time_budget, help="seconds of search (optional)")
    p.add_argument("--objectives", default=D.objectives, choices=["pareto", "reward"],
                   help="pareto: accuracy up and latency down; reward: MnasNet's ACC x (LAT/T)^w")
    p.add_argument("--reward", default=D.reward, choices=["soft", "hard"],
                   help="soft: w = -0.07; hard: w = 0 under T, -1 over it (also picks the winner)")
    p.add_argument("--latency-target-ms", type=float, default=D.latency_target_ms,
                   help="T of the MnasNet reward (default: 0.56 x the fastest MobileNetV2 baseline)")
    p.add_argument("--latency-limit-ms", type=float, default=D.latency_limit_ms, help="hard limit (predicted)")
    p.add_argument("--flops-limit", type=float, default=D.flops_limit, help="hard limit on FLOPs")
    p.add_argument("--params-limit", type=float, default=D.params_limit, help="hard limit on parameters")
    p.add_argument("--data", default=D.data, help="digits, cifar10:PATH or imagefolder:PATH")
    p.add_argument("--resolution", type=int, default=D.resolution, help="input resolution (default: the space's)")
    p.add_argument("--epochs", type=int, default=D.epochs, help="top-rung training epochs")
    p.add_argument("--fraction", type=float, default=D.fraction, help="top-rung share of the training data")
    p.add_argument("--rungs", type=int, default=D.rungs, help="successive-halving rungs")
    p.add_argument("--eta", type=int, default=D.eta, help="successive-halving reduction factor")
    p.add_argument("--scheduler", default=D.scheduler, choices=SCHEDULERS,
                   help="multi-fidelity schedule: successive halving from the lowest rung every round, "
                        "Hyperband's brackets in turn (some rounds start higher, with fewer candidates), or "
                        "asha (no rounds: each result promotes its candidate or frees the worker at once)")
    p.add_argument("--final-epochs", type=int, default=D.final_epochs, help="the winner's final training "
                                                                             "(default: --epochs)")
    p.add_argument("--baselines", default=",".join(f"{w:g}" for w in D.baselines),
                   help="MobileNetV2 width multipliers to compare with")
    p.add_argument("--front-size", type=int, default=D.front_size, help="Pareto points re-measured end to end")
    p.add_argument("--workers", type=int, default=D.workers, help="parallel training workers")
    p.add_argument("--executor", default=D.executor, choices=["local", "ray"])
    p.add_argument("--ray-address", default=D.ray_address, help="Ray cluster address (default: a local Ray)")
    p.add_argument("--table", default=D.table, help="latency table JSON (default: latency_tables/, built if absent)")
    p.add_argument("--out", help="run folder (default: runs/<space>-<objectives>-<strategy>-seed<seed>)")
    p.add_argument("--seed", type=int, default=D.seed)
    a = p.parse_args(argv)
    try:
        options = None if a.strategy_options is None else json.loads(a.strategy_options)
        baselines = tuple(float(w) for w in a.baselines.split(",") if w)
    except (json.JSONDecodeError, ValueError) as exc:
        raise NasError(f"--strategy-options / --baselines: cannot parse ({exc})") from None
    if options is not None and not isinstance(options, dict):
        raise NasError("--strategy-options must be a JSON object")
    config = SearchConfig(
        space=a.space, strategy=a.strategy, strategy_options=options, trials=a.trials, time_budget=a.time_budget,
        objectives=a.objectives, reward=a.reward, latency_target_ms=a.latency_target_ms,
        latency_limit_ms=a.latency_limit_ms, flops_limit=a.flops_limit, params_limit=a.params_limit,
        data=a.data, resolution=a.resolution, epochs=a.epochs, fraction=a.fraction, rungs=a.rungs, eta=a.eta,
        scheduler=a.scheduler,
        final_epochs=a.final_epochs, baselines=baselines, front_size=a.front_size, workers=a.workers,
        executor=a.executor, ray_address=a.ray_address, target=a.target, threads=a.threads, table=a.table,
        seed=a.seed,
    )
    return config, a.out


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    config, out = parse(argv)
    from nas.pipeline import MainJob

    from nas.strategies import strategy_options  # validates the strategy name before any work

    strategy_options(config.strategy)
    run_dir = MainJob(config, out).run()
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
