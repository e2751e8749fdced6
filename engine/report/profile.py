"""Where the time of a run went, and what bounds it: the stage breakdown and the verdict.

Inputs are what every run records anyway: the scheduler's per-batch timestamps
(`BatchTiming`, parent's `time.monotonic`), the workers' own job spans and busy time (their
`time.monotonic`, the same system-wide clock on Linux), and the compute-only latency measured
before the run. Nothing here touches the hot path.

The wall time is split into disjoint parts, by what the device was doing at each instant
(first match wins):

    compute   a batch between "copied" and "logits on the host": the model and the D2H copy
              (including a batch queued behind the one running: the device was busy)
    copy      a batch between submit and "copied" (H2D), and no batch computing
    reduce    a batch's top-k and counting on the host, and nothing on the device
    decode    nothing on the device while a batch is being filled by the workers: the
              device waits for decoding
    other     none of these (scheduler latency; start and end of the run)

so the parts add up to the wall time, and `other` says how much the accounting misses.
Decode capacity is what the pool could deliver if it never waited: images / busy seconds per
worker, times workers. Device capacity is the compute-only rate. The verdict compares them.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

STAGES = ("compute", "copy", "reduce", "decode", "other")

# the run is "device-bound" when end to end reaches this share of compute-only
DEVICE_BOUND = 0.9
# headroom on the worker count suggested by the verdict and chosen by --workers auto
WORKER_HEADROOM = 1.1


def _intervals(batches) -> Dict[str, List[Tuple[float, float]]]:
    out: Dict[str, List[Tuple[float, float]]] = {s: [] for s in ("compute", "copy", "reduce", "decode")}
    for b in batches:
        out["decode"].append((b.fill_submitted, b.fill_done))
        out["copy"].append((b.submitted, b.copied))
        out["compute"].append((b.copied, b.done))
        out["reduce"].append((b.done, b.reduced))
    return out


def partition(batches, start: float, end: float) -> Dict[str, float]:
    """Seconds of [start, end] spent in each stage (see the module docstring); they sum to end - start.

    A sweep over the interval ends: O(n log n) in the number of batches.
    """
    priority = {s: i for i, s in enumerate(STAGES[:-1])}
    events: List[Tuple[float, int, int]] = []  # (time, +1/-1, stage index)
    for stage, spans in _intervals(batches).items():
        k = priority[stage]
        for a, b in spans:
            a, b = max(a, start), min(b, end)
            if b > a:
                events.append((a, 1, k))
                events.append((b, -1, k))
    events.sort()
    active = [0] * len(priority)
    total = dict.fromkeys(STAGES, 0.0)
    t = start
    for when, delta, k in events:
        if when > t:
            stage = next((STAGES[i] for i, n in enumerate(active) if n > 0), "other")
            total[stage] += when - t
            t = when
        active[k] += delta
    if end > t:
        total["other"] += end - t
    return total


def _mean(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def workers_needed(target_rate: float, per_worker_rate: float, headroom: float = WORKER_HEADROOM) -> int:
    """Workers whose decode capacity covers `target_rate` img/s with some headroom."""
    if per_worker_rate <= 0:
        return 1
    return max(1, math.ceil(round(headroom * target_rate / per_worker_rate, 6)))  # 1.1 * 10 is 11.000000000000002


def breakdown(stats, worker_stats: Sequence[Dict], workers: int, compute_rate: float, images: int,
              decode_mode: str = "exact", backend: str = "", cores: Optional[int] = None, devices: int = 1) -> Dict:
    """The `profile` section of a report: stage partition, per-batch means, capacities, verdict.

    `stats`: the run's `PipelineStats`; `worker_stats`: `WorkerPool.worker_stats()`;
    `compute_rate`: compute-only img/s (0 if not measured; with `devices` > 1, every device's at once,
    summed); `images`: images done (scored + failed).
    """
    batches = list(stats.batches)
    wall = stats.wall_s
    start = min((b.fill_submitted for b in batches), default=0.0)
    parts = partition(batches, start, start + wall) if batches and wall > 0 else dict.fromkeys(STAGES, 0.0)
    busy = sum(w["busy_s"] for w in worker_stats)
    decoded = sum(w["images"] for w in worker_stats)
    per_worker = decoded / busy if busy > 0 else 0.0
    decode_capacity = per_worker * workers
    e2e = images / wall if wall > 0 else 0.0
    n = len(batches)
    per_batch = {
        "batches": n,
        "wait_s": stats.wait_s / n if n else None,  # consumer waiting for a filled slot
        "fill_s": _mean(b.fill_done - b.fill_submitted for b in batches),  # workers filling the slot
        "copy_s": _mean(b.copied - b.submitted for b in batches),
        "compute_s": _mean(b.done - b.copied for b in batches),  # model + D2H (+ queueing)
        "reduce_s": _mean(b.reduced - b.done for b in batches),
        "decode_s": stats.decode_s / images if images else None,  # per image, workers' clocks
    }
    prof = {
        "wall_s": wall,
        "stages_s": parts,
        "stages_share": {k: (v / wall if wall > 0 else 0.0) for k, v in parts.items()},
        "accounted_share": (1.0 - parts["other"] / wall) if wall > 0 else 0.0,
        "per_batch": per_batch,
        "workers": workers,
        "decode_mode": decode_mode,
        "decode_img_per_s_per_worker": per_worker,
        "decode_capacity": decode_capacity,
        "worker_utilisation": busy / (workers * wall) if workers and wall > 0 else 0.0,
        "device_capacity": compute_rate,
        "end_to_end": e2e,
        "ratio": e2e / compute_rate if compute_rate else None,
        "devices": devices,
    }
    prof["bound"], prof["verdict"] = verdict(prof, backend, cores)
    return prof


def verdict(p: Dict, backend: str = "", cores: Optional[int] = None) -> Tuple[str, str]:
    """(bound stage, one line naming it and what to change) from a `breakdown` dict."""
    ratio, dev, cap, w = p["ratio"], p["device_capacity"], p["decode_capacity"], p["workers"]
    shares = p["stages_share"]
    n = p.get("devices", 1)
    takes = "the device takes" if n == 1 else f"the {n} devices take"
    if p["per_batch"]["batches"] < 3 or not dev:
        return "unknown", (f"too short to tell: {p['per_batch']['batches']} batch(es)"
                           if dev else "no compute-only figure to compare with")
    if ratio >= DEVICE_BOUND:
        extra = f"; decode could deliver {cap:,.0f} img/s" if cap else ""
        both = "" if n == 1 else f" ({n} devices, compute-only summed over them running at once)"
        return "device", f"device-bound{both}: end to end is {ratio:.2f} of compute-only{extra}"
    if backend == "cpu":
        return "host", (f"host-bound: the {w} decode worker(s) and the model share the same cores "
                        f"(compute-only {dev:,.0f} img/s was measured with the workers idle); end to end is "
                        f"{ratio:.2f} of it. Fewer workers give the model more threads; --decode fast "
                        f"makes each worker cheaper")
    if cap and cap < dev / DEVICE_BOUND and p["end_to_end"] >= 0.8 * cap:
        need = workers_needed(dev, p["decode_img_per_s_per_worker"])
        line = (f"decode-bound: {w} worker(s) deliver {cap:,.0f} img/s, {takes} {dev:,.0f}; "
                f"about {need} workers would saturate {'it' if n == 1 else 'them'}")
        if cores and need > cores:
            line += f" (this host has {cores} cores"
            line += "; --decode fast decodes faster per worker)" if p["decode_mode"] == "exact" else ")"
        elif p["decode_mode"] == "exact":
            line += " (or --decode fast)"
        return "decode", line
    if shares.get("copy", 0) >= 0.25:
        per = p["per_batch"]["copy_s"] or 0.0
        return "copy", (f"copy-bound: host-to-device copies fill {shares['copy']:.0%} of the wall time with the "
                        f"device idle ({1000 * per:.1f} ms per batch, submit to copied); end to end is "
                        f"{p['end_to_end']:,.0f} img/s, {ratio:.2f} of compute-only, while the workers could deliver "
                        f"{cap:,.0f} (busy {p['worker_utilisation']:.0%}): the backend's submit/copy path is the limit"
                        + (" (it runs in this process, which shares the cores with the workers: try fewer workers)"
                           if cores and w >= cores - 1 else ""))
    if cap and cap < dev / DEVICE_BOUND:
        return "pipeline", (f"pipeline-bound: end to end is {p['end_to_end']:,.0f} img/s, below both the workers' "
                            f"{cap:,.0f} (busy {p['worker_utilisation']:.0%}) and the device's {dev:,.0f}: more "
                            f"batches in flight (--inflight, --ring-slots), or see the trace (--trace)")
    if shares.get("decode", 0) >= 0.1:
        return "pipeline", (f"start-up-bound: the device waited for decoding {shares['decode']:.0%} of the wall time "
                            f"although the workers could deliver {cap:,.0f} img/s against the device's {dev:,.0f}: "
                            f"the first batches are not overlapped; a longer run, or more batches in flight "
                            f"(--inflight, --ring-slots)")
    return "pipeline", (f"pipeline-bound: decode could deliver {cap:,.0f} img/s and the device {dev:,.0f}, but end "
                        f"to end is {p['end_to_end']:,.0f} ({ratio:.2f} of compute-only); more batches in flight "
                        f"(--inflight, --ring-slots) or a longer run")


def format_breakdown(p: Dict) -> List[str]:
    """The breakdown lines of run-eval's table."""
    s, wall = p["stages_s"], p["wall_s"]
    pct = (lambda k: f"{100 * s[k] / wall:.0f}%") if wall > 0 else (lambda k: "-")
    pb = p["per_batch"]
    ms = lambda v: "-" if v is None else f"{1000 * v:.1f}"  # noqa: E731
    return [
        f"  stages        {wall:.2f} s of wall time: device computing {pct('compute')}, copying {pct('copy')}, "
        f"reducing "
        f"{pct('reduce')}, waiting for decode {pct('decode')}, other {pct('other')}",
        f"  per batch     fill {ms(pb['fill_s'])} ms | wait for a filled slot {ms(pb['wait_s'])} ms | copy "
        f"{ms(pb['copy_s'])} ms | compute+D2H {ms(pb['compute_s'])} ms | reduce {ms(pb['reduce_s'])} ms "
        f"({pb['batches']} batches)",
        f"  capacity      decode {p['decode_capacity']:,.0f} img/s ({p['workers']} worker(s) x "
        f"{p['decode_img_per_s_per_worker']:,.0f} img/s while busy, busy {p['worker_utilisation']:.0%} of the wall, "
        f"{p['decode_mode']} decode) | device {p['device_capacity']:,.0f} img/s (compute only)",
        f"  verdict       {p['verdict']}",
    ]


def with_pixel_cache(p: Dict, pc: Optional[Dict]) -> Dict:
    """`--pixel-cache`: where the run's images came from, in the breakdown `p` (in place; returned).
    When the cache fed every image, the workers' capacity (0: nothing was decoded) says nothing
    about the host's side, so a verdict that is not device-bound names the cache as the source."""
    if not pc:
        return p
    hits, decoded = pc.get("hits", 0), pc.get("decoded", 0)
    p["pixel_cache"] = {"hits": hits, "decoded": decoded}
    if hits and not decoded and p.get("bound") not in ("device", "unknown"):
        shares = p["stages_share"]
        p["bound"] = "copy" if shares.get("copy", 0) >= 0.25 else "pipeline"
        p["verdict"] = (f"{p['bound']}-bound, fed by the pixel cache (all {hits:,} images read, none decoded): end to "
                        f"end is {p['end_to_end']:,.0f} img/s, {p['ratio']:.2f} of compute-only, with copies "
                        f"{shares.get('copy', 0):.0%} of the wall time; the backend's submit/copy path or the batches "
                        f"in flight (--inflight, --ring-slots) are the limit, not decoding")
    return p


def with_device_decode(p: Dict, dd: Optional[Dict]) -> Dict:
    """`--decode device`: the GPU decoder as a stage of the breakdown `p` (in place; returned).

    `dd` is the backend's DecodeMeter report (engine/backends/decodestage.py). The decode happens
    between submit and copied, so the breakdown's "copy" stage holds it; its capacity is the
    images the device decoded per second of decode-stream time, over the share of images it took
    (the workers decode the rest). When that capacity is below the device's and end to end is
    short of compute-only, the verdict names the device decoder instead of the copy."""
    if not dd:
        return p
    rate = dd.get("device_decode_img_per_s")
    total = dd["device_images"] + dd["host_images"]
    frac = dd["device_images"] / total if total else 0.0
    capacity = rate / frac if rate and frac else None
    share = (dd.get("host_share") or {}).get("share")
    p["device_decode"] = {"img_per_s": rate, "device_fraction": frac, "capacity": capacity, "host_share": share}
    dev, ratio = p["device_capacity"], p["ratio"]
    if capacity and dev and ratio is not None and ratio < DEVICE_BOUND and p["per_batch"]["batches"] >= 3 \
            and capacity < dev / DEVICE_BOUND:
        p["bound"] = "device-decode"
        p["verdict"] = (f"device-decode-bound: the GPU decoder takes {rate:,.0f} img/s of decode-stream time for "
                        f"the {frac:.0%} of images it decodes ({capacity:,.0f} img/s in all), the model "
                        f"{dev:,.0f}; end to end is {ratio:.2f} of compute-only. A larger host share "
                        f"(--host-decode-share, now {share if share is not None else 'auto'}) or more workers "
                        f"move decoding to the host")
    return p
