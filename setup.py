"""The package build's one custom step: the JPEG region decoder (the metadata is in setup.cfg).

``pip install .`` and ``pip wheel .`` compile ``preprocess/_jpegregion.c`` into the package as the
hash-named library ``preprocess/jpegregion.py`` loads, with that module's own ``build()`` (the
compiler command of ``python -m preprocess.native --build``), and check that it loads. The step is
optional: without a C compiler or the libjpeg-turbo headers it prints a NOTICE (``pip -v`` shows
it) and the package installs without the library; JPEGs are then decoded whole (same pixels,
slower). ``pip install -e .`` builds it in the source tree, where ``make setup`` puts it too.

A wheel that carries the library is tagged ``py3-none-<platform>`` (it is loaded with ctypes, so
any Python 3 on that platform takes it); one without it stays ``py3-none-any``.
"""

import glob
import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:  # no wheel support at all: nothing to tag
        bdist_wheel = None

PACKAGE = "preprocess"


def notice(message):
    print(f"imagenet-engine: NOTICE: {message}", file=sys.stderr, flush=True)


def _jpegregion(package_dir):
    """``package_dir/jpegregion.py`` as a module of its own, not through ``preprocess/__init__.py``
    (which needs Pillow), so that its SOURCE is ``package_dir/_jpegregion.c``."""
    path = os.path.join(package_dir, "jpegregion.py")
    spec = importlib.util.spec_from_file_location("_imagenet_engine_build_jpegregion", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_region_decoder(package_dir, reuse=False):
    """Compile the library next to ``package_dir/_jpegregion.c`` and check it loads; returns its path,
    or None after a NOTICE. ``reuse``: keep a build of this source that already loads."""
    try:
        jr = _jpegregion(package_dir)
    except ImportError as exc:  # numpy (pyproject.toml's build requirements bring it)
        notice(f"JPEG region decoder not built: {exc}; JPEGs will be decoded whole (slower)")
        return None
    target = jr.library_path()
    if reuse and target.exists():
        try:
            jr.RegionDecoder(target)
            return str(target)
        except (OSError, AttributeError):
            pass  # built from this source but does not load: build it again
    try:
        jr.build(quiet=True)
        jr.RegionDecoder(target)
    except (RuntimeError, OSError, AttributeError) as exc:
        if target.exists():
            target.unlink()  # a library that does not load is not shipped
        notice(f"JPEG region decoder not built ({exc}); JPEGs will be decoded whole (slower); "
               "once the cause is fixed, reinstall or run `python -m preprocess.native --build`")
        return None
    print(f"imagenet-engine: built the JPEG region decoder {target.name}", file=sys.stderr, flush=True)
    return str(target)


class BuildPy(build_py):
    """build_py, then the region decoder into the built package (or, editable, the source tree)."""

    def run(self):
        super().run()
        self.region_decoder = None
        if getattr(self, "editable_mode", False):
            self.region_decoder = build_region_decoder(self.get_package_dir(PACKAGE), reuse=True)
            return
        out_dir = os.path.join(self.build_lib, *PACKAGE.split("."))
        # build/ outlives a build: drop what an earlier one left, so that nothing stale (an older
        # source's library, or one made before the compiler went away) goes into this one
        for old in glob.glob(os.path.join(out_dir, "_jpegregion-*.so")):
            os.unlink(old)
        self.region_decoder = build_region_decoder(out_dir)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "region_decoder", None) and not getattr(self, "editable_mode", False):
            outputs.append(self.region_decoder)
        return outputs


cmdclass = {"build_py": BuildPy}

if bdist_wheel is not None:

    class BdistWheel(bdist_wheel):
        """Tag the wheel for its platform when it carries the region decoder."""

        def get_tag(self):
            tag = super().get_tag()
            if not (self.root_is_pure and getattr(self.get_finalized_command("build_py"), "region_decoder", None)):
                return tag
            self.root_is_pure = False  # only to have the platform name computed
            try:
                platform_tag = super().get_tag()[2]
            finally:
                self.root_is_pure = True
            return ("py3", "none", platform_tag)

    cmdclass["bdist_wheel"] = BdistWheel

setup(cmdclass=cmdclass)
