"""Build and check the native part of the hot path: the JPEG region decoder.

    python -m preprocess.native --build     compile preprocess/_jpegregion.c (cc, libjpeg-turbo headers)
    python -m preprocess.native --check     print whether it loads; exit 1 if not

``scripts/setup-env.sh`` (``make setup``) runs both. See :mod:`preprocess.jpegregion`.
"""

from __future__ import annotations

import argparse
import sys

from preprocess import jpegregion


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m preprocess.native", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="store_true", help="compile the library (needs cc and jpeglib.h)")
    p.add_argument("--check", action="store_true", help="print whether it loads (exit 1 if not)")
    p.add_argument("--cc", help="compiler command (default: $CC, else cc)")
    a = p.parse_args(argv)
    if not (a.build or a.check):
        p.error("give --build and/or --check")
    if a.build:
        try:
            jpegregion.build(a.cc)
        except (RuntimeError, OSError) as exc:
            print(f"preprocess.native: cannot build: {exc}", file=sys.stderr)
            return 1
        jpegregion._reset()
    if a.check:
        print(jpegregion.status())
        return 0 if jpegregion.load() is not None else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
