"""Extraction audit (seed 001): how much of a listed model could a buyer steal by spending
its whole trial budget on queries?

The audit plays a Knockoff-style attacker against the model itself (plaintext
onnxruntime stands in for the trial: the outputs are what a trial returns):
  * queries come from a public surrogate pool: rows resembling the seller's domain (its
    calibration rows with Gaussian jitter of 10% of each column's spread, or rows the
    seller supplies),
  * "random" draws them at random; "adaptive" starts with a quarter at random, then asks,
    round by round, for the pool rows where the current surrogate is least sure (smallest
    top-2 margin), which sit near its decision boundary,
  * per output policy ("full" probabilities, "noisy" ones, "rounded" to a grid,
    "label-only") the attacker fits a surrogate MLP on what it got back,
and reports, against the budget k, the surrogate's accuracy on labelled evaluation rows
and its fidelity (agreement with the victim's predictions there).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from common.errors import BadInput
from common.onnx_io import run_model
from common.tail import predicted_labels

if TYPE_CHECKING:  # scikit-learn takes ~1 s to import: only audits load it (`_sklearn`)
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.preprocessing import StandardScaler

FloatArray = npt.NDArray[np.float64]
POLICIES = ("full", "noisy", "rounded", "label-only")
STRATEGIES = ("random", "adaptive")


@dataclass(frozen=True)
class AuditPoint:
    policy: str
    strategy: str
    budget: int
    accuracy: float  # surrogate vs true labels
    fidelity: float  # surrogate vs victim predictions


@dataclass(frozen=True)
class AuditReport:
    model_id: str
    victim_accuracy: float
    budgets: list[int]
    points: list[AuditPoint]
    max_fidelity: float
    policy: str  # the listing's own policy, which the recommendation is for
    recommended_budget: int  # largest budget tested keeping fidelity below max_fidelity
    noise_std: float
    grid: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class Victim:
    """The listed model as a query oracle under an output policy."""

    def __init__(self, model_bytes: bytes, output: str, class_labels: Sequence[str],
                 noise_std: float, grid: float, seed: int) -> None:
        self.model_bytes, self.output, self.labels = model_bytes, output, list(class_labels)
        self.noise_std, self.grid = noise_std, grid
        self.rng = np.random.default_rng(seed)

    def probabilities(self, rows: FloatArray) -> FloatArray:
        return run_model(self.model_bytes, rows, self.output, self.labels)

    def answer(self, rows: FloatArray, policy: str) -> FloatArray:
        """What a query returns: probabilities, perturbed, rounded, or one-hot labels."""
        p = self.probabilities(rows)
        if policy == "noisy":
            p = p + self.rng.normal(0.0, self.noise_std, p.shape)
        elif policy == "rounded":
            p = np.round(p / self.grid) * self.grid
        elif policy == "label-only":
            p = np.eye(p.shape[1])[p.argmax(1)]
        return p


def surrogate_pool(calibration: FloatArray, size: int, seed: int) -> FloatArray:
    """Rows resembling the seller's domain: calibration rows plus 10% column jitter."""
    rng = np.random.default_rng(seed)
    base = calibration[rng.integers(0, len(calibration), size)]
    spread = calibration.std(axis=0)
    pool: FloatArray = base + rng.normal(0.0, 0.1, base.shape) * spread
    return pool


def _is_classifier(model: MLPClassifier | MLPRegressor) -> bool:
    from sklearn.neural_network import MLPClassifier
    return isinstance(model, MLPClassifier)


def _fit(queries: FloatArray, answers: FloatArray, policy: str, seed: int
         ) -> tuple[StandardScaler, MLPClassifier | MLPRegressor]:
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.preprocessing import StandardScaler
    """The attacker's surrogate. With soft outputs it fits both a classifier on the labels
    and a regressor on the log-probabilities, and keeps whichever agrees better with the
    victim on a fifth of its own queries held out (it loses nothing over label-only)."""
    scaler = StandardScaler().fit(queries)
    x = scaler.transform(queries)
    labels = answers.argmax(1)
    if len(np.unique(labels)) < 2:  # too few queries to see two classes
        return scaler, MLPClassifier(hidden_layer_sizes=(4,), max_iter=10).fit(
            np.vstack([x, x]), np.r_[labels, (labels + 1) % answers.shape[1]])
    classifier = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=seed)
    if policy == "label-only":
        return scaler, classifier.fit(x, labels)
    held = np.arange(len(x)) % 5 == 0
    targets = np.log(np.clip(answers, 1e-4, None))
    candidates: list[MLPClassifier | MLPRegressor] = [
        classifier, MLPRegressor(hidden_layer_sizes=(64,), max_iter=400, random_state=seed)]
    scores = []
    for candidate in candidates:
        if held.any() and (~held).sum() >= 2 and len(np.unique(labels[~held])) > 1:
            candidate.fit(x[~held], labels[~held] if _is_classifier(candidate)
                          else targets[~held])
            scores.append(float(np.mean(_predict((scaler, candidate), queries[held],
                                                 answers.shape[1]) == labels[held])))
        else:
            scores.append(0.0)
    best = candidates[int(np.argmax(scores))]
    return scaler, best.fit(x, labels if _is_classifier(best) else targets)


def _predict(fitted: tuple[StandardScaler, MLPClassifier | MLPRegressor], rows: FloatArray,
             classes: int) -> npt.NDArray[np.int64]:
    scaler, model = fitted
    x = scaler.transform(rows)
    if _is_classifier(model):
        return np.asarray(model.predict(x), dtype=np.int64)
    return np.asarray(model.predict(x).reshape(len(rows), classes).argmax(1), dtype=np.int64)


def _margin(fitted: tuple[StandardScaler, MLPClassifier | MLPRegressor], rows: FloatArray
            ) -> FloatArray:
    scaler, model = fitted
    x = scaler.transform(rows)
    scores = model.predict_proba(x) if _is_classifier(model) else model.predict(x)
    scores = np.asarray(scores, dtype=np.float64).reshape(len(rows), -1)
    top = np.sort(scores, axis=1)
    result: FloatArray = top[:, -1] - top[:, -2] if top.shape[1] > 1 else np.abs(top[:, 0])
    return result


def attack(victim: Victim, pool: FloatArray, budget: int, policy: str, strategy: str,
           seed: int) -> tuple[StandardScaler, MLPClassifier | MLPRegressor]:
    rng = np.random.default_rng(seed)
    if strategy == "random":
        chosen = rng.choice(len(pool), size=budget, replace=False)
        queries = pool[chosen]
        return _fit(queries, victim.answer(queries, policy), policy, seed)
    first = max(budget // 4, 2)
    chosen = rng.choice(len(pool), size=first, replace=False)
    taken = set(chosen.tolist())
    queries, answers = pool[chosen], victim.answer(pool[chosen], policy)
    fitted = _fit(queries, answers, policy, seed)
    while len(queries) < budget:
        step = min(max(budget // 8, 1), budget - len(queries))
        candidates = np.array([i for i in range(len(pool)) if i not in taken])
        nearest = candidates[np.argsort(_margin(fitted, pool[candidates]))[:step]]
        taken.update(nearest.tolist())
        queries = np.vstack([queries, pool[nearest]])
        answers = np.vstack([answers, victim.answer(pool[nearest], policy)])
        fitted = _fit(queries, answers, policy, seed)
    return fitted


def run_audit(model_id: str, victim: Victim, calibration: FloatArray, eval_rows: FloatArray,
              eval_labels: Sequence[str], budgets: Sequence[int], policy: str,
              max_fidelity: float, seeds: int = 2) -> AuditReport:
    if len(eval_rows) != len(eval_labels) or not len(eval_rows):
        raise BadInput("the audit needs labelled evaluation rows (--eval FILE --label-column)")
    pool = surrogate_pool(calibration, max(4 * max(budgets), 2000), seed=0)
    victim_probabilities = victim.probabilities(eval_rows)
    victim_labels = victim_probabilities.argmax(1)
    names = victim.labels or [str(i) for i in range(victim_probabilities.shape[1])]
    truth = np.array([names.index(label) if label in names else -1 for label in eval_labels])
    points = []
    with warnings.catch_warnings():
        from sklearn.exceptions import ConvergenceWarning
        warnings.simplefilter("ignore", ConvergenceWarning)
        for pol in POLICIES:
            for strategy in STRATEGIES:
                for budget in budgets:
                    accuracy = fidelity = 0.0
                    for seed in range(seeds):
                        fitted = attack(victim, pool, budget, pol, strategy, seed)
                        predicted = _predict(fitted, eval_rows, victim_probabilities.shape[1])
                        accuracy += float(np.mean(predicted == truth)) / seeds
                        fidelity += float(np.mean(predicted == victim_labels)) / seeds
                    points.append(AuditPoint(pol, strategy, budget, accuracy, fidelity))
    safe = [b for b in budgets if all(p.fidelity < max_fidelity for p in points
                                      if p.policy == policy and p.budget == b)]
    recommended = max(safe) if safe else 0
    victim_accuracy = float(np.mean(np.array(predicted_labels(victim_probabilities, names))
                                    == np.array(eval_labels)))
    return AuditReport(model_id, victim_accuracy, list(budgets), points, max_fidelity, policy,
                       recommended, victim.noise_std, victim.grid)


def plot(report: AuditReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for policy in POLICIES:
        for strategy, style in zip(STRATEGIES, ("-", "--"), strict=True):
            points = [p for p in report.points if p.policy == policy and p.strategy == strategy]
            budgets = [p.budget for p in points]
            axes[0].plot(budgets, [p.fidelity for p in points], style, marker="o",
                         label=f"{policy}, {strategy}")
            axes[1].plot(budgets, [p.accuracy for p in points], style, marker="o")
    axes[0].axhline(report.max_fidelity, color="grey", linewidth=0.8)
    axes[1].axhline(report.victim_accuracy, color="grey", linewidth=0.8)
    for axis, title in zip(axes, ("fidelity to the victim", "surrogate accuracy"), strict=True):
        axis.set_xscale("log")
        axis.set_xlabel("queries (trial rows)")
        axis.set_title(title)
        axis.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"extraction audit of {report.model_id}: recommended budget "
                    f"{report.recommended_budget} rows (fidelity < {report.max_fidelity:g})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
