"""engine/report/stats.py against direct formulas and scipy (the engine itself needs no scipy):
Wilson intervals, NLL, ECE with its reliability table, the confused pairs, McNemar's exact test,
and the same figures in a run-eval report, computed from its own per-image rows."""

import math
import os

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is a test dependency (requirements-test.txt)")
from scipy.special import log_softmax as scipy_log_softmax  # noqa: E402

from engine.report.stats import (RunStats, binom_log_p_two_sided, binom_tail_two_sided, mcnemar,  # noqa: E402
                                 paired_difference, wilson)


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (38, 50), (38_500, 50_000),
                                  (7, 1_000_003)])
def test_wilson_equals_scipy(k, n):
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson(k, n)
    assert low == pytest.approx(100 * ci.low, abs=1e-9)
    assert high == pytest.approx(100 * ci.high, abs=1e-9)


def test_wilson_at_77_percent_of_50000_is_about_037_points():
    low, high = wilson(38_500, 50_000)
    assert (high - low) / 2 == pytest.approx(0.369, abs=0.002)
    assert wilson(0, 0) is None


@pytest.mark.parametrize("b, c", [(0, 0), (0, 1), (1, 0), (3, 7), (5, 5), (6, 5), (40, 22), (120, 80),
                                  (866, 1000), (2_000, 2_210), (12_345, 12_655)])
def test_mcnemar_equals_scipy_binomtest(b, c):
    expected = scipy_stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert mcnemar(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert binom_tail_two_sided(b, b + c) == mcnemar(b, c)


def test_mcnemar_log_p_where_the_float_underflows():
    """4,000 against 866 discordant images: p is below 1e-300; its log is still exact."""
    lp = binom_log_p_two_sided(866, 4866)
    from scipy.special import logsumexp

    expected = math.log(2) + logsumexp(scipy_stats.binom.logpmf(np.arange(867), 4866, 0.5))
    assert lp == pytest.approx(expected, rel=1e-9)
    assert mcnemar(866, 4000) == 0.0 or mcnemar(866, 4000) < 1e-300
    with pytest.raises(ValueError):
        binom_log_p_two_sided(5, 3)


def test_paired_difference_interval():
    d = paired_difference(b=120, c=80, n=1000)
    assert d["points"] == pytest.approx(4.0)
    # the Wald interval of paired proportions, written out
    p10, p01, n = 0.12, 0.08, 1000
    se = math.sqrt((p10 + p01 - (p10 - p01) ** 2) / n)
    assert d["interval"] == pytest.approx([100 * (0.04 - 1.959963984540054 * se), 100 * (0.04 + 1.959963984540054 * se)])


def _direct(logits, labels, bins=15):
    """NLL, ECE and reliability written out from their definitions, one image at a time."""
    lsm = scipy_log_softmax(logits.astype(np.float64), axis=1)
    nll = float(np.mean([-lsm[i, labels[i]] for i in range(len(labels))]))
    pred = np.argmax(logits, axis=1)
    conf = np.exp(lsm[np.arange(len(labels)), pred])
    table = []
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(len(labels)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if members:
            acc = np.mean([pred[i] == labels[i] for i in members])
            avg = np.mean([conf[i] for i in members])
            ece += len(members) / len(labels) * abs(acc - avg)
            table.append((len(members), avg, acc))
        else:
            table.append((0, None, None))
    return nll, 100 * ece, table


@pytest.mark.parametrize("seed, scale", [(0, 1.0), (1, 4.0), (2, 0.2)])
def test_nll_and_ece_equal_direct_formulas_batch_by_batch(seed, scale):
    rng = np.random.default_rng(seed)
    n, c = 500, 37
    labels = rng.integers(0, c, n)
    logits = (rng.normal(size=(n, c)) * scale).astype(np.float32)
    logits[np.arange(n), labels] += rng.random(n).astype(np.float32) * 3 * scale  # right often enough
    st = RunStats(c)
    for lo in range(0, n, 64):  # batch by batch, as the reduce step does
        sl = slice(lo, lo + 64)
        st.update(logits[sl], labels[sl], np.argmax(logits[sl], axis=1))
    nll, ece, table = _direct(logits, labels)
    assert st.images == n
    # the exponentials are float32 (engine/report/stats.py logsumexp_rows): 1e-6 relative
    assert st.nll() == pytest.approx(nll, rel=1e-6)
    assert st.ece() == pytest.approx(ece, rel=1e-5, abs=1e-9)
    rel = st.reliability()
    assert sum(r["images"] for r in rel) == n
    for r, (count, avg, acc) in zip(rel, table):
        assert r["images"] == count
        if count:
            assert r["confidence"] == pytest.approx(avg) and r["accuracy"] == pytest.approx(acc)


@pytest.mark.parametrize("seed", range(4))
def test_top5_equals_topk_indices_with_ties_and_masks(seed):
    """The fast top-5 of the reduce step has the counts' order: best first, ties to the lower index,
    also where few outputs are left by a class mask."""
    from engine.report.metrics import topk_indices
    from engine.report.stats import top5

    rng = np.random.default_rng(seed)
    logits = rng.integers(0, 4, (300, 50)).astype(np.float32)  # many ties
    logits[:40, 3:] = -np.inf  # three classes left
    logits[40:80, ::2] = -np.inf
    logits[80:90] = 0.0  # all equal
    assert (top5(logits) == topk_indices(logits, 5)).all()
    wide = rng.normal(size=(64, 1000)).astype(np.float16)
    assert (top5(wide) == topk_indices(wide.astype(np.float32), 5)).all()


def test_confused_pairs_and_masked_labels():
    names = [f"c{i}" for i in range(6)]
    st = RunStats(6)
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 5])
    top1 = np.array([1, 1, 2, 0, 1, 2, 4, 4, 5])
    logits = np.full((9, 6), -1.0, np.float32)
    logits[np.arange(9), top1] = 2.0
    st.update(logits, labels, top1)
    pairs = st.top_confusions(names)
    assert [(p["label"], p["predicted"], p["images"]) for p in pairs] == [(0, 1, 2), (3, 4, 2), (0, 2, 1), (1, 0, 1)]
    assert pairs[0]["label_name"] == "c0" and pairs[0]["predicted_name"] == "c1"
    # a label outside a class subset has probability 0: the mean NLL is infinite, said so
    masked = logits.copy()
    masked[:, 5] = -np.inf
    st2 = RunStats(6)
    st2.update(masked, labels, top1)
    assert st2.nll() == math.inf and st2.nll_infinite == 1
    assert st2.report({1: 3, 5: 9}, 9, names)["nll"] is None


def test_run_eval_statistics_agree_with_its_per_image_rows(folder_set, tmp_path):
    """The report's intervals are those of its integer counts, and its ECE/NLL are those of the
    logits the per-image file shows (top-5 probabilities), for a run with a short last batch."""
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    import torch

    from engine.config import resolve_config
    from engine.evaluate import run_eval

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 1000)).eval()
    ts = str(tmp_path / "tiny.ts")
    torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(ts)
    per = str(tmp_path / "rows.parquet")
    cfg = resolve_config("resnet18", {"resize": 40, "crop": 32}, data=folder_set, ts=ts, backend="cpu",
                         batch_size=7, workers=1, progress=False, compute_only_iters=1, per_image=per)
    report, status = run_eval(cfg, out=open(os.devnull, "w"))
    assert status == 0
    st = report["statistics"]
    assert st["interval_top1"] == pytest.approx(wilson(report["correct_top1"], report["images"]))
    assert st["interval_top5"] == pytest.approx(wilson(report["correct_top5"], report["images"]))
    rows = pq.read_table(per).to_pydict()
    assert len(rows["id"]) == report["images"] == 120
    conf = np.array([p[0] for p in rows["topk_prob"]], np.float64)
    right = np.array(rows["correct_top1"], bool)
    assert right.sum() == report["correct_top1"] and np.array(rows["correct_top5"]).sum() == report["correct_top5"]
    b = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    ece = sum(abs(right[b == k].mean() - conf[b == k].mean()) * (b == k).sum() for k in range(15) if (b == k).any())
    assert st["ece"] == pytest.approx(100 * ece / len(conf), rel=1e-5)
    assert sum(r["images"] for r in st["reliability"]) == 120
    wrong = sum(p["images"] for p in st["confused_pairs"])
    assert 0 < wrong <= 120 - report["correct_top1"]
