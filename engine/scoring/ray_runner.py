"""`run-score --ray`: the pending parts spread over Ray actors, through the same part/done protocol.

    driver: manifest + OUT checked (engine/scoring/job.py) -> pending parts
      -> ray.data.from_items([{"part": p}, ...])            one block per part
      -> map_batches(ScoreActor, batch_size=1, compute=ActorPoolStrategy(size=N),
                     num_gpus=1 | resources={"NPU": 1}, num_cpus=workers + 1)
      -> each result row: a part committed (or found done) by an actor -> progress, summary
    actor: loads OUT/manifest.tsv (hash checked), opens a PartScorer once (model, ring, decode
      workers), then scores part after part; a part already done is skipped.

Ray Data restarts a dead actor and retries its task (max_restarts=-1, max_task_retries=-1 are
its defaults for actor pools). A part is committed atomically and committing it twice writes the
same rows (NOTE [Part commit protocol] in engine/scoring/writer.py), so a retried part, or a part an
actor finished just before it died, still ends up in the output exactly once.

Ray is imported only here, only with --ray. OUT and --data must be reachable at the same paths
from every node (a shared file system), and this package importable there (`pip install .[ray]`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from engine.config import ConfigError, RunConfig
from engine.scoring.manifest import MANIFEST_FILE, load_manifest
from engine.scoring.job import Job, PartScorer, ScoreStats
from engine.scoring.writer import OutputDir


class RayUnavailable(ConfigError):
    """--ray was given but Ray is not installed."""


class ScoreActor:
    """A Ray Data callable class: one local pipeline per actor, scoring whole parts."""

    def __init__(self, cfg: RunConfig, out: str, num_parts: int, fmt: str, meta: Dict, root: str, sha256: str,
                 topk: int, part_size: int):
        from engine.pipeline.containers import is_container_spec

        if cfg.data.path and is_container_spec(cfg.data.path):  # tar / Parquet: the container index again (tar indexes are cached)
            from engine.scoring.manifest import build_manifest

            manifest = build_manifest(cfg.data.path, cfg.data.limit)
        else:
            manifest = load_manifest(os.path.join(out, MANIFEST_FILE), root=root)
        if manifest.sha256 != sha256:
            raise RuntimeError(f"{out}/{MANIFEST_FILE} changed under the run (sha256 {manifest.sha256[:12]}..., "
                               f"expected {sha256[:12]}...)")
        self.out = OutputDir(out, num_parts, fmt)
        labels = None
        if "label" in meta.get("columns", []):  # the rows' label column, as the driver's job has it
            from engine.scoring.summary import manifest_labels

            labels = manifest_labels(cfg.data.path, manifest)
        self.scorer = PartScorer(cfg, manifest, self.out, meta, topk, part_size, labels)
        self.scorer.open()

    def __del__(self):
        # Ray Data drops the UDF on a graceful actor exit: end the decode workers, unlink the ring.
        # A killed actor's ring is unlinked by the next Ring() on that machine (engine/pipeline/ring.py).
        scorer = getattr(self, "scorer", None)
        if scorer is not None:
            self.scorer = None
            scorer.close()

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        parts = [int(p) for p in batch["part"]]
        todo = [p for p in parts if self.out.read_done(p) is None]
        t = time.monotonic()
        stats = self.scorer.score(todo) if todo else ScoreStats()
        by_part = {r["part"]: r for r in stats.records}
        missing = [p for p in todo if p not in by_part]
        if missing:
            raise RuntimeError(f"parts {missing} were scored but not committed")  # Ray retries the task
        seconds = time.monotonic() - t
        return {
            "part": np.array(parts, np.int64),
            "rows": np.array([by_part[p]["rows"] if p in by_part else 0 for p in parts], np.int64),
            "failed": np.array([by_part[p]["failed"] if p in by_part else 0 for p in parts], np.int64),
            "skipped": np.array([p not in by_part for p in parts], bool),
            "seconds": np.full(len(parts), seconds / max(1, len(parts))),
            "writer_s": np.full(len(parts), stats.writer_s / max(1, len(parts))),
            "pid": np.full(len(parts), os.getpid(), np.int64),
        }


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayUnavailable(f"--ray needs Ray Data, which is not installed ({e}): pip install '.[ray]' "
                             "(or pip install 'ray[data]')")
    return ray


def _package_root() -> str:
    # engine/scoring/ray_runner.py -> the folder that holds engine/ and preprocess/
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def actor_resources(cfg: RunConfig) -> Dict:
    """map_batches resources of one actor: its accelerator, and a CPU per decode worker plus its own."""
    res: Dict = {"num_cpus": cfg.pipeline.workers + 1}
    if cfg.backend.name == "cuda":
        res["num_gpus"] = 1
    elif cfg.backend.name in ("npu", "aie"):
        res["resources"] = {"NPU": 1}
    return res


def default_actors(ray, cfg: RunConfig) -> int:
    cluster = ray.cluster_resources()
    key = {"cuda": "GPU", "npu": "NPU", "aie": "NPU"}.get(cfg.backend.name)
    if key is None:
        return 1
    n = int(cluster.get(key, 0))
    if n < 1:
        raise ConfigError(f"--backend {cfg.backend.name} on Ray: the cluster has no {key} resources "
                          f"({', '.join(sorted(cluster)) or 'none'}); start the nodes with them, or give --ray-actors")
    return n


def _reap_local_actors(pids: List[int], timeout: float = 15.0) -> None:
    """After a local cluster's shutdown: wait for its actors to exit, then unlink the rings that
    actors killed outright left in /dev/shm (what the next Ring() on this machine would do)."""
    from engine.pipeline.ring import cleanup_stale
    from engine.procs import pid_alive as _alive

    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in set(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    cleanup_stale()


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def score_ray(job: Job) -> Tuple[ScoreStats, Dict, Optional[int]]:
    """Score the job's pending parts on Ray. Returns (stats, backend description, stop signal)."""
    from engine.report.output import Progress

    cfg, opts = job.cfg, job.opts
    if cfg.backend.name == "auto":
        raise ConfigError("--ray needs an explicit --backend (cuda, npu, aie, cpu or sim): the driver may not "
                          "see the accelerators of the actors")
    ray = _import_ray()
    env = {"PYTHONPATH": os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH")) if p)}
    init: Dict = {"runtime_env": {"env_vars": env}, "logging_level": "WARNING", "include_dashboard": False}
    if opts.ray == "local":
        want = (opts.ray_actors or 1) * (cfg.pipeline.workers + 1) + 1
        init["num_cpus"] = max(os.cpu_count() or 1, want)
    elif opts.ray != "auto":
        init["address"] = opts.ray
    else:
        init["address"] = "auto"
    old_term = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise _Stop(signum)

    stats = ScoreStats()
    stopped: Optional[int] = None
    pids: List[int] = []
    t0 = time.monotonic()
    ray.init(**init)
    try:
        signal.signal(signal.SIGTERM, on_term)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        actors = opts.ray_actors or default_actors(ray, cfg)
        if cfg.pipeline.progress:
            print(f"run-score: Ray ({opts.ray}): {actors} actor(s), {len(job.pending)} part(s)", file=sys.stderr)
        pending = list(job.pending)
        ds = ray.data.from_items([{"part": p} for p in pending], override_num_blocks=len(pending))
        scored = ds.map_batches(
            ScoreActor,
            fn_constructor_kwargs=dict(cfg=cfg, out=job.out.path, num_parts=job.out.num_parts, fmt=job.out.fmt,
                                       meta=job.meta, root=job.manifest.root, sha256=job.manifest.sha256,
                                       topk=opts.topk, part_size=opts.part_size),
            batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            **actor_resources(cfg))
        progress = Progress(job.pending_images(), cfg.pipeline.progress)
        done = 0
        for row in scored.iter_rows():
            part = int(row["part"])
            done += job.part_size_of(part)
            if not row["skipped"]:
                stats.parts_written += 1
                stats.images += int(row["rows"])
                stats.failed += int(row["failed"])
            stats.writer_s += float(row["writer_s"])
            pids.append(int(row["pid"]))
            progress(done, time.monotonic() - t0)
        progress.close()
        stats.records = [{"actor_pids": sorted(set(pids))}]
    except (KeyboardInterrupt, _Stop) as e:
        stopped = e.signum if isinstance(e, _Stop) else signal.SIGINT
        print(f"\n{signal.Signals(stopped).name}: stopping the Ray run", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        ray.shutdown()
        stats.wall_s = time.monotonic() - t0
        if opts.ray == "local":
            _reap_local_actors(pids)
    job.out.remove_stale(job.parts)  # tmp files of actors that died while writing
    info = {"backend": cfg.backend.name, "ray": opts.ray, "actors": opts.ray_actors or None}
    return stats, info, stopped
