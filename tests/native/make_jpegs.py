"""Write the JPEG files that scripts/check-aarch64.sh feeds to tests/native/region_check.c.

    python tests/native/make_jpegs.py OUT_DIR

The synthetic generator's ImageNet-like set (engine.synthetic: 500x375 and other photo sizes,
grayscale, CMYK, progressive), plus files with the chroma subsamplings and sizes it does not
draw: 4:4:4 and 4:2:2, a tiny image and one narrower than a vector step. Deterministic.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from engine.synthetic import make_dataset, make_image  # noqa: E402

# (name, width, height, PIL subsampling: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0)
EXTRA = (("s444.jpg", 333, 251, 0), ("s422.jpg", 421, 300, 1), ("tiny.jpg", 37, 23, 2), ("narrow.jpg", 7, 190, 2))


def main(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    make_dataset(out, 20, 5, layout="flat", seed=3)
    rng = np.random.default_rng(7)
    for name, w, h, sub in EXTRA:
        make_image(rng, w, h, 1).save(os.path.join(out, name), "JPEG", quality=92, subsampling=sub)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_jpegs.py OUT_DIR")
    sys.exit(main(sys.argv[1]))
