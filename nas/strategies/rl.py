"""MnasNet's controller (Tan et al. 2019, after Zoph & Le 2017): an autoregressive RNN policy over the
space's decisions, trained by REINFORCE on the reward ``values[0]``; numpy only.

At step i an Elman RNN reads the embedding of choice i-1 (a learned start vector at step 0), and a
softmax over decision i's options reads its hidden state, so every choice can depend on all earlier
ones. ``int`` and ``log_float`` hyperparameters are discretised into ``bins`` values. MnasNet trains
with PPO; plain REINFORCE with an exponential-moving-average baseline (as in Zoph & Le and ENAS) is
enough here and has no minibatch to wait for. Advantages are divided by a running RMS of past
advantages, so the step size does not depend on the reward's units (accuracy, or a negated cost).
Each tell makes one update, whenever the trial was asked: the asynchronous form of the paper's
distributed training.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nas.strategies.base import Params, Strategy, check_option, discretise
from nas.trial import Trial


class RLController(Strategy):
    """REINFORCE-trained RNN controller; single-objective (use the MnasNet reward for latency).

    ``learning_rate`` 0.02 (was 0.05): on scripts/bench_strategies.py's objective with 300 evaluations,
    tuned on seeds 100-107, 0.02 gave the best reward on both mnasnet.yaml and mobilenetv2.yaml;
    0.05 was barely better than random search on mobilenetv2.yaml, and 0.1 or more collapses early.
    """

    name = "rl"
    multi_objective = False

    def __init__(self, space, seed: int = 0, n_objectives: int = 1, *, hidden_size: int = 32,
                 learning_rate: float = 0.02, baseline_decay: float = 0.95, bins: int = 5):
        super().__init__(space, seed, n_objectives)
        check_option(self.name, "hidden_size", hidden_size, isinstance(hidden_size, int) and hidden_size >= 1, "a positive integer")
        check_option(self.name, "learning_rate", learning_rate, isinstance(learning_rate, (int, float)) and learning_rate > 0, "a positive number")
        check_option(self.name, "baseline_decay", baseline_decay, isinstance(baseline_decay, (int, float)) and 0 <= baseline_decay < 1, "a number in [0, 1)")
        check_option(self.name, "bins", bins, isinstance(bins, int) and bins >= 2, "an integer >= 2")
        self.learning_rate = learning_rate
        self.baseline_decay = baseline_decay
        self._decisions = space.decisions
        self._options = [discretise(d, bins) for d in self._decisions]
        # small output weights: the untrained policy is close to uniform, i.e. to random search
        init = np.random.default_rng(seed)
        h = hidden_size
        self.weights: dict[str, np.ndarray] = {"start": init.normal(0, 0.5, h), "recurrent": init.normal(0, 0.5 / math.sqrt(h), (h, h))}
        for i, options in enumerate(self._options):
            self.weights[f"out{i}"] = init.normal(0, 0.1, (len(options), h))
            self.weights[f"bias{i}"] = np.zeros(len(options))
            if i < len(self._options) - 1:
                self.weights[f"embed{i}"] = init.normal(0, 0.5, (len(options), h))
        self._baseline = 0.0
        self._mean_square = 0.0  # running mean of squared advantages
        self._updates = 0

    # --- policy --------------------------------------------------------------------------------
    def _run(self, choices: list[int] | None = None) -> tuple[list[int], list[tuple]]:
        """Unroll the RNN, sampling each choice from ``self.rng`` unless ``choices`` are given.

        Returns the choices and, per step, (previous hidden, hidden, probabilities) for backprop.
        """
        w = self.weights
        hidden, x = np.zeros(len(w["start"])), w["start"]
        picked, steps = [], []
        for i, options in enumerate(self._options):
            previous, hidden = hidden, np.tanh(w["recurrent"] @ hidden + x)
            logits = w[f"out{i}"] @ hidden + w[f"bias{i}"]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            if choices is None:
                c = min(int(np.searchsorted(np.cumsum(probs), self.rng.random(), side="right")), len(options) - 1)
            else:
                c = choices[i]
            picked.append(c)
            steps.append((previous, hidden, probs))
            if i < len(self._options) - 1:
                x = w[f"embed{i}"][c]
        return picked, steps

    def _choices(self, params: Params) -> list[int]:
        """Option indices of a point; numeric values map to the nearest bin (log scale for log_float)."""
        out = []
        for d, options in zip(self._decisions, self._options):
            v = params[d.name]
            if d.kind == "categorical":
                out.append(options.index(v))
            else:
                scale = math.log if d.kind == "log_float" else float
                out.append(min(range(len(options)), key=lambda k: abs(scale(options[k]) - scale(v))))
        return out

    def log_prob(self, params: Params) -> float:
        """Log-probability that the controller proposes ``params`` (numeric values binned)."""
        choices = self._choices(params)
        _, steps = self._run(choices)
        return float(sum(math.log(probs[c]) for c, (_, _, probs) in zip(choices, steps)))

    def _grad_log_prob(self, params: Params) -> dict[str, np.ndarray]:
        """Gradient of ``log_prob(params)`` by backpropagation through the unrolled RNN."""
        w = self.weights
        choices = self._choices(params)
        _, steps = self._run(choices)
        grads = {k: np.zeros_like(v) for k, v in w.items()}
        into_hidden = np.zeros(len(w["start"]))  # gradient reaching h_i from step i+1
        for i in reversed(range(len(steps))):
            previous, hidden, probs = steps[i]
            dlogits = -probs
            dlogits[choices[i]] += 1.0
            grads[f"out{i}"] += np.outer(dlogits, hidden)
            grads[f"bias{i}"] += dlogits
            dpre = (w[f"out{i}"].T @ dlogits + into_hidden) * (1.0 - hidden**2)
            grads["recurrent"] += np.outer(dpre, previous)
            if i == 0:
                grads["start"] += dpre
            else:
                grads[f"embed{i - 1}"][choices[i - 1]] += dpre
            into_hidden = w["recurrent"].T @ dpre
        return grads

    # --- ask / tell ----------------------------------------------------------------------------
    def ask(self) -> Params:
        choices, _ = self._run()
        return {d.name: options[c] for d, options, c in zip(self._decisions, self._options, choices)}

    def tell(self, trial: Trial) -> None:
        """One REINFORCE step: weights += lr * normalised advantage * grad log p(trial's choices)."""
        result = self._result(trial)
        if result is None:
            return
        params, (reward, *_) = result
        if self._updates == 0:
            self._baseline = reward
        advantage = reward - self._baseline
        self._updates += 1
        decay = self.baseline_decay
        self._baseline = decay * self._baseline + (1 - decay) * reward
        self._mean_square = decay * self._mean_square + (1 - decay) * advantage**2
        rms = math.sqrt(self._mean_square / (1 - decay**self._updates))  # bias-corrected like Adam's moments
        if rms == 0.0:
            return
        step = self.learning_rate * advantage / rms
        for key, grad in self._grad_log_prob(params).items():
            self.weights[key] += step * grad

    def _state(self) -> dict[str, Any]:
        return {"weights": {k: v.tolist() for k, v in self.weights.items()}, "baseline": self._baseline,
                "mean_square": self._mean_square, "updates": self._updates}

    def _load(self, state: dict[str, Any]) -> None:
        self.weights = {k: np.array(v, dtype=float) for k, v in state["weights"].items()}
        self._baseline = state["baseline"]
        self._mean_square = state["mean_square"]
        self._updates = state["updates"]
