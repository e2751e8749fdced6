"""Statistics of a run beside its exact counts: Wilson intervals, mean negative log-likelihood,
expected calibration error, the most-confused class pairs, and McNemar's exact test for two runs.

Everything is accumulated batch by batch from the logits the run already has (no second pass),
over the scored images only. Numpy and the standard library only: scipy is a test dependency
(the tests check these against scipy.stats), not the engine's.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal
ECE_BINS = 15
TOP_CONFUSIONS = 10


def wilson(correct: int, n: int, z: float = Z95) -> Optional[List[float]]:
    """Wilson score interval of `correct` of `n`, in percent ([low, high]); None when n is 0."""
    if n <= 0:
        return None
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64; -inf logits (outputs masked off) stay -inf."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        shifted = x - top
        return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def logsumexp_rows(logits: np.ndarray) -> np.ndarray:
    """float64 [n]: log(sum(exp(row))) per row. The exponentials are float32 (25x faster than
    float64 here, relative error ~1e-7), their sums float64; -inf logits add nothing."""
    x = np.asarray(logits, dtype=np.float32)
    top = x.max(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.exp(x - top[:, None]).sum(axis=1, dtype=np.float64)
    return top.astype(np.float64) + np.log(total)


def top5(logits: np.ndarray, k: int = 5) -> np.ndarray:
    """The k best classes per row, best first, ties to the lower index: the order of
    engine.report.metrics.topk_indices, by k argmax passes (a partition is 20x slower here).
    Rows with fewer than k finite logits go through topk_indices."""
    from engine.report.metrics import topk_indices

    x = np.array(logits, dtype=np.promote_types(np.asarray(logits).dtype, np.float32), copy=True)
    n, c = x.shape
    k = min(k, c)
    rows = np.arange(n)
    out = np.empty((n, k), np.int64)
    short = np.zeros(n, bool)
    for j in range(k):
        best = np.argmax(x, axis=1)  # the first of equal maxima: the lower index
        out[:, j] = best
        short |= ~(x[rows, best] > -np.inf)  # -inf (or NaN) picked: not k finite ones
        x[rows, best] = -np.inf
    if short.any():
        out[short] = topk_indices(np.asarray(logits)[short], k)
    return out


def binom_log_p_two_sided(k: int, n: int) -> float:
    """Natural log of the two-sided p-value of `k` successes in `n` fair coin flips,
    min(1, 2 P(X <= min(k, n-k))), kept as a log because it underflows a float for large n.

    For p = 1/2 this equals the two-sided exact binomial test (the distribution is symmetric), so
    McNemar's exact test on b and c discordant pairs is this with k = b, n = b + c."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    m = min(k, n - k)
    if n == 0 or 2 * m == n:
        return 0.0
    # log C(n, j) - n log 2 for j = 0..m, summed in log space (n can be tens of thousands)
    logs = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in range(m + 1)])
    logs -= n * math.log(2.0)
    top = float(logs.max())
    log_tail = top + math.log(float(np.sum(np.exp(logs - top))))
    return min(0.0, math.log(2.0) + log_tail)


def binom_tail_two_sided(k: int, n: int) -> float:
    """The p-value of `binom_log_p_two_sided` (0.0 where it underflows)."""
    return math.exp(binom_log_p_two_sided(k, n))


def mcnemar(b: int, c: int) -> float:
    """McNemar's exact p-value for `b` pairs right in one run only and `c` in the other only."""
    return binom_tail_two_sided(b, b + c)


def paired_difference(b: int, c: int, n: int, z: float = Z95) -> Dict:
    """B's top-1 minus A's in points over `n` paired images, where `b` images are right in B only
    and `c` in A only; with its Wald interval for paired proportions."""
    if n <= 0:
        return {"points": 0.0, "interval": None}
    d = (b - c) / n
    var = max(0.0, (b + c) / n - d * d) / n
    half = z * math.sqrt(var)
    return {"points": 100.0 * d, "interval": [100.0 * (d - half), 100.0 * (d + half)]}


class RunStats:
    """NLL sum, ECE bins and confusion counts, updated per batch of scored images."""

    def __init__(self, num_classes: int, bins: int = ECE_BINS):
        self.num_classes = num_classes
        self.bins = bins
        self.images = 0
        self.nll_sum = 0.0
        self.nll_infinite = 0  # images whose label was masked off (probability 0)
        self.bin_count = np.zeros(bins, np.int64)
        self.bin_conf = np.zeros(bins, np.float64)
        self.bin_correct = np.zeros(bins, np.int64)
        self.confusions: Dict[int, int] = {}  # label * num_classes + predicted -> count

    def update(self, logits: np.ndarray, labels: np.ndarray, top1: np.ndarray,
               lse: Optional[np.ndarray] = None) -> None:
        """One batch: `logits` [n, C] (masked ones -inf), `labels` [n], `top1` [n] (the predicted
        class, ties to the lower index as the counts), `lse` their `logsumexp_rows` if known."""
        n = len(labels)
        if n == 0:
            return
        if lse is None:
            lse = logsumexp_rows(logits)
        rows = np.arange(n)
        own = np.asarray(logits[rows, labels], np.float64) - lse  # log-probability of the label
        finite = np.isfinite(own)
        self.nll_sum += float(-own[finite].sum())
        self.nll_infinite += int((~finite).sum())
        self.images += n
        conf = np.exp(np.asarray(logits[rows, top1], np.float64) - lse)
        right = top1 == labels
        # bin b holds confidences in (b/B, (b+1)/B]; 0 goes into the first
        b = np.clip(np.ceil(conf * self.bins).astype(np.int64) - 1, 0, self.bins - 1)
        self.bin_count += np.bincount(b, minlength=self.bins)
        self.bin_conf += np.bincount(b, weights=conf, minlength=self.bins)
        self.bin_correct += np.bincount(b[right], minlength=self.bins)
        wrong = ~right
        if wrong.any():
            keys, counts = np.unique(labels[wrong].astype(np.int64) * self.num_classes + top1[wrong], return_counts=True)
            for key, count in zip(keys.tolist(), counts.tolist()):
                self.confusions[key] = self.confusions.get(key, 0) + count

    def ece(self) -> float:
        """Expected calibration error in percent: sum over bins of n_b/N |accuracy_b - confidence_b|."""
        if not self.images:
            return 0.0
        nz = self.bin_count > 0
        gap = np.abs(self.bin_correct[nz] / self.bin_count[nz] - self.bin_conf[nz] / self.bin_count[nz])
        return 100.0 * float(np.sum(self.bin_count[nz] * gap) / self.images)

    def nll(self) -> Optional[float]:
        """Mean negative log-likelihood (nats) of the label; inf if a label was masked off."""
        if not self.images:
            return None
        if self.nll_infinite:
            return math.inf
        return self.nll_sum / self.images

    def reliability(self) -> List[Dict]:
        out = []
        for b in range(self.bins):
            n = int(self.bin_count[b])
            out.append({"low": b / self.bins, "high": (b + 1) / self.bins, "images": n,
                        "confidence": float(self.bin_conf[b] / n) if n else None,
                        "accuracy": float(self.bin_correct[b] / n) if n else None})
        return out

    def top_confusions(self, class_names: Sequence[str], top: int = TOP_CONFUSIONS) -> List[Dict]:
        """The `top` most frequent (label, predicted) pairs among wrong top-1s; ties by class index."""
        pairs = sorted(self.confusions.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        out = []
        for key, count in pairs:
            label, pred = divmod(key, self.num_classes)
            out.append({"label": label, "label_name": _name(class_names, label), "predicted": pred,
                        "predicted_name": _name(class_names, pred), "images": count})
        return out

    def report(self, correct: Dict[int, int], images: int, class_names: Sequence[str]) -> Dict:
        nll = self.nll()
        return {
            "interval_top1": wilson(correct.get(1, 0), images),
            "interval_top5": wilson(correct.get(5, 0), images),
            "interval": "Wilson score, 95 %",
            "nll": None if nll is None or math.isinf(nll) else nll,
            "nll_infinite_images": self.nll_infinite,
            "ece": self.ece(),
            "ece_bins": self.bins,
            "reliability": self.reliability(),
            "confused_pairs": self.top_confusions(class_names),
        }


def _name(names: Sequence[str], i: int) -> str:
    return names[i] if 0 <= i < len(names) else str(i)


def format_interval(iv: Optional[Sequence[float]]) -> str:
    return "[-]" if not iv else f"[{iv[0]:.2f}, {iv[1]:.2f}]"
