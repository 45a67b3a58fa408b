"""TPE and Gaussian-process Bayesian optimisation through Optuna's samplers and ask/tell interface.

Determinism: Optuna's samplers carry hidden state (random generators, GPSampler's kernel cache), so
a fresh sampler is built for every ask, seeded from this strategy's generator. A proposal is then a
function of that seed and the study's trials, which ``state_dict`` stores in full (params, state,
values, in Optuna's numbering); a restored or replayed strategy proposes exactly what the original
would (on the same machine: GPSampler's torch and L-BFGS arithmetic may differ across CPUs).
Asked-but-untold trials stay RUNNING in the study, which both samplers take into account when
parallel workers ask ahead (TPE's constant liar, GP's batch acquisition).

PRUNED trials are told to Optuna as COMPLETE with their low-fidelity values, since Optuna would
otherwise ignore them without intermediate values. Told trials that were not asked here (a
warm start) are added as finished trials.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from nas.space import Decision
from nas.strategies.base import Params, Strategy, check_option
from nas.trial import Trial


def _distribution(d: Decision) -> BaseDistribution:
    if d.kind == "categorical":
        return CategoricalDistribution(d.choices)
    if d.kind == "int":
        return IntDistribution(int(d.low), int(d.high), step=d.step)
    return FloatDistribution(d.low, d.high, log=True)


def _key(params: Params) -> str:
    return json.dumps(params, sort_keys=True)


class OptunaStrategy(Strategy):
    """Wraps one Optuna sampler class; the first ``n_startup_trials`` completed trials are random."""

    sampler_class: ClassVar[type[optuna.samplers.BaseSampler]]

    def __init__(self, space, seed: int = 0, n_objectives: int = 1, *, n_startup_trials: int = 10):
        super().__init__(space, seed, n_objectives)
        check_option(self.name, "n_startup_trials", n_startup_trials,
                     isinstance(n_startup_trials, int) and n_startup_trials >= 0, "a non-negative integer")
        self.n_startup_trials = n_startup_trials
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # per-trial INFO lines are the search loop's job
        self._distributions = {d.name: _distribution(d) for d in space.decisions}
        self._study = self._new_study()
        self._pending: dict[str, list[int]] = {}  # params key -> Optuna numbers asked and not yet told

    def _new_study(self) -> optuna.Study:
        return optuna.create_study(directions=["maximize"] * self.n_objectives)

    def ask(self) -> Params:
        self._study.sampler = self.sampler_class(seed=self.rng.randrange(2**31), n_startup_trials=self.n_startup_trials)
        trial = self._study.ask(self._distributions)
        params = {name: trial.params[name] for name in self._distributions}
        self._pending.setdefault(_key(params), []).append(trial.number)
        return params

    def tell(self, trial: Trial) -> None:
        result = self._result(trial)
        key = _key({name: trial.params.get(name) for name in self._distributions})
        numbers = self._pending.get(key)
        if not numbers:
            if result is not None:
                self._study.add_trial(create_trial(params=result[0], distributions=self._distributions, values=result[1]))
            return
        number = numbers.pop(0)
        if not numbers:
            del self._pending[key]
        if result is None:
            self._study.tell(number, state=TrialState.FAIL)
        else:
            self._study.tell(number, list(result[1]))

    def _state(self) -> dict[str, Any]:
        trials = [{"params": t.params, "state": t.state.name, "values": t.values} for t in self._study.get_trials(deepcopy=False)]
        return {"trials": trials, "pending": self._pending}

    def _load(self, state: dict[str, Any]) -> None:
        self._study = self._new_study()
        for t in state["trials"]:
            self._study.add_trial(create_trial(state=TrialState[t["state"]], params=t["params"],
                                               distributions=self._distributions, values=t["values"]))
        self._pending = {k: list(v) for k, v in state["pending"].items()}


class TPE(OptunaStrategy):
    """Tree-structured Parzen estimator (Optuna's default, multivariate); any number of objectives."""

    name = "tpe"
    sampler_class = optuna.samplers.TPESampler


class GP(OptunaStrategy):
    """Gaussian-process BO (Matern-5/2, log EI; log EHVI for several objectives). About 1 s per ask
    on tiny.yaml and 6 s on mnasnet.yaml on a 2-core CPU after the startup trials: for searches whose
    trials take minutes."""

    name = "gp"
    sampler_class = optuna.samplers.GPSampler
