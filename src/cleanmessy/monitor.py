"""`cleanmessy monitor`: do the photos a model serves still look like the photos it was trained on?

It compares recent requests (the request log's lines of one model version, or a folder of photos
classified now) with that version's training data, in three checks:

- **Flag rate.** The share of photos the familiarity detector flags as `unfamiliar`, against the
  rate it flags photos like its training photos: the version's measured in-distribution flag rate
  on its test split (`ood_flag_rate_in`) or, where that is lower or not recorded, the detector's
  `alpha`. A one-sided exact binomial test: fewer flags than expected is no alarm.
- **Label mix.** The labels the model gives these photos, against the labels it gave its own test
  split (the columns of the confusion matrix in its run's evaluation.json): Fisher's exact test
  for two classes, a chi-square test for more (its exact permutation distribution by Monte Carlo
  when an expected count is under 5). Not against the training labels themselves: a model that
  errs towards one class would show a moved mix on photos exactly like its training photos (the
  tiny test model labels every photo clean). A version whose run has no evaluation.json is
  compared with its training class proportions (goodness of fit, the same tests).
- **Features.** The photos' features on the detector's principal axes (a few numbers per photo,
  as the request log keeps them), against the training photos' own: the maximum mean discrepancy
  (MMD) with a Gaussian kernel whose width is the median distance (the median heuristic), and a
  permutation p-value (seeded; each side subsampled to at most `MAX_ROWS` rows, so time and
  memory are bounded). MMD rather than a classifier's AUC: no model to fit per permutation and no
  hyperparameter beyond the kernel width, a test that is exact under its permutation null at any
  sample size (a model trained on 16 photos has a bank of 16), and it is deterministic. The
  permutation p-value cannot go below 1 / (PERMUTATIONS + 1) = 0.002, under the Bonferroni
  threshold of three checks (0.0033).

**The rule.** Drift when any check's p-value is below `LEVEL` (0.01) divided by the number of
checks that ran (Bonferroni): the chance of a false alarm on photos like the training photos is at
most 1 %. With fewer than `MIN_REQUESTS` classified photos the verdict is "not enough data",
whatever the p-values say. Photos that could not be classified (an `error`) are left out.

The core (`compare`, the checks, `figure`) is pure: arrays and counts in, a `Report` out. The edge
(`load_model`, `classify_files`, `log_run`) loads the version from the registry and logs a run to
the MLflow experiment `EXPERIMENT`: metrics, the figure and the report as JSON."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cleanmessy.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cleanmessy.pyfunc import PhotoClassifier
    from cleanmessy.tracking import RegisteredVersion

EXPERIMENT = "clean-vs-messy-monitoring"  # the MLflow experiment of monitoring runs (the README names it)
EXPERIMENT_TAGS = {"mlflow.note.content": "Clean vs Messy monitoring: one run per `cleanmessy monitor`, comparing "
                                          "served photos with the training data of the model that served them."}
LEVEL = 0.01  # family-wise false-alarm rate over the checks (Bonferroni)
MIN_REQUESTS = 20  # fewer classified photos: "not enough data"
PERMUTATIONS = 500  # the MMD's permutation p-value is at least 1 / (PERMUTATIONS + 1)
MAX_ROWS = 500  # rows of each side in the MMD (a seeded subsample beyond)
MONTE_CARLO = 10_000  # draws for the label mix's chi-square with small expected counts
DEFAULT_LAST = 1000  # requests analysed: the most recent
WIDTH = 100  # the verdict line fits a 100-column terminal
FIGURE, REPORT = "monitor.png", "monitor_report.json"  # the run's artifacts

DRIFT, NO_DRIFT, NOT_ENOUGH = "drift", "no drift", "not enough data"
FLAG_RATE, LABEL_MIX, FEATURES = "flag_rate", "label_mix", "features"


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Recent:
    """The classified photos to check, one entry each (photos that got an error are not here)."""

    labels: list[str]
    familiarity: np.ndarray  # (n,) in (0, 1], NaN where the version has no detector
    unfamiliar: np.ndarray  # (n,) 1.0 flagged, 0.0 not, NaN not scored
    projections: np.ndarray | None  # (n, p) on the detector's principal axes (NaN rows: not recorded)
    n_errors: int = 0  # photos left out: not classified

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.familiarity) != n or len(self.unfamiliar) != n or (
                self.projections is not None and len(self.projections) != n):
            raise ValueError("Recent: labels, familiarity, unfamiliar and projections differ in length")

    @property
    def n(self) -> int:
        return len(self.labels)

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> Recent:
        """From request-log records (requestlog.py's lines): those with an error are counted, not kept."""
        kept = [r for r in records if not r.get("error") and r.get("label")]
        projections = [r.get("projection") for r in kept]
        return cls(labels=[str(r["label"]) for r in kept],
                   familiarity=np.array([_number(r.get("familiarity")) for r in kept], np.float64),
                   unfamiliar=np.array([_flag(r.get("unfamiliar")) for r in kept], np.float64),
                   projections=_stack(projections),
                   n_errors=len(records) - len(kept))

    @classmethod
    def from_frame(cls, frame: Any, projections: np.ndarray | None) -> Recent:
        """From `PhotoClassifier.classify`'s answer: its frame (label, familiarity, unfamiliar, error)
        and its (n, p) projections (NaN rows for errors)."""
        ok = (frame["error"].fillna("") == "").to_numpy()

        def column(name: str) -> Any:
            return frame[name].to_numpy()[ok] if name in frame.columns else [None] * int(ok.sum())

        kept_projections = None
        if projections is not None and np.asarray(projections).ndim == 2 and len(projections) == len(frame):
            kept_projections = np.asarray(projections, np.float64)[ok]
            if not np.isfinite(kept_projections).any():
                kept_projections = None
        return cls(labels=[str(x) for x in frame["label"].to_numpy()[ok]],
                   familiarity=np.array([_number(x) for x in column("familiarity")], np.float64),
                   unfamiliar=np.array([_flag(x) for x in column("unfamiliar")], np.float64),
                   projections=kept_projections, n_errors=int((~ok).sum()))


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def _flag(value: Any) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if isinstance(value, bool | np.bool_ | int | np.integer):
        return float(bool(value))
    return math.nan


def _stack(rows: list[Any]) -> np.ndarray | None:
    """(n, p) from lists of p numbers (p: the first row's), NaN rows where a row is missing or another
    length; None when no row has one."""
    width = next((len(r) for r in rows if isinstance(r, list) and r), 0)
    if not width:
        return None
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        if isinstance(row, list) and len(row) == width:
            out[i] = [_number(x) for x in row]
    return out


@dataclass(frozen=True)
class Reference:
    """What the model version says about its training data."""

    class_counts: dict[str, int] | None  # training photos per class; None: not recorded
    projections: np.ndarray | None  # (m, p) the training photos' features on the principal axes
    alpha: float | None  # the detector's flag level; None: the version has no detector
    measured_flag_rate: float | None = None  # its run's `ood_flag_rate_in` (the test split's flag rate)
    test_label_counts: dict[str, int] | None = None  # the labels it gave its test split, by class (evaluate's)

    @property
    def expected_flag_rate(self) -> float | None:
        """The rate at which photos like the training photos are flagged: the measured one, or alpha
        where that is higher (a small test split's zero does not make every flag an alarm)."""
        if self.alpha is None:
            return None
        measured = self.measured_flag_rate
        return min(max(self.alpha, measured if measured is not None and math.isfinite(measured) else 0.0), 1.0)

    @property
    def flag_rate_source(self) -> str:
        measured = self.measured_flag_rate
        if self.alpha is not None and measured is not None and math.isfinite(measured) and measured > self.alpha:
            return "ood_flag_rate_in"
        return "alpha"


# ---------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """One test: its statistic, p-value (None: it did not run, `reason` says why), whether it
    signals drift at the report's per-check threshold, and a one-line reason."""

    name: str  # FLAG_RATE | LABEL_MIX | FEATURES
    test: str  # the test, in words
    statistic: float | None
    p_value: float | None
    drift: bool
    reason: str  # one line, for the report
    short: str  # a few words, for the verdict line

    @property
    def ran(self) -> bool:
        return self.p_value is not None


def _p(p: float) -> str:
    """A p-value in few characters: p = 0.41, p = 0.003, p < 1e-12."""
    if p < 1e-12:
        return "p < 1e-12"
    if p < 0.001:
        return f"p = {p:.0e}"
    return f"p = {p:.2g}" if p < 0.01 else f"p = {p:.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %" if x >= 0.01 or x == 0 else f"{100 * x:.1f} %"


def flag_rate_check(n_flagged: int, n_scored: int, expected: float | None, threshold: float = LEVEL,
                    source: str = "alpha") -> Check:
    """One-sided exact binomial test: are more photos flagged than `expected` of photos like the
    training photos?"""
    test = "one-sided exact binomial test of the flag rate"
    if expected is None:
        return Check(FLAG_RATE, test, None, None, False, "not checked: this version has no familiarity detector", "")
    if not n_scored:
        return Check(FLAG_RATE, test, None, None, False, "not checked: no photo has a familiarity score", "")
    from scipy.stats import binomtest

    rate = n_flagged / n_scored
    p = float(binomtest(n_flagged, n_scored, expected, alternative="greater").pvalue)
    drift = p < threshold
    said = f"{_pct(rate)} of {n_scored} photos unfamiliar (expected {_pct(expected)}, {source}; {_p(p)})"
    short = (f"{_pct(rate)} of {n_scored} unfamiliar (expected {_pct(expected)})" if drift
             else f"{_pct(rate)} unfamiliar (expected {_pct(expected)})")
    return Check(FLAG_RATE, test, rate, p, drift, ("more flagged than expected: " if drift else "") + said, short)


def label_mix_check(counts: dict[str, int], training: dict[str, int] | None, threshold: float = LEVEL,
                    seed: int = 0, tested: dict[str, int] | None = None) -> Check:
    """Do the photos get the labels in the mix the model gives photos like its training photos?

    With `tested` (the labels the model gave its test split, by class): a two-sample test of the
    two label counts, Fisher's exact test for two classes, chi-square for more (its exact
    permutation distribution, by Monte Carlo, when an expected count is under 5). Without: a
    goodness-of-fit test against the training class proportions `training` (exact binomial for two
    classes, chi-square for more, Monte Carlo when an expected count is under 5); a model that
    errs towards a class then shows as a moved mix. The statistic is Pearson's chi-square."""
    if tested and sum(tested.values()) > 0:
        return _label_mix_two_sample(counts, tested, threshold, seed)
    if not training or sum(training.values()) <= 0:
        return Check(LABEL_MIX, "label mix", None, None, False,
                     "not checked: the version records neither its training photos nor its test labels per class", "")
    classes = list(training)
    if missing := [c for c in classes if training[c] <= 0]:
        return Check(LABEL_MIX, "label mix", None, None, False,
                     f"not checked: class {missing[0]} has no training photos", "")
    observed = np.array([counts.get(c, 0) for c in classes], np.int64)
    n = int(observed.sum())
    if not n:
        return Check(LABEL_MIX, "label mix", None, None, False, "not checked: no photo has a training class label", "")
    probs = np.array([training[c] for c in classes], np.float64)
    probs /= probs.sum()
    expected = n * probs
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    if len(classes) == 2:
        from scipy.stats import binomtest

        test = "exact binomial test of the label mix"
        p = float(binomtest(int(observed[0]), n, float(probs[0]), alternative="two-sided").pvalue)
    elif (expected >= 5).all():
        from scipy.stats import chisquare

        test = "chi-square test of the label mix"
        p = float(chisquare(observed, expected).pvalue)
    else:
        test = f"chi-square statistic, Monte Carlo p-value ({MONTE_CARLO} draws) of the label mix"
        draws = np.random.default_rng(seed).multinomial(n, probs, size=MONTE_CARLO)
        simulated = ((draws - expected) ** 2 / expected).sum(axis=1)
        p = float((1 + (simulated >= chi2 - 1e-9).sum()) / (1 + MONTE_CARLO))
    drift = p < threshold
    shares = observed / n
    i = int(np.argmax(shares - probs))  # the class whose share grew most, in words
    moved = f"{_pct(shares[i])} {classes[i]} vs {_pct(probs[i])} in training"
    mix = ", ".join(f"{_pct(s)} {c}" for c, s in zip(classes, shares))
    reason = (f"label mix differs from training: {mix} ({moved}; {_p(p)})" if drift
              else f"label mix as in training: {mix} ({_p(p)})")
    return Check(LABEL_MIX, test, chi2, p, drift, reason, f"labels {moved}" if drift else "label mix as in training")


def _label_mix_two_sample(counts: dict[str, int], tested: dict[str, int], threshold: float, seed: int) -> Check:
    classes = [c for c in dict.fromkeys([*tested, *counts]) if tested.get(c, 0) + counts.get(c, 0) > 0]
    table = np.array([[counts.get(c, 0) for c in classes], [tested.get(c, 0) for c in classes]], np.int64)
    n, m = int(table[0].sum()), int(table[1].sum())
    if not n:
        return Check(LABEL_MIX, "label mix", None, None, False, "not checked: no photo was classified", "")
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    if len(classes) < 2:
        test, p = "label mix (one label only, on both sides)", 1.0
    elif len(classes) == 2:
        from scipy.stats import fisher_exact

        test = "Fisher's exact test of the label mix against the test split's"
        p = float(fisher_exact(table).pvalue)
    elif (expected >= 5).all():
        from scipy.stats import chi2_contingency

        test = "chi-square test of the label mix against the test split's"
        p = float(chi2_contingency(table, correction=False).pvalue)
    else:  # the exact conditional distribution: the pooled labels dealt out again, both sides' sizes kept
        test = f"chi-square statistic, permutation p-value ({MONTE_CARLO} draws), against the test split's labels"
        pooled = table.sum(axis=0)
        first = np.random.default_rng(seed).multivariate_hypergeometric(pooled, n, size=MONTE_CARLO)
        drawn = np.stack([first, pooled - first], axis=1)  # (draws, 2, k)
        simulated = ((drawn - expected) ** 2 / expected).sum(axis=(1, 2))
        p = float((1 + (simulated >= chi2 - 1e-9).sum()) / (1 + MONTE_CARLO))
    drift = p < threshold
    shares, before = table[0] / n, table[1] / m
    i = int(np.argmax(shares - before))  # the class whose share grew most, in words
    moved = f"{_pct(shares[i])} {classes[i]} vs {_pct(before[i])} on test photos"
    mix = ", ".join(f"{_pct(s)} {c}" for c, s in zip(classes, shares))
    on_test = ", ".join(f"{_pct(s)} {c}" for c, s in zip(classes, before))
    reason = (f"label mix differs from the test split's: {mix} ({moved}; {_p(p)})" if drift
              else f"label mix as on the test split: {mix} vs {on_test} on its {m} photos ({_p(p)})")
    return Check(LABEL_MIX, test, chi2, p, drift, reason, f"labels {moved}" if drift else "label mix as expected")


def _subsample(x: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    return x[np.sort(rng.choice(len(x), rows, replace=False))] if len(x) > rows else x


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = PERMUTATIONS, max_rows: int = MAX_ROWS,
             seed: int = 0) -> tuple[float, float, float]:
    """Two-sample test of `x` (m, p) against `y` (n, p): the MMD (the square root of the biased MMD²
    estimate, in the kernel's units: 0 to sqrt 2) with the Gaussian kernel exp(-d² / 2σ²), σ the
    median distance between the pooled rows; its permutation p-value, (1 + #{permuted >= observed})
    / (1 + permutations); and σ. Each side is a seeded subsample of at most `max_rows` rows."""
    rng = np.random.default_rng(seed)
    x = _subsample(np.asarray(x, np.float64), max_rows, rng)
    y = _subsample(np.asarray(y, np.float64), max_rows, rng)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"an MMD test needs at least 2 rows a side, got {m} and {n}")
    z = np.concatenate([x, y])
    squares = (z * z).sum(axis=1)
    d2 = np.maximum(squares[:, None] + squares[None, :] - 2.0 * (z @ z.T), 0.0)
    pairs = d2[np.triu_indices(len(z), 1)]
    sigma2 = float(np.median(pairs))
    if sigma2 <= 0:  # most rows identical: the mean distance, else any width (all equal: MMD 0)
        sigma2 = float(pairs.mean()) or 1.0
    kernel = np.exp(-d2 / (2.0 * sigma2))
    # MMD² = s' K s with s = 1/m on x's rows, -1/n on y's; a permutation reassigns the signs.
    signs = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)])
    observed = float(signs @ kernel @ signs)
    shuffled = np.stack([rng.permutation(signs) for _ in range(permutations)], axis=1)  # (m + n, P)
    null = np.einsum("ip,ip->p", shuffled, kernel @ shuffled)
    p = float((1 + (null >= observed - 1e-12).sum()) / (1 + permutations))
    return math.sqrt(max(observed, 0.0)), p, math.sqrt(sigma2)


def _permutation_p(p: float, permutations: int) -> str:
    """A permutation p-value in words: at its floor, 1 / (permutations + 1), it is an upper bound."""
    floor = 1.0 / (permutations + 1)
    return f"p ≤ {floor:.3f}" if p <= floor * (1 + 1e-9) else _p(p)


def features_check(recent: np.ndarray | None, training: np.ndarray | None, threshold: float = LEVEL,
                   permutations: int = PERMUTATIONS, max_rows: int = MAX_ROWS, seed: int = 0) -> Check:
    """MMD permutation test of the recent photos' projections against the training photos'."""
    test = f"MMD, Gaussian kernel (median heuristic), {permutations}-permutation p-value"
    if training is None or not len(training):
        return Check(FEATURES, test, None, None, False,
                     "not checked: this version has no familiarity detector (no training features)", "")
    if recent is None:
        return Check(FEATURES, test, None, None, False, "not checked: the photos' features were not recorded", "")
    recent = np.asarray(recent, np.float64)
    recent = recent[np.isfinite(recent).all(axis=1)] if recent.ndim == 2 else recent[:0]
    training = np.asarray(training, np.float64)
    if recent.ndim != 2 or recent.shape[1] != training.shape[1]:
        return Check(FEATURES, test, None, None, False,
                     f"not checked: the photos' features have {recent.shape[-1] if recent.ndim == 2 else 0} "
                     f"dimensions, the training photos' {training.shape[1]}", "")
    if len(recent) < 2 or len(training) < 2:
        return Check(FEATURES, test, None, None, False,
                     f"not checked: {len(recent)} photos and {len(training)} training photos have features "
                     "(2 a side needed)", "")
    mmd, p, _ = mmd_test(recent, training, permutations, max_rows, seed)
    said = _permutation_p(p, permutations)
    drift = p < threshold
    reason = (f"features differ from the training photos' (MMD {mmd:.3f}, {said}; "
              f"{min(len(recent), max_rows)} vs {min(len(training), max_rows)} photos)" if drift
              else f"features as in training (MMD {mmd:.3f}, {said})")
    return Check(FEATURES, test, mmd, p, drift, reason,
                 f"features differ (MMD {said})" if drift else "features as in training")


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class Report:
    """The verdict, and what each check found."""

    verdict: str  # DRIFT | NO_DRIFT | NOT_ENOUGH
    n: int  # classified photos compared
    n_errors: int  # photos left out: not classified
    checks: tuple[Check, ...]
    level: float
    threshold: float  # each check's: level / the number of checks that ran (Bonferroni)
    min_requests: int
    permutations: int
    n_flagged: int
    n_scored: int
    expected_flag_rate: float | None
    flag_rate_source: str
    label_counts: dict[str, int]
    training_counts: dict[str, int] | None
    test_label_counts: dict[str, int] | None  # the labels the model gave its test split
    context: dict[str, Any] = field(default_factory=dict)  # which model, which source: set by the edge

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    @property
    def drift(self) -> bool:
        return self.verdict == DRIFT

    @property
    def flag_rate(self) -> float | None:
        return self.n_flagged / self.n_scored if self.n_scored else None

    @property
    def reason(self) -> str:
        """Why the verdict, in words: every check's reason (drifting ones first)."""
        if self.verdict == NOT_ENOUGH:
            head = f"{self.n} classified photos, at least {self.min_requests} needed"
            return "; ".join([head, *(c.reason for c in self.checks if c.ran)])
        ordered = sorted(self.checks, key=lambda c: not c.drift)
        return "; ".join(c.reason for c in ordered)

    def line(self) -> str:
        """The one-line verdict, at most WIDTH characters."""
        start = f"monitor: {self.verdict} — "
        if self.verdict == NOT_ENOUGH:
            forms = [f"{self.n} classified photos, at least {self.min_requests} needed"]
            if self.n_scored:
                forms.insert(0, forms[0] + f" ({self.n_flagged} unfamiliar)")
        elif self.verdict == DRIFT:
            parts = [c.short for c in self.checks if c.drift]
            forms = [", ".join(parts), ", ".join(p.split(" (")[0] for p in parts)]
        else:
            ran = [c for c in self.checks if c.ran]
            words = {FLAG_RATE: "flag rate", LABEL_MIX: "label mix", FEATURES: "features"}
            as_trained = " and ".join(words[c.name] for c in ran if c.name != FLAG_RATE)
            flags = [c.short for c in ran if c.name == FLAG_RATE]
            rest = f"{as_trained} as in training" if as_trained else ""
            forms = [", ".join([f"{self.n} photos", *flags, *([rest] if rest else [])]),
                     f"{self.n} photos, {', '.join(words[c.name] for c in ran) or 'nothing'} as expected"]
            if not ran:
                forms = [f"{self.n} photos, but no check could run (nothing recorded to compare)"]
        for form in forms:
            if len(start + form) <= WIDTH:
                return start + form
        return (start + forms[-1])[:WIDTH - 1] + "…"

    def metrics(self) -> dict[str, float]:
        """The monitoring run's metrics (those that were measured)."""
        flag, mix, features = self.check(FLAG_RATE), self.check(LABEL_MIX), self.check(FEATURES)
        values = {"n": self.n, "n_errors": self.n_errors, "flag_rate": self.flag_rate,
                  "expected_flag_rate": self.expected_flag_rate, "flag_rate_p": flag.p_value,
                  "label_mix_chi2": mix.statistic, "label_mix_p": mix.p_value,
                  "mmd": features.statistic, "drift_p": features.p_value,
                  "drift": float(self.drift), "enough_data": float(self.verdict != NOT_ENOUGH)}
        return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checks"] = [asdict(c) for c in self.checks]
        out["flag_rate"] = self.flag_rate
        out["reason"] = self.reason
        out["line"] = self.line()
        return out


def compare(recent: Recent, reference: Reference, level: float = LEVEL, min_requests: int = MIN_REQUESTS,
            permutations: int = PERMUTATIONS, max_rows: int = MAX_ROWS, seed: int = 0) -> Report:
    """Run the three checks on `recent` against `reference` and decide: drift when a check's p-value
    is below `level` / (the checks that ran); "not enough data" below `min_requests` photos."""
    expected = reference.expected_flag_rate
    scored = np.isfinite(recent.unfamiliar)
    n_scored, n_flagged = int(scored.sum()), int(np.nansum(recent.unfamiliar))
    counts = dict(Counter(recent.labels))
    runs = [expected is not None and n_scored > 0,
            bool(reference.class_counts or reference.test_label_counts) and recent.n > 0,
            reference.projections is not None and recent.projections is not None]

    def run_checks(threshold: float) -> tuple[Check, ...]:
        return (flag_rate_check(n_flagged, n_scored, expected, threshold, reference.flag_rate_source),
                label_mix_check(counts, reference.class_counts, threshold, seed, reference.test_label_counts),
                features_check(recent.projections, reference.projections, threshold, permutations, max_rows, seed))

    threshold = level / max(1, sum(runs))  # the checks that can run: their count sets the threshold
    checks = run_checks(threshold)
    if (ran := sum(c.ran for c in checks)) != sum(runs):  # one could not after all (NaN rows, other dimensions)
        threshold = level / max(1, ran)
        checks = run_checks(threshold)
    if recent.n < min_requests:
        verdict = NOT_ENOUGH
    else:
        verdict = DRIFT if any(c.drift for c in checks) else NO_DRIFT
    return Report(verdict=verdict, n=recent.n, n_errors=recent.n_errors, checks=checks, level=level,
                  threshold=threshold, min_requests=min_requests, permutations=permutations, n_flagged=n_flagged,
                  n_scored=n_scored, expected_flag_rate=expected, flag_rate_source=reference.flag_rate_source,
                  label_counts={**{c: 0 for c in (reference.test_label_counts or reference.class_counts or {})},
                                **counts},
                  training_counts=dict(reference.class_counts) if reference.class_counts else None,
                  test_label_counts=dict(reference.test_label_counts) if reference.test_label_counts else None)


# ---------------------------------------------------------------- choosing log lines


@dataclass(frozen=True)
class Selection:
    records: list[dict[str, Any]]  # the chosen model's most recent lines, oldest first
    model: str  # "name/version"
    n_model: int  # all lines of that model in the log
    n_other: int  # lines of other versions, skipped
    n_unknown: int  # lines that name no model, skipped


def select_records(records: Sequence[dict[str, Any]], last: int, model: str | None = None) -> Selection | None:
    """The most recent `last` lines of `model` ("name/version"), by default the model of the newest
    line that names one; None when no line names a model."""
    named = [r for r in records if isinstance(r.get("model"), str) and r["model"]]
    if model is None:
        if not named:
            return None
        model = named[-1]["model"]
    mine = [r for r in named if r["model"] == model]
    return Selection(records=mine[-last:] if last > 0 else [], model=model, n_model=len(mine),
                     n_other=len(named) - len(mine), n_unknown=len(records) - len(named))


# ---------------------------------------------------------------- the figure


def figure(report: Report, recent: Recent, reference: Reference, title: str = "") -> Figure:
    """Three panels: the photos' familiarity against the uniform spread of photos like the
    training photos; the label mix against training; the photos and the training photos on the
    detector's first two principal axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.8), layout="constrained")
    fig.suptitle(title or report.line(), fontsize=11)
    ax_fam, ax_mix, ax_pca = fig.subplots(1, 3)

    familiarity = recent.familiarity[np.isfinite(recent.familiarity)]
    if len(familiarity):
        bins = np.linspace(0.0, 1.0, 21)
        ax_fam.hist(familiarity, bins=bins, density=True, color="tab:orange", alpha=0.8,
                    label=f"these {len(familiarity)} photos")
        ax_fam.axhline(1.0, color="black", ls="--", lw=1.2, label="photos like the training photos (uniform)")
        if reference.alpha is not None:
            ax_fam.axvspan(0.0, reference.alpha, color="tab:red", alpha=0.15,
                           label=f"unfamiliar (< {reference.alpha:g})")
        flag = report.check(FLAG_RATE)
        ax_fam.set_title(f"Familiarity: {flag.short or flag.reason}", fontsize=10)
        ax_fam.set_xlabel("familiarity (share of training photos less typical)")
        ax_fam.set_ylabel("density")
        ax_fam.set_xlim(0, 1)
        ax_fam.legend(fontsize=8, loc="upper right")
    else:
        _empty(ax_fam, "Familiarity", "no familiarity scores")

    sides = [(f"training labels ({sum(counts.values())} photos)", counts, "lightgrey")
             for counts in [report.training_counts] if counts]
    sides += [(f"model's labels, test split ({sum(counts.values())})", counts, "grey")
              for counts in [report.test_label_counts] if counts]
    if sides and report.n:
        classes = list(dict.fromkeys([c for _, counts, _ in sides for c in counts] + list(report.label_counts)))
        sides.append((f"model's labels, these {report.n} photos", report.label_counts, "tab:orange"))
        xs, width = np.arange(len(classes)), 0.8 / len(sides)
        for j, (label, counts, colour) in enumerate(sides):
            total = max(sum(counts.values()), 1)
            shares = [counts.get(c, 0) / total for c in classes]
            bars = ax_mix.bar(xs + (j - (len(sides) - 1) / 2) * width, shares, width, color=colour, label=label)
            for bar, share in zip(bars, shares):
                ax_mix.annotate(_pct(share), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                                va="bottom", fontsize=7)
        ax_mix.set_xticks(xs, classes)
        ax_mix.set_ylim(0, 1.25)
        ax_mix.set_ylabel("share of photos")
        mix = report.check(LABEL_MIX)
        ax_mix.set_title("Label mix" + (f": {_p(mix.p_value)}" if mix.ran else ""), fontsize=10)
        ax_mix.legend(fontsize=8, loc="upper right")
    else:
        _empty(ax_mix, "Label mix", "no labels to compare")

    training, shown = reference.projections, recent.projections
    if training is not None and shown is not None and training.shape[1] >= 2 and shown.shape[1] >= 2:
        shown = shown[np.isfinite(shown).all(axis=1)]
        ax_pca.scatter(training[:, 0], training[:, 1], s=8, color="grey", alpha=0.5,
                       label=f"training photos ({len(training)})")
        ax_pca.scatter(shown[:, 0], shown[:, 1], s=10, color="tab:orange", alpha=0.7,
                       label=f"these photos ({len(shown)})")
        features = report.check(FEATURES)
        said = f": MMD {_permutation_p(features.p_value, report.permutations)}" if features.ran else ""
        ax_pca.set_title(f"Features on the first two principal axes{said}", fontsize=10)
        ax_pca.set_xlabel("axis 1")
        ax_pca.set_ylabel("axis 2")
        ax_pca.legend(fontsize=8, loc="best")
    else:
        _empty(ax_pca, "Features", "features not recorded")
    return fig


def _empty(ax: Any, title: str, text: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, color="dimgrey", transform=ax.transAxes)


# ---------------------------------------------------------------- the edge: registry, photos, MLflow


@dataclass
class LoadedModel:
    """A registered version and what it says about its training data; `classifier` only when loaded
    to classify photos (TensorFlow)."""

    version: RegisteredVersion
    reference: Reference
    classifier: PhotoClassifier | None = None

    @property
    def label(self) -> str:
        """name/version, as request-log lines name it."""
        return f"{self.version.name}/{self.version.version}"


def load_model(model_uri: str, classify: bool) -> LoadedModel:
    """The registered version `model_uri` names and its `Reference`: class counts (its MLmodel's
    training_data), the familiarity detector's training features and alpha, its run's measured
    in-distribution flag rate (`ood_flag_rate_in`). With `classify` the model itself is loaded
    (TensorFlow loads here) and the detector is the classifier's; without, only the detector's
    file is read, where the version has one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from cleanmessy import tracking
    from cleanmessy.familiarity import Familiarity
    from cleanmessy.pyfunc import load_photo_classifier

    version = tracking.resolve_version(model_uri)
    local, meta = tracking.download_version(version.uri)
    classifier = load_photo_classifier(local, version.uri) if classify else None
    if classifier is not None:
        detector = getattr(classifier, "familiarity", None)
    else:
        file = _detector_file(local)
        try:
            detector = Familiarity.load(file) if file else None
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot read {version.uri}'s familiarity detector: {exc}") from None
    data = meta.get("training_data") if isinstance(meta.get("training_data"), dict) else {}
    classes = data.get("classes") if isinstance(data.get("classes"), dict) else {}
    counts = {str(c): int(n) for c, n in classes.items() if isinstance(n, int) and n > 0} or None
    measured = None
    if detector is not None and version.run_id:
        try:
            measured = MlflowClient().get_run(version.run_id).data.metrics.get("ood_flag_rate_in")
        except MlflowException:
            measured = None
    reference = Reference(class_counts=counts,
                          projections=None if detector is None else np.asarray(detector.project(detector.bank)),
                          alpha=None if detector is None else float(detector.alpha), measured_flag_rate=measured,
                          test_label_counts=test_label_counts(version.run_id))
    return LoadedModel(version, reference, classifier)


EVALUATION = "evaluation.json"  # the training run's artifact that evaluate writes: the test split's results


def test_label_counts(run_id: str) -> dict[str, int] | None:
    """The labels a version gave its test split, by class: the columns of the confusion matrix in its
    run's evaluation.json; None when the run or the file is gone or holds none."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        matrix = mlflow.artifacts.load_dict(f"runs:/{run_id}/{EVALUATION}")["test"]["confusion_matrix"]
        predicted: dict[str, int] = {}
        for row in matrix.values():
            for label, count in row.items():
                predicted[str(label)] = predicted.get(str(label), 0) + int(count)
    except (MlflowException, OSError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return predicted if sum(predicted.values()) > 0 else None


def _detector_file(local: Path) -> Path | None:
    """The familiarity detector's file in a downloaded version (the pyfunc's `familiarity` artifact,
    as its MLmodel lists it); None for a version registered before it."""
    from mlflow.models import Model

    from cleanmessy.pyfunc import FAMILIARITY_ARTIFACT

    flavor = Model.load(str(local)).flavors.get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get(FAMILIARITY_ARTIFACT)
    path = entry.get("path") if isinstance(entry, dict) else None
    return local / path if path and (local / path).is_file() else None


def classify_files(classifier: PhotoClassifier, files: Iterable[Path]) -> Recent:
    """Classify photo files with the registered model (`PhotoClassifier.classify`), a bounded batch
    at a time; unreadable files and photos the model refuses are counted as errors."""
    import pandas as pd

    from cleanmessy import pyfunc

    files = list(files)
    step = max(1, min(pyfunc.MAX_ROWS, getattr(getattr(classifier, "predictor", None), "step", pyfunc.MAX_ROWS)))
    frames, projections = [], []
    for start in range(0, len(files), step):
        photos, unreadable = [], []
        for i, path in enumerate(files[start:start + step]):
            try:
                with path.open("rb") as f:
                    photos.append(f.read(pyfunc.MAX_PHOTO_BYTES + 1))
            except OSError:
                photos.append(b"")
                unreadable.append(i)
        frame, projected = classifier.classify(photos)
        frame = frame.reset_index(drop=True)
        for i in unreadable:
            frame.loc[i, "error"] = "unreadable"
        frames.append(frame)
        projections.append(np.asarray(projected, np.float64))
    if not frames:
        return Recent([], np.zeros(0), np.zeros(0), None)
    return Recent.from_frame(pd.concat(frames, ignore_index=True), np.concatenate(projections))


def log_run(report: Report, recent: Recent, reference: Reference, tags: dict[str, str],
            params: dict[str, Any], run_name: str, title: str = "") -> str:
    """A run in the monitoring experiment: the report's metrics, `tags` and `params`, the figure and
    the report as JSON; returns its id."""
    import os

    import mlflow

    from cleanmessy import tracking
    from cleanmessy.project import project_paths

    try:
        paths = project_paths()
    except UserError:
        if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
            raise
        paths = None  # a tracking server, outside a project: no project path is needed
    experiment_id = tracking.open_experiment(paths, name=EXPERIMENT, tags=EXPERIMENT_TAGS)
    fig = figure(report, recent, reference, title)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.set_tags({**tags, "verdict": report.verdict})
        mlflow.log_params(params)
        mlflow.log_metrics(report.metrics())
        mlflow.log_figure(fig, FIGURE)
        mlflow.log_text(json.dumps(report.to_dict(), indent=2, default=_json_default) + "\n", REPORT)
        return run.info.run_id


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def default_log() -> Path:
    """The project's request log (requestlog.DEFAULT_PATH under the project root)."""
    from cleanmessy import requestlog
    from cleanmessy.project import project_paths

    return project_paths().root / requestlog.DEFAULT_PATH


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it is under it, else as given."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _newest(files: list[Path], last: int) -> list[Path]:
    """The `last` most recently modified files, in their given order."""
    def mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    keep = set(sorted(files, key=mtime)[-last:]) if last > 0 else set()
    return [f for f in files if f in keep]


def run(log: Path | None, photos: tuple[Path, list[Path]] | None, choose_model: Callable[[], str],
        model_uri: str | None, last: int = DEFAULT_LAST, fail_on_drift: bool = False, seed: int = 0) -> int:
    """`cleanmessy monitor`: compare the request log's lines (`log`; the lines of `model_uri`'s
    version when given, else of the newest line's model) or `photos` (the folder and its photo
    files, classified now with the model `choose_model` names) with the version's training data;
    log a monitoring run; print the verdict line and where the run is. `choose_model` connects
    MLflow. Returns 1 on drift with `fail_on_drift`, else 0."""
    from cleanmessy import requestlog  # MLflow and TensorFlow load once the input is known to be there

    if last < 1:
        raise UserError(f"--last must be at least 1, not {last}")
    if photos is None:
        path = log or default_log()
        if not path.is_file() and not requestlog.rotated(path).is_file():
            raise UserError(f"no request log at {path}: servers write it as they classify photos; "
                            "or compare a folder of photos with --photos DIR")
        records, bad = requestlog.read(path)
        if not records:
            raise UserError(f"the request log {path} holds no requests" + (f" ({bad} unreadable lines)" if bad else ""))
        choose_model()  # connects MLflow (and checks a tracking server answers)
        from cleanmessy import tracking

        wanted = None
        if model_uri:
            version = tracking.resolve_version(model_uri)
            wanted = f"{version.name}/{version.version}"
        selection = select_records(records, last, wanted)
        if selection is None:
            raise UserError(f"no line of {path} names the model that served it: pass --model-uri "
                            "models:/<name>/<version>, or compare a folder of photos with --photos DIR")
        if not selection.records:
            raise UserError(f"{path} has no requests served by {selection.model} "
                            f"({selection.n_other} lines of other versions)")
        name, _, number = selection.model.rpartition("/")
        if not name or not number.isdigit():
            raise UserError(f"the request log names the model {selection.model!r}, not <name>/<version>: "
                            "pass --model-uri models:/<name>/<version>")
        model = load_model(f"models:/{name}/{number}", classify=False)
        recent = Recent.from_records(selection.records)
        skipped = [f"{n} {what}" for n, what in ((selection.n_other, "of other versions"),
                                                  (selection.n_unknown, "naming no model"),
                                                  (bad, "unreadable")) if n]
        source = (f"the last {len(selection.records)} of {selection.n_model} requests to {model.label} in "
                  f"{_shown(path)}" + (f" (lines skipped: {', '.join(skipped)})" if skipped else ""))
        tags = {"source": "log", "log": str(path), "log_lines_skipped_other_versions": str(selection.n_other),
                "log_lines_unreadable": str(bad)}
    else:
        folder, files = photos
        if not files:
            raise UserError(f"no photos in {folder} (looked for image files in it and its folders)")
        chosen = _newest(files, last)
        model = load_model(choose_model(), classify=True)
        recent = classify_files(model.classifier, chosen)
        source = (f"{len(chosen)} photos in {_shown(folder)}, classified by {model.label}"
                  + (f" (the newest of {len(files)})" if len(chosen) < len(files) else ""))
        tags = {"source": "photos", "photos": str(folder)}
    report = compare(recent, model.reference, seed=seed)
    report = replace(report, context={"model": model.version.uri, "compared": source, **tags})
    tags.update({"model_name": model.version.name, "model_version": model.version.version,
                 "model_uri": model.version.uri, "flag_rate_source": report.flag_rate_source})
    params = {"last": last, "level": LEVEL, "min_requests": MIN_REQUESTS, "permutations": PERMUTATIONS,
              "max_rows": MAX_ROWS, "seed": seed}
    run_id = log_run(report, recent, model.reference, tags, params, run_name=f"{model.label} {tags['source']}",
                     title=f"{model.label}: {report.line().removeprefix('monitor: ')}")
    print(report.line(), flush=True)
    errors = f"; {recent.n_errors} not classified, left out" if recent.n_errors else ""
    from cleanmessy.tracking import server_runs_link

    print(f"compared: {source}{errors}", flush=True)
    print(f"logged: MLflow run {run_id} in experiment {EXPERIMENT} "
          f"({server_runs_link(run_id) or '`cleanmessy ui` shows it'})", flush=True)
    return 1 if fail_on_drift and report.drift else 0
