"""Reports: a human table on stdout, progress on stderr, and a JSON file with every figure."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Dict, Optional, TextIO


def _fmt_rate(x: Optional[float]) -> str:
    return "-" if not x else f"{x:,.1f} img/s"


class Progress:
    """Live images and img/s on stderr: a rewritten line on a terminal, a line every few s otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream: Optional[TextIO] = None, label: str = "scored"):
        stream = stream if stream is not None else sys.stderr  # looked up now: tests swap sys.stderr
        self.total, self.enabled, self.stream, self.label = total, enabled, stream, label
        self.tty = stream.isatty()
        self._last = 0.0

    def __call__(self, done: int, elapsed: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < self.total and now - self._last < (0.5 if self.tty else 5.0):
            return
        self._last = now
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = f"{self.label} {done:,}/{self.total:,} images  {rate:,.1f} img/s  eta {eta:,.0f} s"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def environment() -> Dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import PIL

        info["pillow"] = PIL.__version__
    except ImportError:
        pass
    for mod in ("torch", "torchvision", "numpy"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    return info


def format_eval(report: Dict, max_failures: int = 20) -> str:
    """The human summary of an evaluation report."""
    cfg, tp, st, be = report["config"], report["throughput"], report["stages"], report["backend"]
    spec = cfg["preprocess"]
    if be.get("source") == "torchscript":
        weights = f"TorchScript, preprocessing of {be.get('preset', cfg['model']['name'])}"
    else:
        weights = be.get("weights") or be.get("source", "?")
    lines = []
    title = "PARTIAL " if report.get("partial") else ""
    lines.append(f"{title}ImageNet evaluation: {report.get('model') or cfg['model']['name']} ({weights}) on {be.get('backend')}"
                 f" [{be.get('device', '')}], batch {cfg['pipeline']['batch_size']}, {cfg['pipeline']['workers']} worker(s), "
                 f"{spec['decode']} decode, resize {spec['resize']} crop {spec['crop']} {spec['interpolation']}")
    total = report["images"] + report["failed"]
    lines.append(f"  images        {report['images']:,} scored, {report['failed']:,} failed"
                 f" (of {report['dataset_images']:,} in the set{', stopped early' if report.get('partial') else ''})")
    lines.append(f"  top-1         {report['top1']:.3f} %  ({report['correct_top1']:,} / {report['images']:,})")
    lines.append(f"  top-5         {report['top5']:.3f} %  ({report['correct_top5']:,} / {report['images']:,})")
    if report.get("statistics"):  # intervals, NLL, ECE; the label set (engine/report/analysis.py)
        from engine.report.analysis import format_analysis

        lines.extend(format_analysis(report))
    lines.append(f"  end to end    {_fmt_rate(tp['end_to_end'])}  ({total:,} images in {st['wall_s']:.2f} s)")
    lines.append(f"  compute only  {_fmt_rate(tp['compute_only'])}  (batch {cfg['pipeline']['batch_size']}, input on the device,"
                 f" {tp.get('compute_only_iterations', 0)} calls)")
    if tp.get("ratio"):
        lines.append(f"  ratio         {tp['ratio']:.3f}  (end to end / compute only)")
    if report.get("profile"):  # stage partition, capacities and verdict (engine/report/profile.py)
        from engine.report.profile import format_breakdown

        lines.extend(format_breakdown(report["profile"]))
    else:
        lines.append(f"  stages        waiting for decoded batches {st['wait_s']:.2f} s | copy {st['copy_s']:.2f} s"
                     f" | compute+D2H {st['compute_s']:.2f} s | reduce {st['reduce_s']:.3f} s (sums over batches)")
        lines.append(f"  decode        {st['decode_s']:.2f} s of worker time, {st['decode_img_per_s_per_worker']:,.1f}"
                     f" img/s per busy worker, loop {report['loop']}")
    if report.get("decoder"):
        lines.append(f"  decoder       {report['decoder']}")
    dd = report.get("device_decode")
    if dd:  # --decode device: the GPU decoder as a stage (engine/backends/decodestage.py DecodeMeter)
        rate = dd.get("device_decode_img_per_s")
        share = (dd.get("host_share") or {}).get("share")
        lines.append(f"  device decode {dd['device_images']} images on the device"
                     + (f" ({rate:,.0f} img/s of decode-stream time)" if rate else "")
                     + f", {dd['host_images']} by the workers"
                     + (f"; host share of device JPEGs {share:.2f}" if share is not None else ""))
    for name, choice in (report.get("autotune") or {}).items():
        lines.append(f"  auto          --{name.replace('_', '-')} {choice['value']}: {choice['reason']}")
    if report["failed"]:
        lines.append(f"  failed images ({report['failed']}):")
        for f in report["failures"][:max_failures]:
            lines.append(f"    {f['path']}: {f['reason']}")
        if report["failed"] > max_failures:
            lines.append(f"    ... and {report['failed'] - max_failures} more (all in --json)")
    return "\n".join(lines)


def write_json(path: str, report: Dict, **dump_options) -> None:
    """Write atomically: a report is never half-written. `dump_options` go to `json.dump`
    (default: `indent=1`)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, **(dump_options or {"indent": 1}))
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)  # a full disk leaves no half-written temporary behind
        except OSError:
            pass
        raise
