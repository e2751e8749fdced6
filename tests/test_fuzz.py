"""Property-based fuzzing (hypothesis) of the two parsers that read untrusted input:

- bytes -> pixels (`preprocess_into`, the workers' hot path): any input gives pixels or a
  `DecodeError`, which the worker turns into a failed image. Any other exception would escape
  to the worker's "bug" path and stop the whole run; a hang would stall it until the watchdog.
- the label file (`read_label_file`, and `build_dataset` over it): any input gives an index or a
  `DatasetError` with a message, never a traceback.

The suite runs a short, deterministic pass. A longer, randomised run, for by hand:

    IMAGENET_ENGINE_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q -p no:cacheprovider \\
        --timeout=0 tests/test_fuzz.py

(failures are saved in .hypothesis/ and replayed first on the next run).
"""

import io
import os
import signal
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.pipeline.dataset import DatasetError, build_dataset, read_label_file
from preprocess.decode import DecodeError, preprocess_into

# Pillow warns about corrupt metadata (EXIF, TIFF tags) in files it still decodes; workers ignore those
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LONG = int(os.environ.get("IMAGENET_ENGINE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=LONG or 120,
    deadline=None,  # one slow example on a busy machine is not a failure; a hang is (see _no_hang)
    derandomize=not LONG,  # the suite's run is the same every time; a long run explores
    database=None if not LONG else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HANG_S = 10  # no example may take this long
MAX_PIXELS = 4_000_000  # keeps a mutated header from costing seconds; the real limit is tested elsewhere


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _seeds():
    """Small valid files of every format ImageNet-like data might hold, to mutate."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
    return [
        _encode(rgb, "JPEG", quality=80),
        # big enough that fast mode decodes it at a reduced DCT scale for the fuzz's resize of 32
        _encode(Image.fromarray(rng.integers(0, 256, (520, 600, 3), dtype=np.uint8)), "JPEG", quality=85),
        _encode(rgb, "JPEG", quality=60, progressive=True),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb.convert("L"), "JPEG"),
        _encode(rgb, "PNG"),
        _encode(rgb.convert("P"), "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(Image.fromarray(rng.integers(0, 65536, (20, 17), dtype=np.uint16)), "PNG"),
        _encode(rgb, "GIF"),
        _encode(rgb, "BMP"),
        _encode(rgb, "TIFF"),
        _encode(rgb, "WEBP", quality=70),
        _encode(rgb, "PPM"),
    ]


SEEDS = _seeds()


@st.composite
def mutated_files(draw):
    """A seed file with a few of: byte flips, overwritten runs, truncation, spliced junk."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        op = draw(st.sampled_from(("flip", "set", "truncate", "insert", "delete", "header")))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            run = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(run)] = run
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        else:  # headers hold sizes and counts: the likeliest place for trouble
            h = draw(st.integers(0, min(63, max(0, len(data) - 1))))
            data[h:h + 2] = draw(st.binary(min_size=2, max_size=2))
    return bytes(data)


class _Hang(Exception):
    pass


def _no_hang(fn, *args):
    """Run fn(*args) under an alarm: a hang fails the example instead of stalling the suite."""
    def alarm(signum, frame):
        raise _Hang(f"no result within {HANG_S} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _pixels_or_decode_error(data, mode="exact"):
    out = np.full((24, 24, 3), 7, np.uint8)
    try:
        _no_hang(preprocess_into, data, out, 32, "bilinear", mode, MAX_PIXELS)
    except DecodeError as e:
        assert str(e) and isinstance(e.reason, str)  # a reason for the report
        return None
    return out


@pytest.mark.parametrize("mode", ["exact", "fast"])
@FUZZ
@given(data=mutated_files())
def test_mutated_images_give_pixels_or_a_decode_error(mode, data):
    _pixels_or_decode_error(data, mode)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_give_pixels_or_a_decode_error(mode, data):
    _pixels_or_decode_error(data, mode)


@FUZZ
@given(head=st.sampled_from([s[:16] for s in SEEDS]), rest=st.binary(max_size=512))
def test_a_valid_magic_number_then_junk_gives_a_decode_error_or_pixels(head, rest):
    _pixels_or_decode_error(head + rest)


def test_the_seeds_themselves_decode():
    for data in SEEDS:
        assert _pixels_or_decode_error(data) is not None


# -- the label file ------------------------------------------------------------------------------

_name_chars = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs"))
names = st.text(_name_chars, min_size=1, max_size=20).filter(lambda n: not n.startswith("#") and n.strip() == n)


def _parse(content: bytes):
    with tempfile.NamedTemporaryFile(suffix=".txt") as f:
        f.write(content)
        f.flush()
        return _no_hang(read_label_file, f.name)


@FUZZ
@given(content=st.binary(max_size=1024) | st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_label_file_gives_entries_or_a_dataset_error(content):
    try:
        entries = _parse(content)
    except DatasetError as e:
        assert str(e).startswith("--labels ")  # names the file; one line for the user
        return
    assert entries and all(isinstance(n, str) and n and isinstance(i, int) and i >= 0 for n, i in entries)


@FUZZ
@given(entries=st.lists(st.tuples(names, st.integers(0, 999)), min_size=1, max_size=12),
       noise=st.lists(st.sampled_from(["", "   ", "# a comment", "\t# x 1"]), max_size=4),
       sep=st.sampled_from([" ", "\t", "   "]), newline=st.sampled_from(["\n", "\r\n"]))
def test_well_formed_label_files_parse_exactly(entries, noise, sep, newline):
    lines = [f"{n}{sep}{i}" for n, i in entries] + noise
    assert _parse(newline.join(lines).encode("utf-8")) == entries


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("flat_fuzz")
    for n in ("a.JPEG", "b.JPEG", "c d.png"):
        (d / n).write_bytes(b"not decoded here")
    return d


@FUZZ
@given(lines=st.lists(st.tuples(st.sampled_from(["a.JPEG", "b", "c d.png", "zz.JPEG", "a", "#a.JPEG"]),
                                st.sampled_from(["0", "1", "999", "1000", "-1", "x", "99999999999999999999999",
                                                 "1" * 5000, "٣", "+2", "1_0"])),
                      max_size=6))
def test_index_from_any_label_lines_is_built_or_refused_with_a_message(flat_folder, lines):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as f:
        f.write("\n".join(f"{n} {i}" for n, i in lines))
        f.flush()
        try:
            ds = _no_hang(build_dataset, str(flat_folder), f.name)
        except DatasetError as e:
            assert str(e)
            return
    assume(True)
    assert len(ds) == len(ds.labels) and ((ds.labels >= 0) & (ds.labels < 1000)).all()
