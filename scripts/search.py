"""Search for a CNN that is accurate and fast on the target, then export it to ONNX.

    python scripts/search.py --target cpu

runs the whole job on the embedded digits data with search_spaces/mnasnet.yaml: adapts the latency
table to this machine, measures the MobileNetV2 baselines, searches below the slowest one's latency /
1.8 (training candidates briefly, or with --evaluator supernet scoring them on a weight-sharing
supernet), measures the front and the baselines end to end, trains them all with one recipe and
several seeds, reports test
accuracy with error bars and the verdicts, and exports the winner. It writes runs/<name>/ (printed at
the end). Running the same command again resumes an interrupted run.
"""

from __future__ import annotations

import sys

from nas.cli import ArgumentParser, DefaultsHelpFormatter
from nas.config import add_config_arguments, config_from_args
from nas.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--out", help="run folder (default: runs/<space>-<objectives>-<evaluator>-<strategy>-seed<seed>)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    from nas.pipeline import run_main_job

    run_dir = run_main_job(config, args.out)
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
