"""Timing and reporting shared by the benchmarks: their JSONL logs, interleaved repetitions,
medians, ratios measured side by side in one process, peak memory of a fresh process, the
machine described."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def read_jsonl(path: Path) -> list[dict]:
    """The records of a study's JSONL log (none if it does not exist yet); blank lines are
    skipped, and a line that does not parse (a write torn by a kill) is dropped with a
    warning that names it."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            print(f"warning: dropping unreadable line {n} of {path}", file=sys.stderr)
    return out


def interleaved(cases: dict[str, Callable[[], None]], reps: int, warmup: int = 2
                ) -> dict[str, float]:
    """Median seconds per call of each case; cases alternate within every repetition so that
    machine-load drift hits all of them alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def probe_mb(argv: list[str]) -> float:
    """The number (MB) a fresh Python process running ``argv`` prints as its last line."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return float(out.stdout.strip().splitlines()[-1])


def rows_in_fresh_process(module: str, backend: str, flags: list[str]) -> list[dict]:
    """Run ``python -m <module> --one <backend> <flags>`` (a benchmark measuring one backend
    and printing its rows as JSON on its last line) and return those rows. Each backend gets a
    process of its own: in one process the frameworks' thread pools and allocators disturb
    each other's timings. Progress on stderr passes through."""
    out = subprocess.run([sys.executable, "-m", module, "--one", backend, *flags], check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def status_mb(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MB. Linux keeps getrusage's
    maxrss across fork and exec, so a child would report its parent's peak; ``VmHWM``
    belongs to this process's own address space."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":")) / 1024
    except (OSError, StopIteration):  # not Linux: the best available figure
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
            1024 * 1024 if sys.platform == "darwin" else 1024)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def return_freed_memory() -> None:
    """Make glibc serve and return every block over 64 KiB by mmap (so freed tensors leave
    the resident set; also turns off its adaptive threshold), and trim now (Linux)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 16)
    libc.malloc_trim(0)


def reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the resident set now; returns it (MB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS")


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
        load = os.getloadavg()
        info["load_average_1m"] = round(load[0], 2)
    except OSError:
        pass
    return info


def write(name: str, payload: dict, table: str, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """``<out_dir>/<name>.json`` (the payload) and ``<name>.md`` (the table); returns both."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / f"{name}.json", out_dir / f"{name}.md"
    j.write_text(json.dumps(payload, indent=1))
    m.write_text(table)
    return j, m


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or "–" for a figure that was not measured (``None``)."""
    return "–" if value is None else format(value, spec)


def error_line(e: BaseException, limit: int = 200) -> str:
    """One line for a case that failed, to stand in its row: the exception's type and the first
    line of its message, or for a failed subprocess the last line of its captured stderr."""
    if isinstance(e, subprocess.CalledProcessError):
        lines = [ln.strip() for ln in (e.stderr or "").splitlines() if ln.strip()]
        text = lines[-1] if lines else f"process exited with status {e.returncode}"
    else:
        msg = str(e).strip()
        text = type(e).__name__ + (": " + msg.splitlines()[0] if msg else "")
    return text if len(text) <= limit else text[:limit - 1] + "…"
