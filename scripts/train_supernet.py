"""Train the weight-sharing supernet of a search space (resumable: rerun the same command).

    python scripts/train_supernet.py --space search_spaces/mnasnet.yaml --data digits --resolution 32 \\
        --out runs/supernet-mnasnet

One fixed recipe (nas.supernet.SupernetRecipe; docs/supernet.md): the sandwich rule with in-place
distillation. A killed or interrupted training loses at most the epoch in progress. Prints one line
per epoch with the largest and smallest subnets' validation accuracy and the ETA.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nas.cli import ArgumentParser
from nas.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from nas.supernet.train import SupernetRecipe

    default = SupernetRecipe()
    p = ArgumentParser(description=__doc__)
    p.add_argument("--space", required=True, help="search-space YAML file")
    p.add_argument("--data", default="digits", help="digits | cifar10:PATH | imagefolder:PATH (default digits)")
    p.add_argument("--resolution", type=int, help="training resolution (default: the space file's)")
    p.add_argument("--epochs", type=int, default=default.epochs, help=f"default {default.epochs}")
    p.add_argument("--seed", type=int, default=0, help="weights, data order and sampled subnets (default 0)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, help="folder for the supernet (default runs/supernet-<space>-<data>-r<R>)")
    args = p.parse_args(argv)

    from nas.latency import training_lock
    from nas.space import load_space
    from nas.supernet import check_supported, train_supernet

    space = load_space(args.space)
    check_supported(space)
    resolution = args.resolution or space.resolution
    data_name = args.data.replace(":", "_").replace("/", "_")
    out = args.out or Path("runs") / f"supernet-{space.name}-{data_name}-r{resolution}"
    recipe = SupernetRecipe(**{**default.to_dict(), "epochs": args.epochs})
    print(f"training the {space.name} supernet on {args.data} at {resolution}px into {out}: {recipe.to_dict()}",
          flush=True)
    with training_lock():  # no nas latency measurement runs meanwhile (it would measure our load)
        train_supernet(space, args.data, resolution, out, recipe=recipe, seed=args.seed, threads=args.threads,
                       log=lambda line: print(line, flush=True))
    print(f"supernet in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
