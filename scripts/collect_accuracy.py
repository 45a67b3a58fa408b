"""Collect real low-fidelity training runs of random architectures, for the strategy benchmark's predictor.

    nice -n 10 python scripts/collect_accuracy.py --space search_spaces/mnasnet.yaml --n 300 --max-minutes 10
    python scripts/collect_accuracy.py --space search_spaces/mnasnet.yaml --fit   # predictor quality only

Run i trains a random point of the space (architecture and sampled optimizer, lr, batch size; see
nas.surrogate.sample_point) with training seed i, at 3 epochs on the whole digits training split at
32x32 (every space, mobilenetv2.yaml included: its latency is still predicted at its own 224), and
appends it to benchmarks/accuracy_runs/<space>.json. The file is rewritten after every run, so an
interrupted collection resumes where it stopped when the same command is run again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nas.cli import ArgumentParser
from nas.errors import NasError, exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    from nas.surrogate import COLLECT_FIDELITY as F

    p = ArgumentParser(description=__doc__)
    p.add_argument("--space", type=Path, required=True, help="search-space YAML file")
    p.add_argument("--n", type=int, default=300, help="runs the file should hold when done (default 300)")
    p.add_argument("--max-minutes", type=float, help="stop starting new runs after this many minutes")
    p.add_argument("--out", type=Path, help="runs file (default benchmarks/accuracy_runs/<space name>.json)")
    p.add_argument("--epochs", type=int, default=F.epochs, help=f"default {F.epochs}")
    p.add_argument("--fraction", type=float, default=F.fraction, help=f"share of the training split (default {F.fraction})")
    p.add_argument("--resolution", type=int, default=F.resolution, help=f"training resolution (default {F.resolution})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the points (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the machine is shared)")
    p.add_argument("--fit", action="store_true", help="train nothing: fit the predictor and print its k-fold quality")
    args = p.parse_args(argv)
    if args.n < 1:
        raise NasError(f"--n must be positive, got {args.n}")

    from nas.fidelity import Fidelity
    from nas.space import load_space
    from nas.surrogate import AccuracyPredictor, collect, default_runs_path

    space = load_space(args.space)
    out = args.out or default_runs_path(space)
    if not args.fit:
        fidelity = Fidelity(args.epochs, args.fraction, args.resolution)
        max_seconds = args.max_minutes * 60 if args.max_minutes is not None else None
        collect(space, out, args.n, fidelity=fidelity, seed=args.seed, threads=args.threads, max_seconds=max_seconds,
                log=lambda line: print(line, flush=True))
    quality = AccuracyPredictor.from_file(space, out).cross_validate()
    print(json.dumps(quality, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
