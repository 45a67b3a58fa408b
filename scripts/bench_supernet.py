"""Benchmark the accuracy evaluators against a trained-from-scratch truth: which ranks best per CPU-second?

    python scripts/bench_supernet.py --json bench_supernet.json            # trains the truth (long)
    python scripts/bench_supernet.py --truth benchmarks/supernet_truth/mnasnet.json --json out.json

The truth: --archs random subnets of the space (mnasnet.yaml), each trained from scratch on digits at
32 px with the fixed recipe at its full budget (the main job's final training), --seeds seeds each;
their mean test accuracy. Its own seed-to-seed agreement (Kendall tau between single seeds) is the
ceiling any evaluator can reach. Against it, Kendall tau and Spearman rho, and CPU-seconds per
candidate, of:
  supernet     weights inherited from the trained supernet, BatchNorm recalibrated, validation accuracy
  predictor    fitted on supernet accuracies of --predictor-archs other random subnets
  scratch_rung the search's old first rung: 3 epochs on 2/3 of the data, 1 seed, each candidate with
               its own sampled hyperparameters (the search's setting before the fixed recipe)
  recipe_rung  the scratch evaluator's first rung today: the fixed recipe's ladder (eta 3, 2 rungs),
               1 seed (trained here, journalled)
  one_seed     the scratch evaluator's top rung: one seed of the full recipe (the truth's seed 0 against
               the mean of its other seeds, so that it is not ranked against itself)
  params, flops  the naive predictors
and, with --finetune K, whether fine-tuning a subnet extracted from the supernet (BatchNorm
recalibrated) with the same recipe and budget is at least as good as training it from scratch: the
first K truth subnets, seed 0, test accuracy against the truth's seed 0 and its mean.
Trainings are journalled (--journal) as they finish, so an interrupted run resumes; --truth-only stops
once the truth and the scratch rung are trained and written to --truth-out (commit that file; later
runs pass it as --truth and train nothing). Run it under the heavy lock on a quiet machine: the CPU
seconds are figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

from nas.cli import ArgumentParser
from nas.errors import NasError, exit_on_user_error
from nas.latency.targets import cpu_model

ROOT = Path(__file__).resolve().parent.parent
DATA, RESOLUTION = "digits", 32
TRUTH_SPLIT = "test"  # what the main job's final phase reports
OLD_TOP_EPOCHS = 6  # the search's top rung before the fixed recipe; its first rung (eta 3) is the scratch rung


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "mnasnet.yaml", help="space file (default mnasnet.yaml)")
    p.add_argument("--archs", type=int, default=40, help="random subnets in the truth (default 40)")
    p.add_argument("--seeds", type=int, default=3, help="from-scratch seeds per subnet in the truth (default 3)")
    p.add_argument("--truth", type=Path, help="read the truth (and the scratch rung) from this file instead of training it")
    p.add_argument("--truth-out", type=Path, help="where to write the collected truth (default benchmarks/supernet_truth/<space>.json)")
    p.add_argument("--truth-only", action="store_true", help="stop after collecting the truth and the scratch rung")
    p.add_argument("--journal", type=Path, help="JSONL of finished trainings (default runs/bench_supernet/<space>-trainings.jsonl)")
    p.add_argument("--workers", type=int, default=2, help="training processes sharing the cores (default 2)")
    p.add_argument("--supernet-dir", type=Path, help="a trained supernet folder, or where to train one (default runs/bench_supernet/<space>-supernet)")
    p.add_argument("--predictor-archs", type=int, default=500, help="supernet-scored subnets the predictor is fitted on (default 500)")
    p.add_argument("--finetune", type=int, default=0, metavar="K",
                   help="also fine-tune the first K truth subnets from the supernet and compare with scratch (default 0)")
    p.add_argument("--json", type=Path, help="write all figures as JSON to this file")
    args = p.parse_args(argv)
    if args.finetune < 0:
        raise NasError(f"--finetune must be at least 0, got {args.finetune}")
    for name, low in (("archs", 4), ("seeds", 2), ("workers", 1), ("predictor_archs", 20)):
        if getattr(args, name) < low:
            raise NasError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if args.truth is not None and args.truth_only:
        raise NasError("--truth-only collects a truth; it cannot be combined with --truth FILE")

    from nas.space import load_space

    space = load_space(args.space)
    work = Path("runs") / "bench_supernet"
    truth = (read_truth(args.truth, space, args) if args.truth is not None
             else collect_truth(space, args, args.journal or work / f"{space.name}-trainings.jsonl",
                                args.truth_out or ROOT / "benchmarks" / "supernet_truth" / f"{space.name}.json"))
    if args.truth_only:
        return 0
    report = evaluate_all(space, truth, args.supernet_dir or work / f"{space.name}-supernet", args.predictor_archs,
                          args.finetune, args.journal or work / f"{space.name}-trainings.jsonl", args.workers)
    report["command"] = " ".join(["python", "scripts/bench_supernet.py", *(argv if argv is not None else sys.argv[1:])])
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def space_hash(space) -> str:
    return hashlib.sha256(Path(space.source).read_bytes()).hexdigest()[:16]


def sample_subnets(space, n: int, seed: int) -> list[dict]:
    """The first ``n`` random points of the space for ``seed`` (the same ones on every run)."""
    rng = random.Random(seed)
    return [space.sample(rng) for _ in range(n)]


# --- the truth and the scratch rung (trainings, journalled) ------------------------------------------


def collect_truth(space, args, journal: Path, out: Path) -> dict:
    import numpy as np

    from nas.fidelity import Fidelity, ladder
    from nas.finals import train_seeds
    from nas.train import LEGACY_RECIPE, default_recipe, seed_agreement

    journal.parent.mkdir(parents=True, exist_ok=True)
    points = sample_subnets(space, args.archs, seed=0)
    archs = [space.decode(p, resolution=RESOLUTION) for p in points]
    recipe = default_recipe(DATA)
    fidelity = recipe.fidelity(RESOLUTION)
    log = lambda line: print("truth: " + line, flush=True)
    log(f"{len(archs)} subnets x {args.seeds} seeds, {fidelity.epochs} epochs at {RESOLUTION} px, recipe {recipe.to_dict()}")
    runs = train_seeds(archs, range(args.seeds), fidelity, DATA, [recipe] * len(archs), journal=journal,
                       workers=args.workers, label="truth", log=log)
    rung = ladder(Fidelity(OLD_TOP_EPOCHS, 1.0, RESOLUTION), eta=3, rungs=2)[0]
    rung_recipes = [LEGACY_RECIPE.with_hparams(space.hyperparameters_of(p)) for p in points]
    log(f"scratch rung: {rung.epochs} epochs x {rung.fraction:g} of the data, 1 seed, sampled hyperparameters")
    rung_runs = train_seeds(archs, [0], rung, DATA, rung_recipes, journal=journal, workers=args.workers,
                            label="scratch-rung", log=log)
    rows = []
    for point, arch, mine, (scratch,) in zip(points, archs, runs, rung_runs):
        rows.append({"arch": arch.to_string(), "params": point,
                     "val": [r.val_accuracy for r in mine], "test": [r.test_accuracy for r in mine],
                     "cpu_seconds": [r.cpu_seconds for r in mine],
                     "scratch_rung": {"hparams": space.hyperparameters_of(point), "val": scratch.val_accuracy,
                                      "cpu_seconds": scratch.cpu_seconds, "error": scratch.error}})
    acc = np.array([[np.nan if a is None else a for a in row[TRUTH_SPLIT]] for row in rows], dtype=float)
    truth = {"space": space.name, "space_file": Path(space.source).name, "space_hash": space_hash(space),
             "data": DATA, "resolution": RESOLUTION, "split": TRUTH_SPLIT, "seeds": args.seeds,
             "recipe": recipe.to_dict(), "fidelity": fidelity.to_dict(), "scratch_rung_fidelity": rung.to_dict(),
             "agreement": seed_agreement(acc), "machine": machine(), "archs": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(truth, indent=1) + "\n")
    log(f"wrote {out}; Kendall tau between single seeds {truth['agreement']['kendall_between_seeds']}")
    if truth["agreement"]["kendall_between_seeds"] < 0.7:
        log("single seeds agree below 0.7: sharpen the truth with more seeds (--seeds 5) before judging evaluators")
    return truth


def read_truth(path: Path, space, args) -> dict:
    from nas.train import default_recipe

    try:
        truth = json.loads(path.read_text())
    except FileNotFoundError:
        raise NasError(f"{path}: no such truth file; run without --truth to train one") from None
    except ValueError as exc:
        raise NasError(f"{path}: not a JSON truth file ({exc}); run without --truth to train one") from None
    recipe = default_recipe(DATA).to_dict()
    for key, wanted in (("space_hash", space_hash(space)), ("recipe", recipe), ("resolution", RESOLUTION), ("data", DATA)):
        if truth.get(key) != wanted:
            raise NasError(f"{path}: {key} is {truth.get(key)!r}, this run needs {wanted!r}; "
                           "run without --truth to train a truth for it")
    if len(truth.get("archs", ())) < args.archs:
        raise NasError(f"{path}: holds {len(truth.get('archs', ()))} subnets, --archs asks for {args.archs}")
    return truth


# --- the evaluators ---------------------------------------------------------------------------------


def rank_quality(scores, truth) -> dict:
    from scipy.stats import kendalltau, spearmanr

    return {"kendall": round(float(kendalltau(scores, truth).statistic), 3),
            "spearman": round(float(spearmanr(scores, truth).statistic), 3)}


def recipe_rung(truth: dict, journal: Path, workers: int) -> dict:
    """The scratch evaluator's first rung with the fixed recipe, seed 0, on the truth's subnets."""
    import numpy as np

    from nas.arch import Arch
    from nas.fidelity import Fidelity, ladder
    from nas.finals import train_seeds
    from nas.train import Recipe

    recipe = Recipe.from_dict(truth["recipe"])
    rung = ladder(Fidelity.from_dict(truth["fidelity"]), eta=3, rungs=2)[0]
    archs = [Arch.parse(row["arch"]) for row in truth["archs"]]
    log = lambda line: print("recipe rung: " + line, flush=True)
    runs = train_seeds(archs, [0], rung, DATA, [recipe] * len(archs), journal=journal, workers=workers,
                       label="recipe-rung", log=log)
    return {"val": [0.0 if r.val_accuracy is None else r.val_accuracy for (r,) in runs],
            "cpu_seconds_per_candidate": float(np.mean([r.cpu_seconds or 0.0 for (r,) in runs])),
            "fidelity": rung.to_dict(), "failed": sum(r.error is not None for (r,) in runs)}


def evaluate_all(space, truth: dict, supernet_dir: Path, predictor_archs: int, finetune: int, journal: Path,
                 workers: int) -> dict:
    import numpy as np

    from nas.arch import Arch
    from nas.cost import arch_cost
    from nas.data import load_dataset
    from nas.supernet import SupernetEvaluator, load_supernet, train_supernet
    from nas.surrogate import fit_predictor

    rows = truth["archs"]
    n = len(rows)
    target = np.array([np.nanmean([np.nan if a is None else a for a in row[truth["split"]]]) for row in rows])
    target = np.nan_to_num(target, nan=0.0)  # an architecture that failed every seed ranks last
    archs = [Arch.parse(row["arch"]) for row in rows]
    points = [row["params"] for row in rows]
    evaluators: dict[str, dict] = {}

    # the naive predictors
    start = time.process_time()
    costs = [arch_cost(a, 10) for a in archs]
    per = (time.process_time() - start) / n
    evaluators["params"] = {**rank_quality([c.params for c in costs], target), "cpu_seconds_per_candidate": per}
    evaluators["flops"] = {**rank_quality([c.flops for c in costs], target), "cpu_seconds_per_candidate": per}

    # the old scratch rung (trained with the truth)
    rung = [row["scratch_rung"]["val"] for row in rows]
    evaluators["scratch_rung"] = {
        **rank_quality([0.0 if a is None else a for a in rung], target),
        "cpu_seconds_per_candidate": float(np.mean([row["scratch_rung"]["cpu_seconds"] for row in rows])),
        "fidelity": truth["scratch_rung_fidelity"], "failed": sum(a is None for a in rung)}

    # the scratch evaluator today: its first rung, and one seed of its top rung (the full recipe)
    today = recipe_rung(truth, journal, workers)
    evaluators["recipe_rung"] = {**rank_quality(today.pop("val"), target), **today}
    seed0 = [0.0 if row[truth["split"]][0] is None else row[truth["split"]][0] for row in rows]
    others = np.nan_to_num([np.nanmean([np.nan if a is None else a for a in row[truth["split"]][1:]]) for row in rows])
    evaluators["one_seed"] = {**rank_quality(seed0, others),
                              "cpu_seconds_per_candidate": float(np.mean([row["cpu_seconds"][0] or 0.0 for row in rows]))}

    # the supernet: trained once (or found trained), then every candidate scored with inherited weights
    from nas.supernet.checkpoint import read_meta

    meta = read_meta(supernet_dir)
    if meta is None or not meta.complete:  # a finished supernet is benchmarked with the recipe it was trained with
        train_supernet(space, DATA, RESOLUTION, supernet_dir, log=lambda line: print("supernet: " + line, flush=True))
    net = load_supernet(supernet_dir, space, DATA, RESOLUTION)
    train_seconds = net.meta.train_seconds  # recorded by the training, also when it was found trained
    dataset = load_dataset(DATA, seed=0)
    evaluator = SupernetEvaluator(net, dataset, RESOLUTION)
    start = time.process_time()
    supernet_acc = evaluator.accuracy_many(archs)
    supernet_cpu = (time.process_time() - start) / n
    evaluators["supernet"] = {**rank_quality(supernet_acc, target), "cpu_seconds_per_candidate": supernet_cpu,
                              "mean_accuracy": round(float(np.mean(supernet_acc)), 4),
                              "setup_seconds": train_seconds, "recipe": net.meta.recipe}

    # evaluations per second on fresh subnets (none of the truth's), and the predictor fitted on them
    fit_points = sample_subnets(space, predictor_archs + n, seed=1)[n:]
    fit_archs = [space.decode(p, resolution=RESOLUTION) for p in fit_points]
    wall = time.perf_counter()
    fit_acc = evaluator.accuracy_many(fit_archs)
    evals_per_second = len(fit_archs) / (time.perf_counter() - wall)
    start = time.process_time()
    predictor = fit_predictor(space, fit_points, fit_acc, seed=0)
    fit_cpu = time.process_time() - start
    many = sample_subnets(space, 10_000, seed=2)
    start = time.process_time()
    predictor.predict_many(many)
    predict_cpu = (time.process_time() - start) / len(many)
    predicted = np.asarray(predictor.predict_many(points), dtype=float)
    evaluators["predictor"] = {**rank_quality(predicted, target), "cpu_seconds_per_candidate": predict_cpu,
                               "setup_seconds": train_seconds + len(fit_archs) / evals_per_second + fit_cpu,
                               "fitted_on": len(fit_archs),
                               "kendall_vs_supernet": rank_quality(predicted, supernet_acc)["kendall"],
                               "holdout": predictor.holdout.to_dict()}
    agreement = truth["agreement"]
    extra = {"finetune": finetune_vs_scratch(truth, evaluator, dataset, finetune)} if finetune else {}
    return {
        "space": truth["space"], "n": n, "data": truth["data"], "resolution": truth["resolution"],
        "truth_split": truth["split"], "truth_seeds": truth["seeds"], "truth_recipe": truth["recipe"],
        "truth_fidelity": truth["fidelity"],
        "truth_kendall_between_seeds": agreement["kendall_between_seeds"],
        "truth_cpu_seconds_per_training": float(np.mean([c for row in rows for c in row["cpu_seconds"] if c is not None])),
        "train_seconds": train_seconds, "evals_per_second": round(evals_per_second, 1),
        "evaluators": {name: {k: (round(v, 5) if isinstance(v, float) else v) for k, v in ev.items()}
                       for name, ev in evaluators.items()},
        "machine": machine(), "truth_machine": truth.get("machine"), **extra,
    }


def finetune_vs_scratch(truth: dict, evaluator, dataset, k: int) -> dict:
    """Fine-tune the first ``k`` truth subnets from their inherited weights with the truth's recipe
    and budget (seed 0) and compare their test accuracy with training from scratch."""
    import numpy as np

    from nas.arch import Arch
    from nas.fidelity import Fidelity
    from nas.train import Recipe, train_candidate, validate

    recipe, fidelity = Recipe.from_dict(truth["recipe"]), Fidelity.from_dict(truth["fidelity"])
    rows = []
    for row in truth["archs"][:k]:
        arch = Arch.parse(row["arch"])
        init = evaluator.extract(arch, dropout=recipe.dropout)
        start = time.process_time()
        result = train_candidate(arch, None, fidelity, dataset, seed=0, recipe=recipe, init=init, return_model=True)
        cpu = time.process_time() - start
        test = None if result.failed else validate(result.model, dataset, fidelity.resolution, split="test")[0]
        inherited = validate(init, dataset, fidelity.resolution, split="test")[0]
        scratch = [a for a in row["test"] if a is not None]
        rows.append({"arch": row["arch"], "inherited": inherited, "finetuned": test, "scratch_seed0": row["test"][0],
                     "scratch_mean": float(np.mean(scratch)) if scratch else None, "cpu_seconds": round(cpu, 1)})
        print(f"finetune: inherited {inherited:.4f} -> fine-tuned {test} | scratch seed 0 {row['test'][0]}, "
              f"mean {rows[-1]['scratch_mean']} ({cpu:.0f} CPU-s): {row['arch']}", flush=True)
    paired = [(r["finetuned"] or 0.0, r["scratch_seed0"] or 0.0, r["scratch_mean"] or 0.0) for r in rows]
    diff_seed0 = [f - s for f, s, _ in paired]
    diff_mean = [f - m for f, _, m in paired]
    return {"archs": rows, "mean_diff_vs_scratch_seed0": round(float(np.mean(diff_seed0)), 4),
            "mean_diff_vs_scratch_mean": round(float(np.mean(diff_mean)), 4),
            "wins_vs_scratch_seed0": sum(d > 0 for d in diff_seed0), "ties": sum(d == 0 for d in diff_seed0),
            "n": len(rows)}


def print_table(report: dict) -> None:
    print(f"\n{report['space']}: {report['n']} subnets, truth = mean {report['truth_split']} accuracy of "
          f"{report['truth_seeds']} from-scratch seeds ({report['truth_fidelity']['epochs']} epochs); "
          f"Kendall between single seeds {report['truth_kendall_between_seeds']}")
    print(f"supernet training {report['train_seconds']:.0f} s; {report['evals_per_second']} supernet evaluations/s\n")
    print("| evaluator | Kendall tau | Spearman rho | CPU-s per candidate |\n|---|---|---|---|")
    for name in ("supernet", "predictor", "scratch_rung", "recipe_rung", "one_seed", "params", "flops"):
        ev = report["evaluators"][name]
        print(f"| {name} | {ev['kendall']:.3f} | {ev['spearman']:.3f} | {ev['cpu_seconds_per_candidate']:.3g} |")
    if "finetune" in report:
        ft = report["finetune"]
        print(f"\nfine-tuned from the supernet vs from scratch (same recipe and budget, {ft['n']} subnets, test accuracy): "
              f"{ft['mean_diff_vs_scratch_seed0']:+.4f} vs scratch seed 0 ({ft['wins_vs_scratch_seed0']} wins, "
              f"{ft['ties']} ties), {ft['mean_diff_vs_scratch_mean']:+.4f} vs the scratch mean of the seeds")


if __name__ == "__main__":
    sys.exit(main())
