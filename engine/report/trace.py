"""`--trace PATH`: the run as a Chrome/Perfetto trace (JSON trace-event format).

Open the file in https://ui.perfetto.dev ("Open trace file") or in Chrome at chrome://tracing
("Load"). Tracks:

    decode workers   one track per worker: its jobs (a chunk of a batch), from the worker's own
                     clock; a gap is a worker waiting for work
    device           "copy (H2D)", "compute (+D2H)" and "reduce (host)": one slice per batch on
                     each; copy and compute are drawn as the device runs them, one after another
                     (a batch queued behind another starts when that one ends)
    scheduler        "waiting for decode": the device idle while a batch is being filled; and
                     "fill" slices per batch, from the parent asking for it to the last chunk in

All times are `time.monotonic()` (one system-wide clock for the parent and the workers), in
microseconds from the first event. The report's figures and verdict ride along in `otherData`.
Worker spans are those the pool kept (its first `max_spans` jobs).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from engine.report.output import write_json

WORKERS_PID, DEVICE_PID, SCHEDULER_PID = 1, 2, 3
COPY_TID, COMPUTE_TID, REDUCE_TID = 1, 2, 3
WAIT_TID, FILL_TID = 1, 2


def _meta(pid: int, tid: Optional[int], name: str, sort: Optional[int] = None) -> List[Dict]:
    kind = "process_name" if tid is None else "thread_name"
    ev = [{"ph": "M", "name": kind, "pid": pid, "tid": tid or 0, "args": {"name": name}}]
    if sort is not None:
        key = "process_sort_index" if tid is None else "thread_sort_index"
        ev.append({"ph": "M", "name": key, "pid": pid, "tid": tid or 0, "args": {"sort_index": sort}})
    return ev


def _serial(spans: List[tuple]) -> List[tuple]:
    """(batch, ready, end) -> (batch, start, end) on an in-order stream: start once the previous ended."""
    out, free = [], float("-inf")
    for batch, ready, end in sorted(spans, key=lambda s: (s[2], s[1])):
        start = min(max(ready, free), end)
        out.append((batch, start, end))
        free = max(free, end)
    return out


def build_trace(batches: Sequence, spans: Sequence, other: Optional[Dict] = None) -> Dict:
    """The trace-event document for a run: `batches` are the scheduler's `BatchTiming`s, `spans`
    the pool's `JobSpan`s."""
    times = [b.fill_submitted for b in batches] + [s.start for s in spans]
    t0 = min(times) if times else 0.0
    us = lambda t: round((t - t0) * 1e6, 3)  # noqa: E731
    events: List[Dict] = []
    events += _meta(WORKERS_PID, None, "decode workers", 1)
    events += _meta(DEVICE_PID, None, "device", 2)
    events += _meta(SCHEDULER_PID, None, "scheduler", 3)
    for wid in sorted({s.worker for s in spans}):
        events += _meta(WORKERS_PID, wid + 1, f"worker {wid}", wid + 1)
    for tid, name in ((COPY_TID, "copy (H2D)"), (COMPUTE_TID, "compute (+D2H)"), (REDUCE_TID, "reduce (host)")):
        events += _meta(DEVICE_PID, tid, name, tid)
    events += _meta(SCHEDULER_PID, WAIT_TID, "waiting for decode", 1)
    events += _meta(SCHEDULER_PID, FILL_TID, "fill", 2)

    def slice_(pid, tid, name, start, end, cat, **args):
        events.append({"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid, "ts": us(start),
                       "dur": round(max(0.0, end - start) * 1e6, 3), "args": args})

    for s in spans:
        slice_(WORKERS_PID, s.worker + 1, f"batch {s.batch_no}", s.start, s.end, "decode",
               batch=s.batch_no, slot=s.slot, images=s.images)
    by_no = {b.batch_no: b for b in batches}
    for no, a, e in _serial([(b.batch_no, b.submitted, b.copied) for b in batches]):
        slice_(DEVICE_PID, COPY_TID, f"copy {no}", a, e, "copy", batch=no, images=by_no[no].images)
    for no, a, e in _serial([(b.batch_no, b.copied, b.done) for b in batches]):
        slice_(DEVICE_PID, COMPUTE_TID, f"compute {no}", a, e, "compute", batch=no, images=by_no[no].images)
    for b in batches:
        slice_(DEVICE_PID, REDUCE_TID, f"reduce {b.batch_no}", b.done, b.reduced, "reduce", batch=b.batch_no)
    for b in sorted(batches, key=lambda b: b.batch_no):
        # fills overlap (several slots fill at once): async slices, one lane each
        common = {"cat": "fill", "pid": SCHEDULER_PID, "tid": FILL_TID, "id": b.batch_no, "name": f"fill {b.batch_no}"}
        events.append(dict(common, ph="b", ts=us(b.fill_submitted), args={"images": b.images}))
        events.append(dict(common, ph="e", ts=us(b.fill_done)))
    for a, e in idle_waiting(batches):
        slice_(SCHEDULER_PID, WAIT_TID, "waiting for decode", a, e, "wait")
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other or {}}


def idle_waiting(batches: Sequence) -> List[tuple]:
    """Intervals with nothing on the device (no batch between submit and reduced) while a fill is
    in progress: the device waiting for the workers."""
    busy = sorted((b.submitted, b.reduced) for b in batches)
    fills = sorted((b.fill_submitted, b.fill_done) for b in batches)
    merged: List[List[float]] = []
    for a, e in busy:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([a, e])
    out = []
    j = 0
    for a, e in fills:  # each fill minus the busy intervals; both sorted, so one pass
        while j < len(merged) and merged[j][1] <= a:
            j += 1
        cur = a
        k = j
        while k < len(merged) and merged[k][0] < e:
            ba, be = merged[k]
            if ba > cur:
                out.append((cur, ba))
            cur = max(cur, be)
            k += 1
        if cur < e:
            out.append((cur, e))
    out.sort()
    dedup: List[tuple] = []
    for a, e in out:  # fills overlap: merge
        if dedup and a <= dedup[-1][1]:
            dedup[-1] = (dedup[-1][0], max(dedup[-1][1], e))
        else:
            dedup.append((a, e))
    return dedup


def write_trace(path: str, batches: Sequence, spans: Sequence, other: Optional[Dict] = None) -> None:
    """Write the trace atomically (see `build_trace`)."""
    write_json(path, build_trace(batches, spans, other), separators=(",", ":"))
