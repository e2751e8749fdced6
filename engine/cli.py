"""Command-line parsers, built inside functions; options become one frozen `RunConfig`."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Tuple

from engine import __version__
from engine.config import (BACKENDS, FLAT_FIELDS, default_precision, flat_default, DECODE_MODES, INTERPOLATIONS, NAMED_PRESETS, PRECISIONS, SHAPES, ConfigError,
                           Resize, RunConfig, parse_resize, parse_triple, resolve_config)


def default(name: str):
    """A flag's default: its RunConfig section's field default (by the option's flat name,
    engine/config.py FLAT_FIELDS), so no default is written twice."""
    return flat_default(name)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {v}")
    return v


def resize_arg(text: str) -> Resize:
    """`--resize`: "256" (the shorter side) or "256,256" (exactly H,W)."""
    try:
        return parse_resize(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--resize needs ", "needs "))


def add_model_source_args(g) -> None:
    """--model, --weights, --ts, --timm-input-size: what the model is, and so whose preprocessing
    (engine/models/catalog.py); the same on run-eval, run-score, run-bench and make-cache."""
    g.add_argument("--model", default="resnext50_32x4d",
                   help="a torchvision classification model (resnext50_32x4d, vit_b_16, ...) or timm:ARCH.TAG "
                        "(timm/ARCH.TAG too; needs the timm extra); the preprocessing is what its weights declare "
                        "(--list-models shows them) (default: %(default)s)")
    g.add_argument("--weights", metavar="TAG|FILE|TAG=FILE",
                   help="torchvision weights tag (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT, ...: its file from "
                        "torchvision's cache, else downloaded and hash-checked, else random weights with the reason; "
                        "its preprocessing and published figures), a state dict or safetensors file (a torchvision "
                        "file keeps its tag's preprocessing, found by its file name, else the V1 tag's), or "
                        "TAG=FILE (a file with that tag's preprocessing); default: the model's IMAGENET1K_V1 tag "
                        "(timm: the tag in --model, from the Hugging Face Hub cache)")
    g.add_argument("--ts", metavar="FILE",
                   help="a TorchScript model instead of --model/--weights; the preprocessing stored in it by "
                        "export is used (flags still override), else --model's (said in the report)")
    g.add_argument("--timm-input-size", choices=("test", "train"), default="test",
                   help="timm models: the input size and crop_pct timm evaluates at (test, validate.py's "
                        "use_test_size, the size of timm's published results) or the train size (default: test)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and device")
    add_model_source_args(g)
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto (aie if torch_aie imports, else npu if torch_npu imports, else cuda if torch sees "
                        "a GPU, else cpu; the choice is printed with its reason), cpu, sim (simulated "
                        "accelerator), cuda, aie (torch_aie), npu (torch_npu) (default: %(default)s)")
    g.add_argument("--device", type=int, default=default("device"), help="device id for cuda/aie/npu (default: %(default)s)")
    g.add_argument("--devices", metavar="LIST|all", default=default("devices"),
                   help="run on several devices at once, one device process each: ids like 0,1 or 0-7, or all (every "
                        "device the backend reports); batches go to whichever device is free and the report has a "
                        "row per device (docs/devices.md). cpu and sim: name the ids (cpu splits the cores the "
                        "workers leave); overrides --device")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="fp32, fp16 or bf16; auto: fp16 on aie/npu/cuda, fp32 on cpu and sim (default: auto)")
    g.add_argument("--shape", default=default("shape"), choices=SHAPES,
                   help="aie: compile one batch size (static, pads a short last batch) or a range 1..B "
                        "(dynamic) (default: %(default)s)")
    g.add_argument("--soc-version", default=default("soc_version"), help="aie: target chip (default: %(default)s)")
    g.add_argument("--optimization-level", type=int, default=default("optimization_level"), choices=(0, 1, 2),
                   help="aie: 0 none, 1 graph optimisation, 2 operator tuning (slow compile) (default: %(default)s)")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where compiled models are cached (default: $IMAGENET_ENGINE_CACHE or "
                        "~/.cache/imagenet-engine)")
    g.add_argument("--no-cache", action="store_true", help="compile afresh, do not read or write the cache")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="cuda: capture the model as a CUDA graph and replay it (static shape: a short last "
                        "batch is padded)")
    g.add_argument("--sim-batch-ms", type=non_negative_float, default=default("sim_batch_ms"),
                   help="sim: device time per batch in ms (default: %(default)s)")
    g.add_argument("--sim-h2d-gbps", type=non_negative_float, default=default("sim_h2d_gbps"),
                   help="sim: host-to-device copy bandwidth in GB/s, 0 for free copies (default: %(default)s)")


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preprocessing (defaults: --preset, else the --ts file's stored spec, else what the "
                             "weights declare; run-eval --list-models shows them; docs/models.md)")
    g.add_argument("--preset", choices=sorted(NAMED_PRESETS), default=None,
                   help="start from a known script's preprocessing instead of the weights'; every flag below still "
                        "overrides it. modelzoo-acc-eval: Ascend ModelZoo's ResNeXt50 acc_eval.py (Resize([256, 256]) "
                        "bicubic, CenterCrop(224), mean 0.485,0.456,0.06), whose 71.35 %% top-1 this reproduces; the "
                        "report lists what differs from the model's correct preprocessing (docs/modelzoo-reference.md)")
    g.add_argument("--resize", type=resize_arg, metavar="N|H,W",
                   help="N: resize the shorter side to N, keeping the aspect ratio (torchvision's Resize(N)); H,W: "
                        "resize to exactly H x W (Resize((H, W)), the aspect ratio not kept) (preset: 256)")
    g.add_argument("--crop", type=positive_int, help="centre crop size (preset: 224)")
    g.add_argument("--interpolation", choices=INTERPOLATIONS, help="resize filter (preset: bilinear)")
    g.add_argument("--mean", metavar="A,B,C", help="normalisation mean (preset: 0.485,0.456,0.406)")
    g.add_argument("--std", metavar="A,B,C", help="normalisation std (preset: 0.229,0.224,0.225)")
    g.add_argument("--decode", choices=DECODE_MODES, default=None,
                   help="exact (pixels identical to torchvision's transforms, the default) or fast (libjpeg-turbo "
                        "decodes only the window the centre crop's resize reads, at a reduced DCT scale where the "
                        "image is large enough, and resizes it in C: 1.1-1.3x exact per worker here, top-1 agreement "
                        "99.5%% on synthetic images; see docs/profiling.md), or device (--backend cuda: the "
                        "workers send compressed JPEGs and the GPU decodes, resizes and crops them; what the GPU "
                        "decoder is not given, like progressive, grayscale or CMYK files, the workers decode "
                        "exactly; top-1 agreement with exact 100%% on 2,000 synthetic images measured on the CPU "
                        "with torchvision's CPU decoder standing in for nvJPEG, whose own agreement is not yet "
                        "measured; see docs/gpu-decode.md)")
    add_device_decode_args(p)


def share_or_auto(text: str) -> float:
    """A fraction in [0, 1], or "auto" (-1: measured during the run)."""
    if text == "auto":
        return -1.0
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 or auto, got {text!r}")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {v}")
    return v


def add_device_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device decode (--decode device, docs/gpu-decode.md)")
    g.add_argument("--host-decode-share", type=share_or_auto, default=default("host_decode_share"), metavar="FRACTION|auto",
                   help="share of the JPEGs the GPU could decode that the workers decode instead, so neither "
                        "waits for the other; auto: from the measured rates of both (default: auto)")
    g.add_argument("--decode-arena-kib", type=positive_int, default=default("decode_arena_kib"), metavar="KIB",
                   help="compressed bytes per image in a ring slot; a larger file is decoded by the workers "
                        "(default: %(default)s)")
    g.add_argument("--device-resize", choices=("pil", "tensor"), default=default("device_resize"),
                   help="pil: Pillow's fixed-point resampling computed on the GPU for the crop (exact mode's "
                        "pixels from the same decoded image); tensor: torchvision's antialiased float resize "
                        "(within one level of Pillow's) (default: %(default)s)")


def positive_int_or_auto(text: str) -> int:
    """A whole number >= 1, or "auto" (0: resolved by engine.pipeline.autotune before the run)."""
    return 0 if text == "auto" else positive_int(text)


def add_pipeline_args(p: argparse.ArgumentParser, allow_auto: bool = False, title: str = "pipeline",
                      exclude: Tuple[str, ...] = ()) -> None:
    """The pipeline's options (each declared here only); `exclude` leaves out those a command sets
    itself (run-bench: its own --batch-sizes)."""
    g = p.add_argument_group(title)
    number = positive_int_or_auto if allow_auto else positive_int
    auto = "; auto: measured before the run, the choice and its reasons are printed" if allow_auto else ""
    if "batch_size" not in exclude:
        g.add_argument("--batch-size", type=number, default=default("batch_size"), help=f"(default: %(default)s{auto})")
    # "auto" where the command can measure (run-eval); a number always wins
    g.add_argument("--workers", type=number, default="auto" if allow_auto else default("workers"),
                   help=f"decode worker processes (default: %(default)s{auto})")
    g.add_argument("--ring-slots", type=positive_int, default=default("ring_slots"),
                   help="batch slots in shared memory (default: in-flight batches + 2)")
    g.add_argument("--inflight", type=positive_int, default=default("inflight"),
                   help="batches on each device at once (default: %(default)s)")
    g.add_argument("--threads", type=positive_int, default=default("threads"),
                   help="cpu backend: torch threads (default: the cores the workers leave; run-bench's compute "
                        "only: every core)")
    if "compute_only_iters" not in exclude:
        g.add_argument("--compute-only-iters", type=positive_int, default=default("compute_only_iters"),
                       help="model calls timed for the compute-only figure (default: about 2 s worth)")
    add_image_fault_args(g)
    if "progress" not in exclude:
        g.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def add_image_fault_args(g) -> None:
    """`--max-image-pixels` and `--image-timeout`: the same on every command that decodes."""
    g.add_argument("--max-image-pixels", type=positive_int, default=default("max_image_pixels"), metavar="N",
                   help="fail images with more pixels than this as decompression bombs; raise it to score "
                        "huge images (a worker decoding one needs about 5 bytes per pixel: 1.3 GB for "
                        "16000x16000) (default: Pillow's limit, 178956970); the pixel cache is keyed by it")
    g.add_argument("--image-timeout", type=non_negative_float, default=default("image_timeout"), metavar="S",
                   help="a worker stuck this long on one image is killed and the image retried once, then "
                        "failed (default: %(default)s)")


# `--pixel-cache` with no folder: the default one (engine.pipeline.pixelcache.default_pixel_cache_dir)
PIXEL_CACHE_DEFAULT = "<default>"


def add_pixel_cache_args(p: argparse.ArgumentParser) -> None:
    """`--pixel-cache [DIR]` and `--cache-verify`, the same on run-eval, run-score, run-bench --e2e and
    make-cache (docs/pixel-cache.md)."""
    g = p.add_argument_group("pixel cache (docs/pixel-cache.md)")
    g.add_argument("--pixel-cache", nargs="?", const=PIXEL_CACHE_DEFAULT, default=None, metavar="DIR",
                   help="read the exact uint8 crops of earlier runs from this cache instead of decoding, and "
                        "store what is decoded now (write-through); without DIR: "
                        "$IMAGENET_ENGINE_CACHE/pixels (or ~/.cache/imagenet-engine/pixels). "
                        "150,528 bytes per image at 224x224")
    g.add_argument("--cache-verify", action="store_true",
                   help="with --pixel-cache: also key each entry by a hash of the image file's content "
                        "(reads every file; default: its path, size and modification time)")


def pixel_cache_dir(a: argparse.Namespace) -> Optional[str]:
    """The cache folder asked for on the command line, or None."""
    value = getattr(a, "pixel_cache", None)
    if value == PIXEL_CACHE_DEFAULT:
        from engine.pipeline.pixelcache import default_pixel_cache_dir

        return default_pixel_cache_dir()
    return value


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DATA",
                   help="ImageFolder root (DIR/<class>/<image>), a flat folder, a tar of images "
                        "(ILSVRC2012_img_val.tar), WebDataset shards (X.tar, 'val-{000000..000063}.tar', A.tar::B.tar), "
                        "Parquet shards (a folder or 'DIR/validation-*.parquet'), local or s3://... (docs/usage.md)")
    g.add_argument("--labels", metavar="FILE",
                   help="for a flat folder or tar: lines 'FILENAME INDEX' (like val_label.txt), or "
                        "ILSVRC2012_devkit_t12.tar.gz")
    g.add_argument("--limit", type=positive_int,
                   help="only the first N images (folders: file-name order; containers: shard, then file order)")


def preprocess_overrides(a: argparse.Namespace) -> dict:
    """The preprocessing flags given (None where not), to apply over the --preset / --model preset."""
    return {
        "resize": a.resize, "crop": a.crop, "interpolation": a.interpolation, "decode": a.decode,
        "mean": parse_triple(a.mean, "--mean") if a.mean else None,
        "std": parse_triple(a.std, "--std") if a.std else None,
    }


# options whose flag is not named after them, or whose value is not the flag's as given
_NOT_BY_NAME = ("model", "precision", "pixel_cache", "use_cache", "progress", "json_path", "trace_path")


def config_from_args(a: argparse.Namespace, **extra) -> RunConfig:
    """Every option given to a command into one RunConfig: the fields named like their flags taken
    as they are, the preprocessing resolved from --preset / --model with every preprocessing flag
    given, the rest (and a command's own settings) in `extra`. What a command does not take keeps
    the RunConfig default."""
    given = vars(a)
    fields = {f: given[f] for f in FLAT_FIELDS if f in given and f not in _NOT_BY_NAME}
    precision = given.get("precision") or "auto"
    backend = given.get("backend", default("backend"))
    if precision == "auto" and not (backend == "auto" and given.get("devices")):
        # the default precision follows the backend auto will pick; with --devices a device process
        # picks both (engine/backends/__init__.py create_backend), so nothing is probed here
        if backend == "auto":
            from engine.backends import resolve_auto

            backend = resolve_auto(verbose=False)
        precision = default_precision(backend)
    fields.update(precision=precision, use_cache=not given.get("no_cache", False),
                  progress=not given.get("no_progress", False), pixel_cache=pixel_cache_dir(a))
    fields.update(extra)
    return resolve_config(given.get("model", "resnext50_32x4d"), preprocess_overrides(a), preset=given.get("preset"),
                          **fields)


def config_from_args_for_cache(a: argparse.Namespace) -> RunConfig:
    """make-cache's options (no model, no device) into a RunConfig: --pixel-cache defaults to the
    default folder, as `--pixel-cache` without DIR does on run-eval."""
    from engine.pipeline.pixelcache import default_pixel_cache_dir

    return config_from_args(a, backend="cpu", pixel_cache=pixel_cache_dir(a) or default_pixel_cache_dir())


def add_label_args(p: argparse.ArgumentParser) -> None:
    """run-eval's label-set and per-image options (docs/usage.md#label-sets)."""
    from engine.report.labelsets import CLASS_SUBSETS, REAL_PACKAGED

    g = p.add_argument_group("label sets and per-image results (docs/usage.md#label-sets)")
    g.add_argument("--real-labels", nargs="?", const=REAL_PACKAGED, default=default("real_labels"), metavar="FILE",
                   help="also count ReaL top-1/top-5 (the reassessed labels of ImageNet val, found by the "
                        "ILSVRC2012_val_%%08d file names); without FILE: the real.json shipped in the package")
    g.add_argument("--class-subset", choices=CLASS_SUBSETS, default=default("class_subset"),
                   help="which model outputs may win top-k: auto restricts to ImageNet-A's or -R's 200 classes "
                        "when the class folders are exactly one of those lists, else all; present: the classes of "
                        "the run's images; none: all (default: %(default)s)")
    g.add_argument("--class-map", metavar="FILE",
                   help="lines 'FOLDER CLASS' (a class index or an ImageNet wnid): the label of each class folder "
                        "(flat layout: of each label-file index)")
    g.add_argument("--per-image", metavar="PATH",
                   help="write one row per image (id, path, label, top-5, correct@1, correct@5) to PATH.parquet or "
                        "PATH.csv, for bin/compare-runs")


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run-eval", allow_abbrev=False,
        description="Exact ImageNet accuracy (top-1/top-5) with end-to-end and compute-only throughput "
                    "from the same run.")
    add_data_args(p)
    add_model_args(p)
    add_preprocess_args(p)
    add_pipeline_args(p, allow_auto=True)
    add_pixel_cache_args(p)
    add_label_args(p)
    p.add_argument("--json", metavar="PATH", help="write the full report (every figure and the configuration)")
    p.add_argument("--trace", metavar="PATH",
                   help="write a Chrome/Perfetto trace of the run (one track per worker and per device stream); "
                        "open it in ui.perfetto.dev or chrome://tracing")
    p.add_argument("--list-models", nargs="?", const="*", default=None, metavar="PATTERN",
                   help="list the models and weights tags known (torchvision's, and timm's where installed), each "
                        "with its declared preprocessing and published top-1, and exit; PATTERN: a shell pattern "
                        "or a part of the name (timm:* for timm's)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _never_fail_on_file_names(stream) -> None:
    """A file name that is not valid UTF-8 (os.listdir gives it surrogate escapes) must not crash
    the report when it is printed: escape what the stream cannot encode (stderr does so already)."""
    try:
        stream.reconfigure(errors="backslashreplace")
    except (AttributeError, ValueError):
        pass  # not a text stream we can reconfigure (tests may pass a StringIO)


def run_eval_main(argv: Optional[List[str]] = None) -> int:
    from engine.commands import main

    return main("run-eval", _run_eval_command, argv)


def _run_eval_command(argv: Optional[List[str]]) -> int:
    from engine.evaluate import run_eval

    p = eval_parser()
    a = p.parse_args(argv)
    if a.list_models is not None:
        from engine.models.catalog import print_models

        return print_models(a.list_models)
    if not a.data:
        p.error("--data is required")
    _never_fail_on_file_names(sys.stdout)
    cfg = config_from_args(a, json_path=a.json, trace_path=a.trace)
    _, status = run_eval(cfg)
    return status
