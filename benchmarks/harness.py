"""Shared benchmark harness: environment record, honest timing, tables, JSON.

Every result row carries the device, library versions and git commit, so a JSON
file alone says where its numbers came from.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from janus.memory import allocator_state
from janus.ops.skinny_linear import cpu_bf16_dot


def git_commit() -> str:
    """The repository's HEAD commit (with '+dirty' when the tree has changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return sha.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, core/thread counts and versions for a result file."""
    import janus

    env: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_allocator": allocator_state(),
        "cpu_bf16_dot": cpu_bf16_dot() if device.type == "cpu" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "janus": janus.__version__,
        "git_commit": git_commit(),
        "platform": platform.platform(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    p50_ms: float
    p90_ms: float
    repeats: int


def percentile(values: Sequence[float], q: float) -> float:
    """The value at quantile ``q`` of ``values`` (nearest rank; q = 0.9 for p90)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(
    fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, repeats: int = 5, budget_s: float = math.inf
) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then up to ``repeats`` times with a device sync around each;
    once at least two runs are in, no new one starts after ``budget_s`` seconds of timed runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < repeats and not (len(times) >= 2 and sum(times) >= budget_s * 1e3):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), percentile(times, 0.9), len(times))


def interleaved(
    fns: Sequence[Callable[[], Any]], device: torch.device, *, rounds: int, budget_s: float = math.inf,
    min_rounds: int = 3,
) -> list[list[float]]:  # fmt: skip
    """Milliseconds of every run of each ``fn``, timed in rounds where all of them take turns.

    Each round runs every fn once, with a device sync around each, in list order and reversed on
    every other round: a drift of the machine's speed (a shared VM, a warming cache) spreads over all
    of them instead of favouring whichever ran first. After ``min_rounds`` (3: the median of three
    cannot be set by one slow run), no new round starts once ``budget_s`` seconds were spent.
    """
    pieces = [lambda _j, fn=fn: fn() for fn in fns]
    return interleaved_pieces(pieces, 1, device, rounds=rounds, budget_s=budget_s, min_rounds=min_rounds)


def interleaved_pieces(
    fns: Sequence[Callable[[int], Any]], pieces: int, device: torch.device, *, rounds: int,
    budget_s: float = math.inf, min_rounds: int = 3,
) -> list[list[float]]:  # fmt: skip
    """``interleaved`` for runs made of ``pieces`` parts (a set of sentences decoded batch by batch): a run of
    fn is fn(0) .. fn(pieces - 1), and the fns take turns piece by piece (fn_0(j), fn_1(j), .. then piece
    j + 1, the order reversed every other piece and round), each piece timed with a device sync around it.
    A slow spell of a shared machine, which lasts seconds, then falls on every fn alike even where one run
    takes a second. Returns, per fn, each round's total milliseconds over its pieces.
    """
    if rounds < min_rounds:
        raise ValueError(f"rounds={rounds}: at least {min_rounds} (a median of fewer can be one slow run)")
    times: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    turn = 0
    for r in range(rounds):
        if r >= min_rounds and spent >= budget_s:
            break
        total = [0.0] * len(fns)
        for j in range(pieces):
            order = range(len(fns)) if turn % 2 == 0 else reversed(range(len(fns)))
            turn += 1
            for i in order:
                sync(device)
                t0 = time.perf_counter()
                fns[i](j)
                sync(device)
                dt = time.perf_counter() - t0
                spent += dt
                total[i] += dt * 1e3
        for i, ms in enumerate(total):
            times[i].append(ms)
    return times


def print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], formats: Optional[dict[str, str]] = None
) -> str:
    """Format rows as a fixed-width text table (also returned).

    ``formats`` maps a column to a format spec (e.g. ``",.1f"``); other floats get 3 significant
    digits below 100 and one decimal from there.
    """
    formats = formats or {}

    def fmt(v: Any, column: str) -> str:
        if v is None:
            return "-"
        if isinstance(v, float) and math.isnan(v):
            return "-"
        if column in formats and isinstance(v, (int, float)):
            return format(v, formats[column])
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    cells = [[fmt(r.get(c, ""), c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def train_events(save_dir: Path, event: str) -> list[dict[str, Any]]:
    """The records of ``event`` ("start", "train", "valid", ...) in a training run's train.jsonl, in order."""
    lines = (Path(save_dir) / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


PLOT_MISSING = (
    "matplotlib is not installed: no plots (pip install matplotlib, or the plot extra: pip install -e '.[plot]')"
)


@functools.cache
def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is missing.

    The first call that finds it missing prints ``PLOT_MISSING`` (what to install); JSON and
    tables are written either way.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(PLOT_MISSING)
        return None
    return plt


def save_figure(fig: Any, ax: Any, path: Path, title: str, legend: Optional[dict[str, Any]] = None) -> Path:
    """Title ``ax`` (small print), add its legend (``legend``: keyword arguments, None for none), and
    write ``fig`` to ``path`` as a 120-dpi PNG, then close it."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    if legend is not None:
        ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The (label, ms, BLEU) points no other point beats: none is as fast or faster with a higher BLEU,
    or faster with at least its BLEU. Sorted by ms (so BLEU rises along it)."""
    front: list[tuple[str, float, float]] = []
    for p in sorted(points, key=lambda p: (p[1], -p[2])):
        if not front or p[2] > front[-1][2]:
            front.append(p)
    return front


def plot_bleu_vs_speed(
    groups: dict[str, list[tuple[str, float, float]]], path: Path, title: str, xlabel: str, *, front: bool = False
) -> Optional[Path]:
    """Scatter of (label, ms per sentence, BLEU) points, one colour per group, ms on a log axis; with
    ``front``, each group's Pareto front (``pareto_front``) drawn as a step line through its points, and
    only those points labelled (the others are dominated: a faster point scores at least as well)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5) if front else (6, 4))
    for group, points in groups.items():
        dots = ax.scatter([p[1] for p in points], [p[2] for p in points], label=group or None, s=16)
        best = pareto_front(points) if front else points
        for label, ms, score in best:
            ax.annotate(label, (ms, score), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if front and points:
            ax.step([p[1] for p in best], [p[2] for p in best], where="post", color=dots.get_facecolor()[0],
                    lw=1, alpha=0.7, label=f"{group + ': ' if group else ''}Pareto front")  # fmt: skip
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda x, _: f"{x:g}")  # 2, 5, 10 rather than 2 x 10^0
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("BLEU")
    return save_figure(fig, ax, path, title, {"fontsize": 7} if any(groups) or front else None)
