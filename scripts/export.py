"""Export an architecture to ONNX with a PyTorch parity check, trained or taken from a run.

    python scripts/export.py runs/<name> --out model.onnx              # the run's trained winner
    python scripts/export.py ARCH --out model.onnx [--epochs N] [--data SPEC] [--resolution R]
    python scripts/export.py ARCH --init-from SUPERNET_DIR --out model.onnx   # weights inherited, no training

ARCH is a reference name, a canonical architecture string or a JSON file (a run's best.json: its
weights.pt beside it is used when present). Prints one JSON object: the path, the parity with
PyTorch and the ONNX model's own accuracy on the test split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nas.cli import ArgumentParser, parse_arch_argument
from nas.errors import NasError, exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("arch", help="run folder, best.json, reference name or architecture string")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--epochs", type=int, help="training epochs when there are no trained weights (default: the "
                        "training recipe's)")
    parser.add_argument("--data", help="digits, cifar10:PATH or imagefolder:PATH (default: the run's, else digits)")
    parser.add_argument("--resolution", type=int, help="input resolution (default: the architecture's)")
    parser.add_argument("--seed", type=int, help="data split and training seed (default: the run's, else 0)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--init-from", type=Path, metavar="SUPERNET_DIR", help="take ARCH's weights from this "
                        "supernet (scripts/train_supernet.py), BatchNorm recalibrated, instead of training")
    args = parser.parse_args(argv)
    source = Path(args.arch)
    if source.is_dir():
        source = source / "best.json"
        if not source.is_file():
            raise NasError(f"{args.arch}: not a finished run folder (no best.json); run scripts/search.py first")
    arch = parse_arch_argument(str(source) if source.suffix == ".json" else args.arch)
    if args.resolution:
        arch = arch.with_resolution(args.resolution)
    hparams = json.loads(source.read_text()).get("hparams") if source.suffix == ".json" and source.is_file() else None
    weights = source.with_name("weights.pt") if source.suffix == ".json" else None
    # a run's weights are scored on the run's own test split: same data, same split seed
    run_config = source.with_name("config.json") if source.suffix == ".json" else None
    ran = json.loads(run_config.read_text()) if run_config is not None and run_config.is_file() else {}
    data_spec = args.data or ran.get("data", "digits")
    seed = args.seed if args.seed is not None else ran.get("seed", 0)

    import torch

    from nas.builder import build_model
    from nas.data import load_dataset
    from nas.export import export_checked
    from nas.fidelity import Fidelity
    from nas.train import default_recipe, train_candidate

    if args.init_from:
        from nas.supernet.evaluate import inherited_subnet

        model, data, meta = inherited_subnet(args.init_from, arch)
        arch = arch.with_resolution(meta.resolution)
        print(f"using weights inherited from the supernet in {args.init_from}", file=sys.stderr)
    elif weights is not None and weights.is_file() and not args.resolution:
        data = load_dataset(data_spec, seed=seed)
        model = build_model(arch, data.num_classes).eval()
        try:
            model.load_state_dict(torch.load(weights, weights_only=True))
        except (RuntimeError, EOFError, ValueError) as exc:  # other classes than the run's data, or a torn file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NasError(f"{weights}: does not fit {arch.to_string()} with {data.num_classes} classes ({first}); "
                           "pass the run's --data, or an architecture string to train afresh") from None
        print(f"using trained weights from {weights}", file=sys.stderr)
    else:
        data = load_dataset(data_spec, seed=seed)
        epochs = args.epochs or default_recipe(data_spec).epochs
        print(f"training for {epochs} epochs on {data_spec} at {arch.resolution}px", file=sys.stderr)
        result = train_candidate(arch, hparams or None, Fidelity(epochs, 1.0, arch.resolution), data,
                                 seed=seed, return_model=True)
        if result.failed:
            raise NasError(f"training failed: {result.error}")
        model = result.model
    check = export_checked(model, args.out, data, arch.resolution, split="test", opset=args.opset)
    print(json.dumps({"arch": arch.to_string(), **check.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
