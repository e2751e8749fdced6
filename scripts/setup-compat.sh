#!/usr/bin/env bash
# Set up .venv-compat, the reference's stack (docs/compat.md): Python 3.9, torch 2.0.1,
# torchvision 0.15.2, numpy<2 (requirements-compat.txt), stock Pillow, no Ray; this package
# with --no-deps and the region decoder, through scripts/setup-env.sh. `make test-compat` runs it.
#
# Environment: COMPAT_PYTHON=/path/to/python3.9 (default: found as below), VENV=.venv-compat.
# Python 3.9 is looked for as pyenv's (pyenv root/versions/3.9.*), then python3.9 on PATH;
# without one, the oldest python3.N (N >= 9) found is used, with a notice.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv-compat}
WANT=3.9

find_python() {
    local p root
    root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    for p in $(ls -d "$root"/versions/$WANT.* 2>/dev/null | sort -V -r); do
        if [[ -x "$p/bin/python" ]]; then echo "$p/bin/python"; return 0; fi
    done
    if command -v "python$WANT" >/dev/null 2>&1; then command -v "python$WANT"; return 0; fi
    return 1
}

oldest_python() {  # the oldest python3.N, N >= 9 (setup.cfg: python_requires >= 3.9), on PATH or in pyenv
    local root cands=() c v best="" bestv=999
    root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    for c in $(compgen -c python3. 2>/dev/null | sort -u) "$root"/versions/3.*/bin/python; do
        command -v "$c" >/dev/null 2>&1 || [[ -x "$c" ]] || continue
        v=$("$c" -c 'import sys; print(sys.version_info[1])' 2>/dev/null) || continue
        if ((v >= 9 && v < bestv)); then best=$c; bestv=$v; fi
    done
    [[ -n "$best" ]] && echo "$best"
}

PY_COMPAT=${COMPAT_PYTHON:-}
if [[ -z "$PY_COMPAT" ]]; then
    if ! PY_COMPAT=$(find_python); then
        PY_COMPAT=$(oldest_python) || {
            echo "setup-compat: no Python $WANT and no python3.N (N >= 9) found: install Python $WANT (pyenv install $WANT) or give COMPAT_PYTHON=" >&2
            exit 1
        }
        echo "setup-compat: NOTICE: no Python $WANT found (pyenv versions, python$WANT on PATH); using the oldest Python found: $PY_COMPAT ($("$PY_COMPAT" -V 2>&1)). torch 2.0.1 has wheels for Python 3.8-3.11 only."
    fi
fi
echo "setup-compat: $VENV with $PY_COMPAT ($("$PY_COMPAT" -V 2>&1)), requirements-compat.txt, stock Pillow"
# a venv made by another interpreter is rebuilt (setup-env.sh reuses any working venv)
if [[ -x "$VENV/bin/python" ]] && ! cmp -s <("$VENV/bin/python" -c 'import sys; print(sys.version_info[:2])' 2>/dev/null) \
        <("$PY_COMPAT" -c 'import sys; print(sys.version_info[:2])'); then
    echo "setup-compat: $VENV was made by another Python version; recreating it"
    rm -rf "$VENV"
fi
PYTHON="$PY_COMPAT" VENV="$VENV" REQUIREMENTS=requirements-compat.txt exec bash scripts/setup-env.sh --no-simd --no-ray
