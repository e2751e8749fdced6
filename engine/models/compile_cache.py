"""The on-disk cache of compiled models, keyed by the model's bytes and every compile option.

    <cache_dir>/compiled/<key>.ts      the compiled module (whatever the backend's `save` writes)
    <cache_dir>/compiled/<key>.json    what went into the key, for a person reading the folder
    <cache_dir>/compiled/<key>.refused a compile that failed for these options (e.g. uint8 input):
                                       the reason, so the next run skips the slow attempt

`key` is the sha256 of the canonical JSON of the options, so any change (model file, batch size,
shape, precision, SoC, optimisation level, library version, ...) is a miss. Writes go to a
temporary file and are renamed into place, so two processes compiling at once cannot leave a
half-written file behind: the last one wins, with identical content.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from typing import Callable, Dict, Optional

from engine.config import default_cache_dir


def cache_key(options: Dict) -> str:
    """sha256 of the options as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(options, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class CompileCache:
    """A folder of compiled artifacts; `enabled=False` makes every lookup a miss and stores nothing."""

    def __init__(self, cache_dir: Optional[str] = None, enabled: bool = True):
        self.root = os.path.join(cache_dir or default_cache_dir(), "compiled")
        self.enabled = enabled

    def path(self, key: str, suffix: str = ".ts") -> str:
        return os.path.join(self.root, key + suffix)

    def lookup(self, key: str) -> Optional[str]:
        """The artifact's path if it is cached, else None."""
        if not self.enabled:
            return None
        p = self.path(key)
        return p if os.path.isfile(p) and os.path.getsize(p) > 0 else None

    def store(self, key: str, save: Callable[[str], None], options: Dict) -> Optional[str]:
        """`save(tmp_path)` writes the artifact; it is renamed into place. Returns the path, or None
        (with a warning) when the folder is not writable: a cache failure never fails the run."""
        if not self.enabled:
            return None
        try:
            os.makedirs(self.root, exist_ok=True)
            # no leading dot: torch's zip writer names the archive after the file's stem
            fd, tmp = tempfile.mkstemp(prefix="tmp-" + key[:12] + "-", suffix=".partial", dir=self.root)
            os.close(fd)
            try:
                save(tmp)
                os.replace(tmp, self.path(key))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self._write_text(key, ".json", json.dumps(options, sort_keys=True, indent=1, default=str))
            return self.path(key)
        except OSError as e:
            print(f"warning: cannot write the compile cache in {self.root} ({e}); "
                  "use --cache-dir or --no-cache", file=sys.stderr)
            return None

    def refused(self, key: str) -> Optional[str]:
        """The recorded reason a compile with these options failed before, if any."""
        if not self.enabled:
            return None
        p = self.path(key, ".refused")
        try:
            with open(p, encoding="utf-8") as f:
                return f.read().strip() or "refused"
        except OSError:
            return None

    def remember_refusal(self, key: str, reason: str) -> None:
        if self.enabled:
            try:
                os.makedirs(self.root, exist_ok=True)
                self._write_text(key, ".refused", reason)
            except OSError:
                pass

    def _write_text(self, key: str, suffix: str, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix="tmp-" + key[:12] + "-", suffix=".partial", dir=self.root)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, self.path(key, suffix))
