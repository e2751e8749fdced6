"""Run a ``bin/`` script of a clone under the clone's ``.venv`` when the Python that started it
lacks the dependencies, so the README's commands work as typed after ``make setup`` with nothing
activated. Standard library only: it runs before anything of the project is imported.

Every script in ``bin/`` starts with the same lines (copy them into a new script)::

    _BIN = os.path.dirname(os.path.realpath(__file__))
    if os.path.exists(os.path.join(_BIN, "_venv.py")):  # run from a clone
        sys.path.insert(0, _BIN)
        import _venv  # noqa: E402

        _venv.ensure(__file__)

Installed with ``pip install .``, the scripts land in the environment's ``bin/`` without this file
beside them, so none of this runs: that environment has the dependencies (pip put them there).
"""

import importlib.util
import os
import sys

# What the scripts import (Pillow arrives with torchvision); checked with find_spec, which imports
# nothing. make-dataset needs only the first two.
REQUIRES = ("numpy", "PIL", "torch", "torchvision")
PACKAGE_NAMES = {"PIL": "Pillow"}  # what the hint names where the module's name is not pip's
VENV = ".venv"  # the Makefile's default VENV, what scripts/setup-env.sh creates
# Set across the re-exec, so a second one is never attempted (a .venv that lacks the dependencies
# gets the hint, not a loop); removed again on arrival, so that child processes do not inherit it.
GUARD = "IMAGENET_ENGINE_REEXEC"


def missing(modules=REQUIRES):
    """The top-level modules of ``modules`` this Python cannot import."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def ensure(script, requires=REQUIRES):
    """Return when this Python has ``requires``; otherwise re-exec ``script`` with the same
    arguments under ``<clone>/.venv/bin/python`` if there is one (and this is not it, and this
    is not already the re-exec), else print one line saying what to do and exit with status 2."""
    reexecuted = os.environ.pop(GUARD, None) is not None
    lacking = missing(requires)
    if not lacking:
        return
    script = os.path.realpath(script)
    root = os.path.dirname(os.path.dirname(script))
    venv = os.path.join(root, VENV)
    python = os.path.join(venv, "bin", "python")
    in_venv = os.path.realpath(sys.prefix) == os.path.realpath(venv)
    why = ""
    if os.access(python, os.X_OK) and not in_venv and not reexecuted:
        os.environ[GUARD] = "1"
        try:
            os.execv(python, [python, script] + sys.argv[1:])
        except OSError as exc:  # execv returns only on failure
            os.environ.pop(GUARD, None)
            why = f" and {python} does not start ({exc})"
    name = os.path.basename(script)
    packages = ", ".join(PACKAGE_NAMES.get(m, m) for m in lacking)
    sys.stderr.write(
        f"{name}: this Python ({sys.executable}) lacks {packages}{why}: run `make setup` in {root} "
        f"(the bin/ scripts then use its {VENV} by themselves, nothing to activate), "
        f"or `pip install {root}` into this Python\n")
    sys.exit(2)
