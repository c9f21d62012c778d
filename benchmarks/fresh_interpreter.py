"""Run one benchmark variant in a fresh interpreter and read back the JSON it writes.

Benchmarks that compare start-up or whole jobs (`first_contact.py`, `jagged.py`) run each variant
in its own interpreter, one after the other, so no variant inherits another's imports, threads or
process group. ``run_in_fresh_interpreter("benchmarks.jagged", "_child", args)`` calls
``_child(*args, out)`` there (one thread per rank) and returns what it wrote to ``out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_in_fresh_interpreter(module: str, function: str, args: Sequence[Any], *, what: str, timeout_s: float = 1200) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        call = ", ".join(repr(a) for a in [*args, out])
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from {module} import {function}; {function}({call})"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not os.path.exists(out):
            raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(out).read_text())
