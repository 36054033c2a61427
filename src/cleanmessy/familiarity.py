"""How familiar a photo is to the model: "unlike the photos this model was trained on" as a number.

With two classes, a softmax's confidence only says how far a photo is from the decision boundary:
the default model calls a cat, a chart or a wall of noise clean or messy at 99 %. This module
answers another question, from the model's own features (pure numpy, no I/O):

- **Features.** The model's last convolutional feature map (the last conv block of `seed_cnn`, the
  backbone's output for transfer models), summarised per channel by its mean and its standard
  deviation over the map's positions. Each half is scaled to unit length (`embed`). The means say
  *what* the model sees, the deviations *how it is textured*: the pair tells a synthetic cartoon
  room from a real photo where the penultimate layer of a two-class network cannot (docs/monitoring.md).
- **Score.** The cosine distance from a photo to its k-th nearest training photo (Sun et al., 2022,
  "Out-of-distribution detection with deep nearest neighbors").
- **Calibration.** Leave-one-out over the training photos: each training photo's distance to its
  k-th nearest *other* training photo, a score of a photo the detector has not seen. A new photo's
  `familiarity` is the share of those scores at least as large as its own (a conformal p-value,
  in (0, 1]): 0.4 = as familiar as the 40 % least typical training photos. A photo is `unfamiliar`
  below `alpha` (5 %): by construction about 5 % of photos like the training photos are flagged.
- **Projection.** The features' first principal components, so a served photo can be compared with
  the training photos later (`cleanmessy monitor`) from a few numbers in the request log.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

K = 5  # the k-th nearest training photo
ALPHA = 0.05  # flagged below this familiarity: ~5 % of in-distribution photos
MAX_BANK = 4096  # training photos kept as neighbours (a random subset beyond): bounded size and time
PROJECTION_DIMS = 16  # principal components kept for monitoring
FORMAT = 1  # the saved file's layout


def embed(stats: np.ndarray) -> np.ndarray:
    """(n, 2c) per-channel means then standard deviations -> (n, 2c) features of unit length:
    each half scaled to unit length, their concatenation by 1/sqrt(2)."""
    stats = np.asarray(stats, np.float64)
    half = stats.shape[1] // 2
    parts = [stats[:, :half], stats[:, half:]]
    scaled = [p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) for p in parts]
    return (np.concatenate(scaled, axis=1) / np.sqrt(2.0)).astype(np.float32)


def _kth_distance(bank: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Cosine distance (1 - dot product of unit vectors) from each query to its k-th nearest bank row."""
    out = np.empty(len(queries), np.float64)
    for start in range(0, len(queries), chunk):
        d = 1.0 - queries[start:start + chunk].astype(np.float32) @ bank.T.astype(np.float32)
        out[start:start + chunk] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return np.clip(out, 0.0, 2.0)


@dataclass(frozen=True)
class Familiarity:
    """A fitted detector: the training photos' features, the leave-one-out calibration scores and
    the principal components for monitoring."""

    bank: np.ndarray  # (n, d) unit-length features of (up to MAX_BANK) training photos
    calibration: np.ndarray  # (n,) sorted leave-one-out scores of the bank's photos
    k: int
    alpha: float
    mean: np.ndarray  # (d,) the bank's mean, for the projection
    components: np.ndarray  # (d, p) principal axes

    @property
    def threshold(self) -> float:
        """The score above which a photo is flagged: familiarity(s) < alpha exactly when s is above it."""
        n = len(self.calibration)
        # (1 + m) / (n + 1) < alpha for at most m calibration scores >= s: the largest such m
        most = int(np.ceil(self.alpha * (n + 1) - 1)) - 1
        if most < 0:
            return 2.0  # too few calibration photos to flag anything at this alpha
        return float(self.calibration[max(n - 1 - most, 0)])

    @property
    def min_photos(self) -> int:
        """The fewest calibration photos with which any photo can be flagged at `alpha`:
        familiarity is at least 1 / (n + 1)."""
        return int(np.floor(1 / self.alpha))

    @property
    def can_flag(self) -> bool:
        return 1.0 / (len(self.calibration) + 1) < self.alpha

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Distance to the k-th nearest training photo, for `embed`ded features (n, d)."""
        if not len(features):
            return np.zeros(0)
        return _kth_distance(self.bank, features, self.k)

    def familiarity(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values in (0, 1]: the share of calibration scores at least as large."""
        n = len(self.calibration)
        at_least = n - np.searchsorted(self.calibration, np.asarray(scores, np.float64), side="left")
        return (1.0 + at_least) / (n + 1.0)

    def unfamiliar(self, familiarity: np.ndarray) -> np.ndarray:
        return np.asarray(familiarity) < self.alpha

    def project(self, features: np.ndarray) -> np.ndarray:
        """(n, p) coordinates on the principal axes, for drift tests."""
        return (np.asarray(features, np.float32) - self.mean) @ self.components

    def summary(self) -> dict[str, float]:
        """What the MLflow run records: k, alpha, the flagging threshold, the bank's size."""
        return {"familiarity_k": self.k, "familiarity_alpha": self.alpha,
                "familiarity_threshold": round(self.threshold, 6), "familiarity_bank": len(self.bank)}

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, format=np.int64(FORMAT), bank=self.bank.astype(np.float16),
                            calibration=self.calibration, k=np.int64(self.k), alpha=np.float64(self.alpha),
                            mean=self.mean, components=self.components)
        return buffer.getvalue()

    def save(self, path: Path) -> None:
        path.write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> Familiarity:
        with np.load(path, allow_pickle=False) as f:
            if int(f["format"]) != FORMAT:
                raise ValueError(f"{path.name}: familiarity format {int(f['format'])}, expected {FORMAT}")
            return cls(bank=f["bank"].astype(np.float32), calibration=f["calibration"].astype(np.float64),
                       k=int(f["k"]), alpha=float(f["alpha"]), mean=f["mean"].astype(np.float32),
                       components=f["components"].astype(np.float32))


def fit(features: np.ndarray, k: int = K, alpha: float = ALPHA, max_bank: int = MAX_BANK,
        seed: int = 0) -> Familiarity:
    """A detector of `embed`ded training features (n, d): the neighbours (at most `max_bank`, a
    seeded random subset beyond), each one's leave-one-out score, the principal axes."""
    features = np.asarray(features, np.float32)
    if len(features) > max_bank:
        keep = np.sort(np.random.default_rng(seed).choice(len(features), max_bank, replace=False))
        features = features[keep]
    n = len(features)
    if n < 2:
        raise ValueError(f"a familiarity detector needs at least 2 training photos, got {n}")
    k = max(1, min(k, n - 1))
    bank = features.astype(np.float16).astype(np.float32)  # as saved, so scores here and when loaded agree
    # Leave one out: the (k+1)-th nearest of the bank, the photo itself being the nearest.
    calibration = np.sort(_kth_distance(bank, bank, k + 1))
    mean = bank.mean(axis=0)
    _, _, vt = np.linalg.svd(bank - mean, full_matrices=False)
    components = vt[:PROJECTION_DIMS].T.astype(np.float32)
    return Familiarity(bank=bank, calibration=calibration, k=k, alpha=alpha, mean=mean.astype(np.float32),
                       components=components)


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` telling out-of-distribution (higher) from in-distribution
    photos: the chance that a random OOD photo scores above a random in-distribution one (ties
    count half); None when either side is empty."""
    a, b = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    if not len(a) or not len(b):
        return None
    both = np.concatenate([a, b])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(len(both))
    sorted_values = both[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    rank_sum = ranks[len(a):].sum()
    return float((rank_sum - len(b) * (len(b) + 1) / 2.0) / (len(a) * len(b)))
