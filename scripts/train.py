"""Train one architecture at a proxy fidelity and report its validation accuracy.

    python scripts/train.py mobilenet_v2 --data digits --epochs 8 --json result.json
    python scripts/train.py ARCH --init-from runs/supernet-mnasnet-digits-r32 --epochs 2   # fine-tune a subnet

ARCH is a reference name (mobilenet_v2, mnasnet1_0, mobilenet_v3_large, resnet50), a canonical
architecture string, or a JSON file (an architecture's to_json form, or an object with an "arch"
string such as a search's best.json). With --init-from, ARCH (a subnet of that supernet's space) starts
from the weights it inherits, and data and resolution are the supernet's. Defaults are the search's
proxy budget; exit status 1 when the candidate itself fails (e.g. a diverging loss), 2 on bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nas.cli import ArgumentParser, parse_arch_argument
from nas.errors import exit_on_user_error
from nas.fidelity import Fidelity
from nas.train import DEFAULT_FIDELITY, DEFAULT_HPARAMS, OPTIMIZERS, EpochStats, resolve_hparams

F, H = DEFAULT_FIDELITY, DEFAULT_HPARAMS



def print_epoch(epochs: int):
    def show(s: EpochStats) -> None:
        print(f"epoch {s.epoch}/{epochs}  train loss {s.train_loss:.4f}  val loss {s.val_loss:.4f}  "
              f"val accuracy {s.val_accuracy:.4f}  {s.seconds:.1f}s", flush=True)

    return show


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("arch", help="reference name, canonical architecture string or JSON file")
    p.add_argument("--data", default="digits", help="digits | cifar10:PATH | imagefolder:PATH (default digits)")
    p.add_argument("--epochs", type=int, default=F.epochs, help=f"default {F.epochs}")
    p.add_argument("--fraction", type=float, default=F.fraction, help=f"share of the training split (default {F.fraction})")
    p.add_argument("--resolution", type=int, default=F.resolution, help=f"training resolution (default {F.resolution})")
    p.add_argument("--seed", type=int, default=0, help="weights, data order and data split (default 0)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=H["optimizer"], help=f"default {H['optimizer']}")
    p.add_argument("--lr", type=float, default=H["lr"], help=f"peak learning rate (default {H['lr']})")
    p.add_argument("--batch-size", type=int, default=H["batch_size"], help=f"default {H['batch_size']}")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    p.add_argument("--json", type=Path, help="write the result as JSON to this file")
    p.add_argument("--init-from", type=Path, metavar="SUPERNET_DIR", help="start from the weights this subnet "
                   "inherits from a supernet trained by scripts/train_supernet.py")
    args = p.parse_args(argv)

    init = None
    if args.init_from:
        from nas.supernet.evaluate import inherited_subnet

        init, _, meta = inherited_subnet(args.init_from, parse_arch_argument(args.arch))
        args.data, args.resolution = meta.data, meta.resolution
        print(f"starting from the weights inherited from the supernet in {args.init_from}", flush=True)
    arch = parse_arch_argument(args.arch).with_resolution(args.resolution)
    fidelity = Fidelity(args.epochs, args.fraction, args.resolution)
    hparams = resolve_hparams({"optimizer": args.optimizer, "lr": args.lr, "batch_size": args.batch_size})
    from nas.data import load_dataset  # torch import deferred until the arguments are valid
    from nas.latency import training_lock
    from nas.train import train_candidate

    data = load_dataset(args.data, seed=args.seed)
    print(f"training {arch.to_string()}\n  on {data.name} ({len(data.train)} train, {len(data.val)} val images), "
          f"{fidelity.epochs} epochs x {fidelity.fraction:g} of the data at {fidelity.resolution}px, "
          f"{hparams['optimizer']} lr {hparams['lr']:g} batch {hparams['batch_size']}", flush=True)
    with training_lock():  # no nas latency measurement runs meanwhile (it would measure our load)
        result = train_candidate(arch, hparams, fidelity, data, seed=args.seed, threads=args.threads, init=init,
                                 on_epoch=print_epoch(fidelity.epochs))
    if args.json:
        record = {"arch": arch.to_string(), "data": data.name, "fidelity": fidelity.to_dict(), "hparams": hparams,
                  "seed": args.seed, **result.to_dict()}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    if result.failed:
        print(f"failed: {result.error}", file=sys.stderr)
        return 1
    print(f"accuracy {result.accuracy:.4f} after {result.epochs} epochs in {result.seconds:.1f}s "
          f"({result.images_per_second:.0f} training images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
