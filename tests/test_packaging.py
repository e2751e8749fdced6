"""`pip wheel .` / `pip install .` build the JPEG region decoder into the package (setup.py), and
build a wheel without it, with a NOTICE, where it cannot be compiled.

Marked ``packaging`` (``-m "not packaging"`` leaves it out): it runs pip on a copy of the source
tree, offline (``--no-build-isolation``), so it needs pip, setuptools and wheel in this Python
(the .venv of ``make setup`` has them); the cases that compile need a C compiler (``cc``) and the
libjpeg-turbo headers, and skip without them. About 30 s.
"""

from __future__ import annotations

import configparser
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from preprocess import jpegregion  # noqa: E402

pytestmark = [
    pytest.mark.packaging,
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("pip", "setuptools", "wheel")),
                       reason="needs pip, setuptools and wheel in this Python"),
]


def _compiles() -> bool:
    """A C compiler that finds jpeglib.h."""
    if shutil.which("cc") is None:
        return False
    r = subprocess.run(["cc", "-E", "-x", "c", "-"], input="#include <stdio.h>\n#include <jpeglib.h>\n",
                       capture_output=True, text=True)
    return r.returncode == 0


needs_compiler = pytest.mark.skipif(not _compiles(), reason="needs cc and the libjpeg-turbo headers (jpeglib.h)")
LIBRARY = jpegregion.library_path().name  # _jpegregion-<source hash>-<platform>-<machine>.so


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of the source tree as git would check it out (no .venv, build/ or built library):
    the builds below write build/ and egg-info into it, not into this checkout."""
    dst = str(tmp_path_factory.mktemp("src") / "imagenet-engine")
    listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True)
    if listed.returncode == 0:
        for rel in filter(None, listed.stdout.split("\0")):
            src = os.path.join(ROOT, rel)
            if os.path.isfile(src):
                os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
                shutil.copy2(src, os.path.join(dst, rel))
    else:  # not a git checkout (an unpacked sdist)
        shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", ".cache", "__pycache__", "*.egg-info", "_jpegregion-*.so"))
    assert not glob.glob(os.path.join(dst, "preprocess", "_jpegregion-*.so"))
    return dst


def pip_wheel(tree, out, env=None):
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                        "--no-index", "-w", str(out), tree], capture_output=True, text=True, env=e, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = glob.glob(os.path.join(str(out), "imagenet_engine-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], r.stdout + r.stderr


@needs_compiler
def test_wheel_carries_the_region_decoder_and_it_loads(tree, tmp_path):
    wheel, log = pip_wheel(tree, tmp_path / "dist")
    assert "NOTICE:" not in log, log[-2000:]  # setup.py's notice (not the timm-results/NOTICE file it packs)
    assert re.search(r"-py3-none-linux_\w+\.whl$", wheel), wheel  # a native library: not "any"
    names = zipfile.ZipFile(wheel).namelist()
    assert f"preprocess/{LIBRARY}" in names and "preprocess/_jpegregion.c" in names, names
    assert [n for n in names if n.endswith(".so")] == [f"preprocess/{LIBRARY}"]

    # installed the way pip installs it, then loaded by the installed preprocess.jpegregion
    site = str(tmp_path / "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site, wheel],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG")
    jpeg = str(tmp_path / "red.jpg")
    with open(jpeg, "wb") as f:
        f.write(buf.getvalue())
    code = ("import sys, preprocess.jpegregion as j; assert j.__file__.startswith(sys.argv[1]), j.__file__; "
            "d = j.load(); assert d is not None, j.status(); "
            "print(d.path.name, d.header(open(sys.argv[2], 'rb').read()))")
    env = dict(os.environ, PYTHONPATH=site)
    env.pop("IMAGENET_ENGINE_REGION_DECODE", None)
    r = subprocess.run([sys.executable, "-c", code, site, jpeg], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == LIBRARY and "(40, 30, 'YCbCr')" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "preprocess.native", "--check"], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path), timeout=60)
    assert r.returncode == 0 and LIBRARY in r.stdout, r.stdout + r.stderr


def test_installed_scripts_run_where_pip_put_them(tree, tmp_path):
    """`pip install .` puts the bin/ scripts on the environment's PATH, with the header of
    bin/_venv.py but without that file beside them: they run under the environment's Python and
    never look for a clone's .venv. (No compiler needed: CC=/bin/false, a pure wheel.)"""
    wheel, _ = pip_wheel(tree, tmp_path / "dist", env={"CC": "/bin/false"})
    site = str(tmp_path / "site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site, wheel],
                   check=True, capture_output=True, timeout=120)
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    listed = sorted(os.path.basename(p) for p in cfg["options"]["scripts"].split())
    installed = sorted(os.listdir(os.path.join(site, "bin")))
    assert installed == listed and "run-eval" in installed, (installed, listed)  # no _venv.py
    data = os.path.join(site, "engine", "data")  # what engine/report/labelsets.py reads, licence beside it
    for name in ("real.json", "imagenet_a_synsets.txt", "imagenet_r_synsets.txt", "LICENSES.md",
                 "LICENSE-Apache-2.0.txt", "timm-results/results-imagenet-a.csv", "timm-results/results-sketch.csv"):
        assert os.path.isfile(os.path.join(data, name)), name
    env = dict(os.environ, PYTHONPATH=site)
    for name in installed:
        r = subprocess.run([sys.executable, os.path.join(site, "bin", name), "--help"], capture_output=True,
                           text=True, env=env, cwd=str(tmp_path), timeout=120)
        assert r.returncode == 0 and f"usage: {name}" in r.stdout, r.stderr


def _missing_header_cc(tmp_path):
    """cc, with a jpeglib.h first on its include path that stops the compilation as a missing one would."""
    inc = tmp_path / "include"
    inc.mkdir()
    (inc / "jpeglib.h").write_text('#error "jpeglib.h: No such file or directory (simulated)"\n')
    return f"cc -I{inc}"


@pytest.mark.parametrize("cc", ["/bin/false", "missing-header", "no-compiler"])
def test_without_a_compiler_or_headers_the_wheel_is_pure_with_a_notice(tree, tmp_path, cc):
    """Runs after the test above in the same tree: neither the library that build left in build/
    nor one of an older source (planted here) may slip into this wheel."""
    stale = os.path.join(tree, "build", "lib", "preprocess", "_jpegregion-000000000000-linux-x86_64.so")
    os.makedirs(os.path.dirname(stale), exist_ok=True)
    open(stale, "wb").close()
    if cc == "missing-header":
        if shutil.which("cc") is None:
            pytest.skip("needs cc")
        cc = _missing_header_cc(tmp_path)
    elif cc == "no-compiler":
        cc = str(tmp_path / "no-such-cc")
    wheel, log = pip_wheel(tree, tmp_path / "dist", env={"CC": cc})
    notice = [line for line in log.splitlines() if "NOTICE: JPEG region decoder not built" in line]
    assert len(notice) == 1, log[-3000:]
    assert "decoded whole" in notice[0] and "python -m preprocess.native --build" in notice[0]
    assert wheel.endswith("-py3-none-any.whl"), wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith(".so")] and "preprocess/jpegregion.py" in names, names


@needs_compiler
def test_editable_build_puts_the_library_in_the_source_tree(tree, tmp_path):
    """What `pip install -e .` (scripts/setup-env.sh) runs: PEP 660's build_editable hook."""
    lib = os.path.join(tree, "preprocess", LIBRARY)
    if os.path.exists(lib):
        os.unlink(lib)
    out = tmp_path / "editable"
    out.mkdir()
    code = "import sys; from setuptools import build_meta as b; print(b.build_editable(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=tree,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].endswith(".whl") and "NOTICE:" not in r.stderr, r.stderr[-2000:]
    assert os.path.isfile(lib)
    r = subprocess.run([sys.executable, "-c", "import preprocess.jpegregion as j; d = j.load(); "
                        "assert d is not None, j.status(); print(d.path)"],
                       capture_output=True, text=True, cwd=tree, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "IMAGENET_ENGINE_REGION_DECODE"})
    assert r.returncode == 0 and r.stdout.strip() == lib, r.stdout + r.stderr
