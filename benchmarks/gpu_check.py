"""One prepared GPU check: every CUDA and Triton path, the kernel targets, decoding and a short training.

    # on a GPU machine (H100/H200 class), from the repository root; at most 9 minutes
    python benchmarks/gpu_check.py --corpus /data/libreoffice-de-en --out benchmarks/results/gpu
    # the same, also decoding a trained model (its own lengths, BLEU beside speed)
    python benchmarks/gpu_check.py --corpus /data/libreoffice-de-en --out benchmarks/results/gpu \\
        --checkpoint ckpt/janus/averaged
    # a second command resumes: finished steps are skipped, the others run with a fresh budget
    python benchmarks/gpu_check.py --corpus /data/libreoffice-de-en --out benchmarks/results/gpu
    # every step at toy size on the CPU (Triton through its interpreter): under a minute on 2 cores
    python benchmarks/gpu_check.py --cpu-dry-run --out runs/gpu_check_dry_run

The steps, in order (``STEPS``; each runs as a subprocess under its own time cap):

- build: ``pip install --no-build-isolation --no-deps -e .`` (compiles csrc/, CUDA kernels
  included when nvcc is found), then ``python -m janus.info``: which backend of each op can
  run and why not; the dry run uses the extension as it is.
- tests: ``pytest -m "(gpu or triton or cpp) and not (slow and not gpu)"`` over tests/: the
  op, kernel and decoding tests on the GPU, the full-size bf16 and the past-2^31-offset
  cases included; left out are the slow tests that need no GPU and run in CI anyway (every
  kernel compiled for sm_80/sm_90, the on-first-use build). Counts and failures are kept.
- kernels: ``benchmarks/kernels.py --device cuda``: every op's backends against their
  reference, and the targets: janus_loss >= 2x time and >= 3x peak memory, janus_linear_loss
  >= 4x peak memory (N=8192, M=5600, V=32000, bf16), mask_predict_update >= 3x time.
- prepare: ``janus prepare`` of ``--corpus`` (8000-piece joint vocabulary).
- profile: ``torch.profiler`` (CPU and CUDA activities) around two batch-1 decodes of the shipped
  sample, greedy and mask-predict T=10 l=3, iwslt preset with random weights: ms per sentence and
  the ops with the most host time and the most device time (where a decoder pass's time goes).
- decode: ``benchmarks/decode_speed.py --random-weights --device cuda``, iwslt preset, on
  the first 64 test sentences of the corpus at batch 1 (the first 4) and 64.
- decode_trained: the same on ``--checkpoint`` (the shipped sample at batch 1 and 64),
  with BLEU; skipped without one.
- train_compare: ``janus train``, iwslt preset, ``janus`` objective, the same 20 updates twice:
  JANUS_BACKEND_JANUS_LINEAR_LOSS=triton (the fused linear + loss) and =reference; target
  tokens/s, peak memory and the agreement of their losses.
- train: the fused run continues for as many updates as the time left allows.
- evaluate: ``janus evaluate`` of that model on the test split: BLEU of AR beam 5 and NAR
  T=10 l=3.

Time: the whole run has ``--total-minutes`` (8.75); a step gets the smaller of its cap and
what is left, and a step whose minimum no longer fits is skipped and reported as skipped for
lack of time; ``train`` takes what is left after reserving ``evaluate``'s cap. A step that
runs past its time is killed with its whole process group. The state lives in the output
folder's ``gpu_check.json``: a rerun skips every step marked done (``--redo STEP`` runs one
again, ``--steps`` chooses some). Intermediate files (prepared data, checkpoints, the raw
results of each tool) go to ``--work``.

The output folder holds at most 8 files, ready to be committed: ``gpu_check.json`` (device,
versions, git commit, settings, every step's status, time and figures), ``gpu_check.md`` (the
summary), ``gpu_check.log`` (every command and its output), and the plots
``decode_speed.png``, ``decode_trained_speedup.png``, ``decode_trained_bleu.png`` and
``training.png`` (with matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
# The budget counts from here: the interpreter's start-up is all that comes before.
START = time.monotonic()
STATE = "gpu_check.json"
SUMMARY = "gpu_check.md"
LOG = "gpu_check.log"
MAX_FILES = 8
# What a worker snippet prints last: one line of JSON after this prefix.
RESULT = "gpu_check result: "
# Output lines of a failed step kept in the JSON (the log keeps everything).
TAIL_LINES = 40


@dataclass(frozen=True)
class Step:
    """One step: its name, what it checks, and its time.

    ``cap_s`` / ``dry_cap_s``: the longest it may run on a GPU / in the dry run (``train``: 0, it
    takes what is left). ``min_s``: it does not start with less than this left (the GPU run's
    figure; the dry run starts every step). ``needs``: steps that must be done first."""

    name: str
    title: str
    cap_s: float
    dry_cap_s: float
    min_s: float
    needs: tuple[str, ...] = ()


STEPS = (
    Step("build", "build the extension in place, python -m janus.info", 150, 60, 30),
    Step("tests", "pytest: gpu, triton and cpp tests", 150, 90, 30),
    Step("kernels", "benchmarks/kernels.py: fused ops against their references, the targets", 75, 60, 20),
    Step("prepare", "janus prepare of the corpus", 45, 30, 10),
    Step("profile", "torch.profiler of a greedy and a mask-predict decode at batch 1", 45, 30, 15),
    Step("decode", "benchmarks/decode_speed.py, random weights, batch 1 and 64", 120, 60, 30, ("prepare",)),
    Step("decode_trained", "benchmarks/decode_speed.py on --checkpoint, with BLEU", 60, 60, 20),
    Step("train_compare", "janus train: fused linear + loss against the reference path", 120, 60, 40, ("prepare",)),
    Step("train", "janus train: the fused run continues while the time allows", 0, 0, 30, ("train_compare",)),
    Step("evaluate", "janus evaluate: BLEU of AR beam 5 and NAR T=10 l=3 on the test split", 60, 60, 20,
         ("train_compare",)),
)  # fmt: skip
STEP_NAMES = tuple(s.name for s in STEPS)


@dataclass(frozen=True)
class Sizes:
    """What the steps run: the GPU run's sizes (``GPU``) or the dry run's toy ones (``DRY_RUN``)."""

    mode: str
    device: str
    # build: pip install -e . (compiles csrc/), or use the extension as it is.
    install: bool
    # tests: pytest arguments after the marker expression.
    test_args: tuple[str, ...]
    # tests: pytest-xdist workers where it is installed (0: one process). In workers, a test that
    # crashes the interpreter (a segfault in compiled code) is reported as failed and the run goes on.
    test_workers: int
    # kernels: benchmarks/kernels.py arguments besides --device and --json.
    kernel_args: tuple[str, ...]
    # prepare: joint sentencepiece vocabulary size (capped by janus prepare on a small corpus).
    vocab_size: int
    # profile: the model preset whose decodes are profiled (random weights).
    profile_preset: str
    # decode / decode_trained: benchmarks/decode_speed.py arguments besides --device, --out and the model.
    decode_args: tuple[str, ...]
    decode_trained_args: tuple[str, ...]
    # train_compare / train: the model, the batch, the schedule.
    preset: str
    max_tokens: int
    compare_updates: int
    train_updates_max: int  # 0: as many as the time allows
    lr: float
    warmup: int
    valid_batches: int
    train_log_interval: int
    # JANUS_BACKEND_JANUS_LINEAR_LOSS of the fused run; "" leaves the choice to the dispatch (on the
    # CPU the Triton kernel takes no CPU tensors, so the dry run compares the CPU path instead).
    fused_backend: str
    # evaluate: the first sentences of the test split (0: all).
    eval_sentences: int
    # OMP_NUM_THREADS of every subprocess (0: unset).
    threads: int
    total_minutes: float


MARKERS = "(gpu or triton or cpp) and not (slow and not gpu)"

GPU = Sizes(
    mode="gpu",
    device="cuda",
    install=True,
    test_args=("tests/",),
    test_workers=4,
    kernel_args=("--budget", "1.5", "--warmup", "10"),
    vocab_size=8000,
    profile_preset="iwslt",
    decode_args=("--random-weights", "--preset", "iwslt", "--split", "test", "--sentences", "64", "--b1-sentences", "4",
                 "--batch-sizes", "1,64", "--rounds", "3", "--batch-seconds", "20"),
    decode_trained_args=("--sentences", "64", "--b1-sentences", "4", "--batch-sizes", "1,64", "--rounds", "3",
                         "--batch-seconds", "15"),
    preset="iwslt",
    max_tokens=8192,
    compare_updates=20,
    train_updates_max=0,
    lr=1e-3,
    warmup=300,
    valid_batches=50,
    train_log_interval=25,
    fused_backend="triton",
    eval_sentences=0,
    threads=0,
    total_minutes=8.75,
)  # fmt: skip

DRY_RUN = Sizes(
    mode="cpu-dry-run",
    device="cpu",
    install=False,
    # One or two tests of each file, each kernel through the interpreter; the CUDA ones skip.
    test_args=("tests/", "-k", "one_row or backward_runs_once or dispatch_picks or dispatch_prefers_cpp "
               "or every_mode_on_cuda or full_size_bf16"),
    test_workers=0,
    kernel_args=("--rows", "8", "--length", "16", "--classes", "32", "--ar-rows", "512", "--masked-rows", "256",
                 "--vocab", "1000", "--dim", "64", "--calls", "3", "--warmup", "1", "--budget", "0.1"),
    vocab_size=1000,
    profile_preset="tiny",
    decode_args=("--random-weights", "--preset", "tiny", "--split", "test", "--sentences", "8", "--b1-sentences", "2",
                 "--batch-sizes", "1,4,8", "--rounds", "3", "--batch-seconds", "1",
                 "--methods", "greedy,beam5,nar-T10-l3,spec"),
    decode_trained_args=("--sentences", "4", "--b1-sentences", "2", "--batch-sizes", "1,4", "--rounds", "3",
                         "--batch-seconds", "1", "--methods", "greedy,beam5,nar-T10-l3,spec"),
    preset="tiny",
    max_tokens=512,
    compare_updates=3,
    train_updates_max=5,
    lr=1e-3,
    warmup=10,
    valid_batches=2,
    train_log_interval=1,
    fused_backend="",
    eval_sentences=4,
    threads=1,
    total_minutes=5.0,
)  # fmt: skip

# Targets of the fused kernels against their references (issue: the Triton kernels' reason to exist).
# (case of benchmarks/kernels.py, figure, at least)
TARGETS = (
    ("janus_loss fwd+bwd", "speedup_vs_reference", 2.0),
    ("janus_loss fwd+bwd", "memory_vs_reference", 3.0),
    ("janus_linear_loss fwd+bwd", "memory_vs_reference", 4.0),
    ("mask_predict_update", "speedup_vs_reference", 3.0),
)
# Loss agreement of the fused and the reference training runs, relative: at the first update (the
# same weights and batch: only the op differs) and at any logged update (bf16 noise grows with the
# updates, since the weights drift apart).
FIRST_UPDATE_RTOL = 5e-3
RUN_RTOL = 2e-2

# Runs janus train in-process and then reports the process's peak memory, which train.jsonl lacks.
TRAIN_WORKER = f"""
import json, resource, sys
import torch
from janus.cli import main
rc = main(["train", *sys.argv[1:]])
peak = dict(peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
if torch.cuda.is_available() and torch.cuda.is_initialized():
    peak.update(cuda_peak_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                cuda_peak_reserved_mib=torch.cuda.max_memory_reserved() / 2**20)
print({RESULT!r} + json.dumps(peak), flush=True)
sys.exit(rc)
"""

# Packages the steps import; a missing one is named by the build step (the GPU machine has no network).
PACKAGES = ("torch", "triton", "numpy", "sentencepiece", "sacrebleu", "safetensors", "tqdm", "ninja", "pytest",
            "hypothesis", "matplotlib")  # fmt: skip


class StepFailed(RuntimeError):
    """A step could not produce its figures (a command failed, a result file is missing)."""


class StepTimeout(RuntimeError):
    """A command of a step ran past the step's time and was killed.

    ``lines``: what it printed; ``figures``: what a step could still make of that (set by the step)."""

    def __init__(self, message: str, lines: Optional[list[str]] = None) -> None:
        super().__init__(message)
        self.lines = lines or []
        self.figures: Optional[dict[str, Any]] = None


@dataclass
class Completed:
    rc: int
    seconds: float
    lines: list[str]

    def result(self) -> dict[str, Any]:
        """The JSON a worker snippet printed last (``RESULT`` prefix)."""
        for line in reversed(self.lines):
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT) :])
        raise StepFailed(f"the command printed no line starting with {RESULT!r}")


class Check:
    """One run of the check: paths, sizes, the deadline, the state, and the commands' runner."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes, start: float) -> None:
        self.args, self.sizes = args, sizes
        self.out, self.work = Path(args.out), Path(args.work)
        self.corpus = Path(args.corpus)
        self.checkpoint = args.checkpoint
        self.start = start
        minutes = args.total_minutes if args.total_minutes is not None else sizes.total_minutes
        self.total_s = 60.0 * minutes
        # Writing the report at the end takes a few seconds: no step may eat them.
        self.deadline = self.start + max(0.0, self.total_s - 15.0)
        self.step_deadline = self.deadline
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.state = self._load_state()

    # -- state ------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        path = self.out / STATE
        settings = self.settings()
        if path.is_file() and not self.args.fresh:
            state = json.loads(path.read_text())
            old = state.get("settings", {})
            for key in ("mode", "corpus"):
                if old.get(key) != settings[key]:
                    raise SystemExit(
                        f"{path} holds a check with {key}={old.get(key)!r}, this one has {key}={settings[key]!r}: "
                        "pass another --out, or --fresh to start over there"
                    )
            state["settings"] = settings
            return state
        return {"check": "gpu_check", "settings": settings, "environment": {}, "runs": [], "steps": {}}

    def settings(self) -> dict[str, Any]:
        return dict(mode=self.sizes.mode, corpus=str(self.corpus), checkpoint=self.checkpoint or None,
                    work=str(self.work), total_minutes=self.total_s / 60, markers=MARKERS,
                    sizes=dataclasses.asdict(self.sizes))  # fmt: skip

    def record(self, name: str) -> dict[str, Any]:
        return self.state["steps"].get(name, {})

    def done(self, name: str) -> bool:
        return self.record(name).get("status") == "done"

    def save(self) -> None:
        """The JSON and the markdown summary, after every step: a run killed from outside keeps its progress."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=str) + "\n")
        tmp.replace(self.out / STATE)
        (self.out / SUMMARY).write_text(summary(self.state))

    # -- time -------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step_left(self) -> float:
        return self.step_deadline - time.monotonic()

    # -- commands ---------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        # Until the build step installs janus (and in the dry run), the repository itself is the package.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["MPLBACKEND"] = "Agg"
        if self.sizes.mode == "cpu-dry-run":
            env["TRITON_INTERPRET"] = "1"  # before any kernel module is imported: the kernels run on the CPU
        if self.sizes.threads:
            env["OMP_NUM_THREADS"] = str(self.sizes.threads)
        env.update(extra)
        return env

    def run(self, argv: Sequence[str], *, env: Optional[dict[str, str]] = None, check: bool = True) -> Completed:
        """Run ``argv`` in the repository root until the step's time is up, its output shown and logged.

        The command gets its own process group, so that a timeout kills what it started too (pytest's
        subprocesses, a compiler)."""
        timeout = self.step_left()
        if timeout <= 0:
            raise StepTimeout(f"no time left in the step for {' '.join(argv[:3])} ...")
        shown = " ".join("<snippet>" if i and argv[i - 1] == "-c" else a for i, a in enumerate(argv))
        self.log(f"$ {shown}   (at most {timeout:.0f} s)")
        lines: list[str] = []
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), cwd=REPO, env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
        )  # fmt: skip

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n").rsplit("\r", 1)[-1]  # a progress bar's last state
                lines.append(line)
                self.tail.append(line)
                self.log(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            reader.join(timeout=5)
            raise StepTimeout(f"{shown} ran past the step's {timeout:.0f} s and was killed", lines) from None
        except BaseException:
            # Ctrl-C reaches only this process (the command has its own session): take the command along.
            kill_group(proc)
            raise
        reader.join(timeout=10)
        done = Completed(rc, time.perf_counter() - t0, lines)
        if check and rc != 0:
            raise StepFailed(f"{shown} exited with status {rc}")
        return done

    def python(self, *args: str, env: Optional[dict[str, str]] = None, check: bool = True) -> Completed:
        return self.run([sys.executable, *args], env=env, check=check)

    def log(self, line: str) -> None:
        print(line, flush=True)
        with open(self.out / LOG, "a") as f:
            f.write(line + "\n")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of ``proc``, SIGKILL if it is still there after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- the steps ------------------------------------------------------------------------------------
def step_build(c: Check) -> dict[str, Any]:
    """Install (compiling csrc/, CUDA too where nvcc is), then what janus.info says about every backend."""
    figures: dict[str, Any] = {"missing_packages": [p for p in PACKAGES if importlib.util.find_spec(p) is None]}
    if c.sizes.install:
        build = c.python("-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", ".", check=False)
        figures["install"] = {"rc": build.rc, "seconds": round(build.seconds, 1)}
        if build.rc != 0:
            # The on-first-use build of janus/_ext.py is the other way in; janus.info below triggers it.
            c.log("pip install failed: janus.info below builds the extension on first use instead")
    c.python("-m", "janus.info")
    info = json.loads("\n".join(c.python("-m", "janus.info", "--json").lines))
    figures["extension"] = info.get("extension")
    figures["devices"] = info.get("devices")
    figures["versions"] = info.get("versions")
    figures["backends"] = {op: {b["backend"]: "available" if b["available"] else b["why_not"] for b in backends}
                           for op, backends in info.get("ops", {}).items()}  # fmt: skip
    # The GPU paths this check exists for; any of them unavailable on a GPU is a finding.
    wanted = [(op, b) for op, bs in figures["backends"].items() for b in bs if b in ("cuda", "triton")]
    figures["gpu_backends_unavailable"] = {f"{op}/{b}": figures["backends"][op][b] for op, b in wanted
                                           if figures["backends"][op][b] != "available"}  # fmt: skip
    figures["error_path"] = extension_error_path(c)
    if c.sizes.install and figures["install"]["rc"] != 0 and not (info.get("extension") or {}).get("available"):
        raise StepFailed("pip install failed and the on-first-use build did not load the extension either")
    return figures


# A compiled op called with a bad argument: its message formats integers (c10::str through libstdc++'s
# ostream), which crashes where the library carries a second, static libstdc++.
ERROR_PATH = f"""
import json, sys, torch
import janus._ext as ext
ext.load()
path = getattr(sys.modules.get("janus._C"), "__file__", None) or next(iter(torch.ops.loaded_libraries), None)
try:
    torch.ops.janus.length_beam_init(torch.zeros(8), 2, 2, torch.tensor(5), 1, 2, 3, 0)
    print({RESULT!r} + json.dumps(dict(library=path, raised=None)))
except ValueError as e:
    print({RESULT!r} + json.dumps(dict(library=path, raised=str(e).splitlines()[0][:200])))
"""


def extension_error_path(c: Check) -> dict[str, Any]:
    """Whether a compiled op's error message comes back as a Python error (or the process dies), and how
    the library links libstdc++ (``ldd``)."""
    done = c.python("-c", ERROR_PATH, check=False)
    if done.rc != 0:
        status = f"crashed (exit status {done.rc})" if done.rc < 0 else f"failed ({done.rc})"
        figures: dict[str, Any] = {"status": status}
        library = next(iter(sorted(REPO.glob("janus/_C*.so"))), None)
    else:
        result = done.result()
        figures = {"status": "ok" if result["raised"] else "no error raised", "message": result["raised"]}
        library = Path(result["library"]) if result.get("library") else None
    if library is not None and shutil.which("ldd"):
        lines = subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout.splitlines()
        figures["libstdcxx"] = next((ln.strip() for ln in lines if "libstdc++" in ln), "not a dynamic dependency")
    if figures["status"] != "ok":
        c.log(f"the compiled ops' error path: {figures}")
    return figures


def step_tests(c: Check) -> dict[str, Any]:
    """pytest over the selected tests; the junit XML gives the counts, failures and skip reasons."""
    junit = c.work / "tests.xml"
    junit.unlink(missing_ok=True)
    workers = []
    if c.sizes.test_workers and importlib.util.find_spec("xdist") is not None:
        workers = ["-n", str(c.sizes.test_workers)]
    try:
        # -v: one line per test, so that a run killed at the cap still says how far it got.
        done = c.python("-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", MARKERS, *workers, *c.sizes.test_args,
                        f"--junitxml={junit}", "--durations=5", check=False)  # fmt: skip
    except StepTimeout as e:
        e.figures = verbose_summary(e.lines)
        raise
    if done.rc not in (0, 1) or not junit.is_file():  # 1: tests failed (a result); anything else: pytest did not run
        raise StepFailed(f"pytest exited with status {done.rc} (collection or usage error)")
    return dict(rc=done.rc, seconds=round(done.seconds, 1), **junit_summary(junit))


def verbose_summary(lines: list[str]) -> dict[str, Any]:
    """Counts of the tests that finished before a timeout, from pytest -v lines: "path::test PASSED [ 10%]",
    or with xdist workers "[gw0] [ 10%] PASSED path::test"."""
    counts = {k: 0 for k in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS")}
    failures = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in counts:
            test, status = parts[0], parts[1]
        elif parts and parts[0].startswith("[gw") and len(parts) >= 2 and "::" in parts[-1] and parts[-2] in counts:
            test, status = parts[-1], parts[-2]
        else:
            continue
        counts[status] += 1
        if status in ("FAILED", "ERROR"):
            failures.append({"test": test, "kind": status.lower(), "message": ""})
    return dict(finished=sum(counts.values()), passed=counts["PASSED"], failed=counts["FAILED"],
                errors=counts["ERROR"], skipped=counts["SKIPPED"], failures=failures, partial=True)  # fmt: skip


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts, failed tests with the first line of their message, skip reasons with their counts, slowest tests."""
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed, skipped, times = [], {}, []
    for case in cases:
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        times.append((float(case.get("time", 0)), name))
        for kind in ("failure", "error"):
            for node in case.findall(kind):
                message = (node.get("message") or node.text or "").strip().splitlines()
                failed.append({"test": name, "kind": kind, "message": message[0][:300] if message else ""})
        for node in case.findall("skipped"):
            reason = (node.get("message") or "").strip()[:200]
            skipped[reason] = skipped.get(reason, 0) + 1
    n_failed = sum(1 for f in failed if f["kind"] == "failure")
    n_error = len(failed) - n_failed
    n_skipped = sum(skipped.values())
    return dict(tests=len(cases), passed=len(cases) - n_failed - n_error - n_skipped, failed=n_failed,
                errors=n_error, skipped=n_skipped, failures=failed, skip_reasons=skipped,
                slowest=[{"test": n, "seconds": round(t, 2)} for t, n in sorted(times, reverse=True)[:5]])  # fmt: skip


def step_kernels(c: Check) -> dict[str, Any]:
    path = c.work / "kernels.json"
    path.unlink(missing_ok=True)
    c.python("benchmarks/kernels.py", "--device", c.sizes.device, *c.sizes.kernel_args, "--json", str(path))
    rows = json.loads(path.read_text())["results"]
    return dict(rows=rows, targets=kernel_targets(rows))


def kernel_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target beside the Triton backend's figure (None, with why, where it did not run)."""
    out = []
    for case, figure, least in TARGETS:
        row = next((r for r in rows if r["case"] == case and r["backend"] == "triton"), None)
        value = None if row is None else row.get(figure)
        why = ("the triton backend did not run (see the kernels output)" if row is None
               else "" if value is not None else f"no {figure} (peak memory is measured on CUDA only)")  # fmt: skip
        size = row["size"] if row else next((r["size"] for r in rows if r["case"] == case), "")
        out.append(dict(case=case, size=size, figure=figure, target=least, measured=value,
                        met=None if value is None else value >= least, why=why))  # fmt: skip
    return out


def step_prepare(c: Check) -> dict[str, Any]:
    data = c.work / "data"
    if data.exists():
        shutil.rmtree(data)  # a folder left by a killed run; janus prepare wants a fresh one
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            if not (c.corpus / f"{split}.{lang}").is_file():
                raise StepFailed(f"--corpus {c.corpus} has no {split}.{lang} (it needs {{train,valid,test}}.{{de,en}})")
    c.python("-m", "janus", "prepare", "--trainpref", str(c.corpus / "train"), "--validpref",
             str(c.corpus / "valid"), "--testpref", str(c.corpus / "test"), "--src", "de", "--tgt", "en",
             "--destdir", str(data), "--vocab-size", str(c.sizes.vocab_size))  # fmt: skip
    manifest = json.loads((data / "manifest.json").read_text())
    splits = {k: {"pairs": v["kept"], "tgt_tokens": v["tgt_tokens"]} for k, v in manifest["splits"].items()}
    return dict(vocab_size=manifest["vocab_size"], splits=splits)


def decode_run(c: Check, out: Path, model: Sequence[str], extra: Sequence[str]) -> list[dict[str, Any]]:
    if out.exists():
        shutil.rmtree(out)
    try:
        c.python("benchmarks/decode_speed.py", *model, *extra, "--device", c.sizes.device, "--out", str(out))
    except StepTimeout as e:
        if (out / "results.json").is_file():  # the batch sizes measured before the cap
            e.figures = dict(rows=json.loads((out / "results.json").read_text())["results"], partial=True)
        raise
    return json.loads((out / "results.json").read_text())["results"]


PROFILE_WORKER = f"""
import json, sys, time
import torch
from torch.profiler import ProfilerActivity, profile
from janus.api import Generator
from janus.config import DecodeConfig, preset
from janus.model import JanusModel
from janus.samples import libreoffice_sample
from janus.vocab import Vocab

device, name = sys.argv[1], sys.argv[2]
sample = libreoffice_sample()
vocab = Vocab(sample.spm_model)
torch.manual_seed(0)
gen = Generator(JanusModel(preset(name, vocab_size=len(vocab), dropout=0.0)), vocab, device=device)
src = sample.source[:3]
lengths = [len(t) for t in vocab.encode(sample.target[:3])]
cuda = gen.device.type == "cuda"
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
sync = torch.cuda.synchronize if cuda else (lambda: None)
out = {{}}
for method, options in (("greedy", DecodeConfig(mode="ar", beam_size=1, max_batch_size=1)),
                        ("nar-T10-l3", DecodeConfig(mode="nar", iterations=10, length_beam=3, max_batch_size=1))):
    gen.generate(src[:1], options, target_lengths=lengths[:1])  # warm-up
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        hyps = gen.generate(src[1:], options, target_lengths=lengths[1:])
        sync()
        seconds = time.perf_counter() - t0
    events = prof.key_averages()
    def top(key):
        rows = sorted(events, key=lambda e: getattr(e, key, 0) or 0, reverse=True)[:12]
        return [dict(op=e.key[:80], calls=e.count, self_cpu_ms=round(e.self_cpu_time_total / 1e3, 3),
                     self_device_ms=round((getattr(e, "self_device_time_total", 0) or 0) / 1e3, 3)) for e in rows]
    out[method] = dict(sentences=len(hyps), ms_per_sentence=1e3 * seconds / len(hyps),
                       passes=sum(h.passes for h in hyps) / len(hyps), top_host=top("self_cpu_time_total"),
                       top_device=top("self_device_time_total") if cuda else [])
    print(events.table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
print({RESULT!r} + json.dumps(out))
"""


def step_profile(c: Check) -> dict[str, Any]:
    """Where a batch-1 decode's time goes: the profiler's ops by host and by device time."""
    return c.python("-c", PROFILE_WORKER, c.sizes.device, c.sizes.profile_preset).result()


def step_decode(c: Check) -> dict[str, Any]:
    out = c.work / "decode"
    rows = decode_run(c, out, ["--data", str(c.work / "data")], c.sizes.decode_args)
    copy_plot(out / "speedup.png", c.out / "decode_speed.png")
    return dict(rows=rows)


def step_decode_trained(c: Check) -> dict[str, Any]:
    out = c.work / "decode_trained"
    rows = decode_run(c, out, ["--checkpoint", c.checkpoint], c.sizes.decode_trained_args)
    copy_plot(out / "speedup.png", c.out / "decode_trained_speedup.png")
    copy_plot(out / "bleu_vs_speed.png", c.out / "decode_trained_bleu.png")
    return dict(checkpoint=c.checkpoint, rows=rows)


def copy_plot(src: Path, dst: Path) -> None:
    if src.is_file():  # absent without matplotlib (the tool said so)
        shutil.copyfile(src, dst)


def train_args(c: Check, save_dir: Path, max_steps: int, log_interval: int) -> list[str]:
    s = c.sizes
    return ["--data", str(c.work / "data"), "--save-dir", str(save_dir), "--preset", s.preset,
            "--objective", "janus", "--max-tokens", str(s.max_tokens), "--max-steps", str(max_steps),
            "--lr", str(s.lr), "--warmup-steps", str(s.warmup), "--device", s.device,
            "--log-interval", str(log_interval), "--validate-interval", str(max_steps),
            "--save-interval", str(max_steps), "--save-interval-minutes", "1", "--keep-last", "1",
            "--max-valid-batches", str(s.valid_batches), "--no-progress", "--seed", "1"] + (
            ["--amp", "none"] if s.device == "cpu" else [])  # fmt: skip


def train_run(c: Check, save_dir: Path, max_steps: int, log_interval: int, backend: str) -> dict[str, Any]:
    """One janus train process; its train.jsonl records, peak memory, wall time and update rate."""
    env = c.env(**({"JANUS_BACKEND_JANUS_LINEAR_LOSS": backend} if backend else {}))
    done = c.python("-c", TRAIN_WORKER, *train_args(c, save_dir, max_steps, log_interval), env=env)
    records = read_jsonl(save_dir / "train.jsonl")
    return dict(backend=backend or "automatic", seconds=round(done.seconds, 1), **done.result(),
                **train_figures(records, done.seconds))  # fmt: skip


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_figures(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Update rate, target tokens/s and losses of the last run in a train.jsonl.

    The first updates (the first quarter, at most 5) compile kernels and grow the allocator: left
    out of the rate. ``overhead_s``: the process's time outside the timed updates (start-up, data,
    validation, saving), what another run of the same setup costs besides its updates."""
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    run = records[starts[-1] :] if starts else records
    train = [r for r in run if r.get("event") == "train"]
    valid = [r for r in run if r.get("event") == "valid"]
    if not train:
        raise StepFailed("train.jsonl has no train record")
    warm = min(5, len(train) // 4)
    timed = train[warm:] if len(train) - warm >= 2 else train
    steps = timed[-1]["step"] - timed[0]["step"]
    s_per_update = (timed[-1]["time"] - timed[0]["time"]) / steps if steps > 0 else math.nan
    start_time = run[0]["time"] if starts else train[0]["time"]
    return dict(
        steps=train[-1]["step"],
        s_per_update=s_per_update,
        tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed),
        overhead_s=max(0.0, wall_s - (train[-1]["time"] - start_time)),
        losses=[(r["step"], r["loss"]) for r in train],
        valid={k: valid[-1][k] for k in ("loss", "ar_nll", "nar_nll", "aux_nll", "length") if k in valid[-1]}
        if valid else {},
    )  # fmt: skip


def step_train_compare(c: Check) -> dict[str, Any]:
    n = c.sizes.compare_updates
    runs = {}
    for label, backend in (("fused", c.sizes.fused_backend), ("reference", "reference")):
        save_dir = c.work / f"train-{label}"
        if save_dir.exists():
            shutil.rmtree(save_dir)  # the same updates from scratch: a leftover checkpoint would resume
        runs[label] = train_run(c, save_dir, n, 1, backend)
    return dict(updates=n, runs=runs, **compare_runs(runs["fused"], runs["reference"]))


def compare_runs(fused: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Relative loss differences (first update, worst logged update), and the speed and memory ratios."""
    a, b = dict(fused["losses"]), dict(ref["losses"])
    common = sorted(set(a) & set(b))
    rel = {s: abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in common}
    first = rel[common[0]] if common else math.nan
    worst = max(rel.values()) if rel else math.nan
    memory = "cuda_peak_allocated_mib" if fused.get("cuda_peak_allocated_mib") else "peak_rss_mib"
    return dict(
        loss_rel_diff_first_update=first,
        loss_rel_diff_max=worst,
        loss_agrees=bool(first <= FIRST_UPDATE_RTOL and worst <= RUN_RTOL),
        tolerances=dict(first_update=FIRST_UPDATE_RTOL, any_update=RUN_RTOL),
        tokens_per_s_ratio=fused["tokens_per_s"] / ref["tokens_per_s"],
        memory_figure=memory,
        memory_ratio=ref[memory] / fused[memory] if fused.get(memory) else None,
    )


def step_train(c: Check) -> dict[str, Any]:
    """Continue the fused run (it resumes from its checkpoint) for the updates that fit in the time left."""
    compare = c.record("train_compare")["figures"]
    fused = compare["runs"]["fused"]
    save_dir = c.work / "train-fused"
    reserve = 0.0 if c.done("evaluate") else step_cap(c, by_name("evaluate")) + 5.0
    c.step_deadline = min(c.step_deadline, c.deadline - reserve)
    seconds = c.step_left() - 1.2 * fused["overhead_s"] - 5.0
    more = int(0.9 * seconds / fused["s_per_update"]) if fused["s_per_update"] > 0 else 0
    start = read_steps(save_dir)
    target = start + more
    if c.sizes.train_updates_max:
        target = min(target, c.sizes.train_updates_max)
    if target <= start:
        raise StepFailed(f"no time for more updates: {seconds:.0f} s left after start-up and the evaluation, "
                         f"{fused['s_per_update']:.2f} s per update")  # fmt: skip
    c.log(f"training from update {start} to {target} ({fused['s_per_update']:.3f} s per update, {seconds:.0f} s)")
    run = train_run(c, save_dir, target, c.sizes.train_log_interval, c.sizes.fused_backend)
    return dict(from_update=start, to_update=target, **run)


def read_steps(save_dir: Path) -> int:
    """The update of the latest checkpoint in ``save_dir`` (its folder name checkpoint_<update>)."""
    found = sorted(save_dir.glob("checkpoint_*"))
    return int(found[-1].name.rsplit("_", 1)[-1]) if found else 0


def step_evaluate(c: Check) -> dict[str, Any]:
    save_dir = c.work / "train-fused"
    src, ref = c.corpus / "test.de", c.corpus / "test.en"
    if c.sizes.eval_sentences:
        n = c.sizes.eval_sentences
        src, ref = (write_head(p, c.work / f"test.first{n}.{p.suffix[1:]}", n) for p in (src, ref))
    out = c.work / "evaluate.json"
    out.unlink(missing_ok=True)
    c.python("-m", "janus", "evaluate", "--checkpoint", str(save_dir), "--src", str(src), "--ref", str(ref),
             "--modes", "ar,nar", "--beam-size", "5", "--iterations", "10", "--length-beam", "3",
             "--device", c.sizes.device, "--output-json", str(out))  # fmt: skip
    doc = json.loads(out.read_text())
    modes = {m: {k: r[k] for k in ("settings", "bleu", "chrf", "mean_passes", "seconds", "sentences_per_second")}
             for m, r in doc["modes"].items()}  # fmt: skip
    return dict(checkpoint_update=read_steps(save_dir), sentences=doc["sentences"], dtype=doc["dtype"],
                bleu_signature=doc["signatures"]["bleu"], modes=modes)  # fmt: skip


def write_head(src: Path, dst: Path, n: int) -> Path:
    with open(src, encoding="utf-8") as f:
        dst.write_text("".join(line for _, line in zip(range(n), f)), encoding="utf-8")
    return dst


RUNNERS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "build": step_build,
    "tests": step_tests,
    "kernels": step_kernels,
    "prepare": step_prepare,
    "profile": step_profile,
    "decode": step_decode,
    "decode_trained": step_decode_trained,
    "train_compare": step_train_compare,
    "train": step_train,
    "evaluate": step_evaluate,
}


def by_name(name: str) -> Step:
    return next(s for s in STEPS if s.name == name)


def step_cap(c: Check, step: Step) -> float:
    return step.dry_cap_s if c.sizes.mode == "cpu-dry-run" else step.cap_s


def why_not_run(c: Check, step: Step) -> Optional[str]:
    """Why ``step`` is skipped now (None: it runs)."""
    if step.name == "decode_trained" and not c.checkpoint:
        return "not requested: no --checkpoint"
    missing = [n for n in step.needs if not c.done(n)]
    if missing:
        return f"needs {', '.join(missing)}, not done"
    least = step.min_s if c.sizes.mode == "gpu" else 1.0
    if c.left() < least:
        return f"no time left: {max(0.0, c.left()):.0f} s of the budget remained, the step needs at least {least:.0f} s"
    return None


def run_step(c: Check, step: Step) -> None:
    old = c.record(step.name)
    cap = step_cap(c, step)
    c.step_deadline = c.deadline if cap == 0 else min(c.deadline, time.monotonic() + cap)
    c.tail.clear()
    c.log(f"\n== {step.name}: {step.title} (at most {max(0.0, c.step_left()):.0f} s) ==")
    t0 = time.monotonic()
    entry: dict[str, Any] = {"title": step.title, "cap_s": cap or None}
    try:
        entry["figures"] = RUNNERS[step.name](c)
        entry["status"] = "done"
    except StepTimeout as e:
        entry.update(status="timeout", reason=str(e), output_tail=list(c.tail))
        if e.figures is not None:
            entry["figures"] = e.figures
    except (StepFailed, OSError, ValueError, KeyError) as e:
        entry.update(status="failed", reason=f"{type(e).__name__}: {e}", output_tail=list(c.tail))
    entry["seconds"] = round(time.monotonic() - t0, 1)
    entry["finished"] = now()
    if entry["status"] != "done" and old.get("status") == "done":
        entry["previous"] = old  # never lose a finished step's figures to a failed --redo
    c.state["steps"][step.name] = entry
    reason = f": {entry['reason']}" if entry.get("reason") else ""
    c.log(f"== {step.name}: {entry['status']} in {entry['seconds']:.0f} s{reason}")
    c.save()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- report ---------------------------------------------------------------------------------------
def environment(sizes: Sizes) -> dict[str, Any]:
    """The harness's record (device, versions, git commit) plus what a GPU result needs besides."""
    import torch
    from harness import environment as harness_environment

    device = torch.device("cuda" if sizes.device == "cuda" and torch.cuda.is_available() else "cpu")
    env = harness_environment(device)
    env["cuda"] = torch.version.cuda
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                   gpu_count=torch.cuda.device_count())  # fmt: skip
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        env["nvcc"] = out[-1] if out else nvcc
    return env


def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return out + [""]


def summary(state: dict[str, Any]) -> str:
    """The markdown summary of ``state``: the steps, then each step's figures."""
    env, settings, steps = state.get("environment", {}), state["settings"], state["steps"]
    title = env.get("device_name", "(device not recorded yet)")
    lines = [f"# GPU check: {title}", ""]
    if settings["mode"] != "gpu":
        lines += ["**CPU dry run**: toy sizes on the CPU, Triton through its interpreter. No figure below is a GPU "
                  "figure.", ""]  # fmt: skip
    if env:
        lines += [f"torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
                  f"{env.get('nvcc', 'no nvcc')}; commit {env.get('git_commit')}; "
                  f"corpus `{settings['corpus']}`.", ""]  # fmt: skip
    rows = []
    for step in STEPS:
        r = steps.get(step.name, {})
        rows.append([step.name, r.get("status", "not run"), fmt(r.get("seconds"), ".0f"), fmt(r.get("cap_s"), ".0f"),
                     (r.get("reason") or step.title).replace("|", "/")])  # fmt: skip
    lines += ["## Steps", ""] + table(["step", "status", "seconds", "cap (s)", "what / why"], rows)
    lines += ["Runs: " + "; ".join(f"{r['started']} ({r['seconds']:.0f} s of {r['budget_s']:.0f})"
                                    for r in state.get("runs", [])), ""]  # fmt: skip

    def figures(name: str) -> Optional[dict[str, Any]]:
        """A step's figures: of this run (a timed-out step may have some), else of an earlier finished run."""
        r = steps.get(name, {})
        return r.get("figures") or (r.get("previous") or {}).get("figures")

    if b := figures("build"):
        unavailable = b.get("gpu_backends_unavailable") or {}
        lines += ["## Build", "", f"Extension: {(b.get('extension') or {}).get('detail')}.",
                  "GPU backends unavailable: " + ("none" if not unavailable else
                  "; ".join(f"{k} ({v})" for k, v in unavailable.items())) + ".",
                  f"Missing packages: {', '.join(b['missing_packages']) or 'none'}."]  # fmt: skip
        if e := b.get("error_path"):
            lines += [f"Error path of the compiled ops (a bad argument's message): {e.get('status')}"
                      + (f"; libstdc++: {e['libstdcxx']}" if e.get("libstdcxx") else "") + "."]  # fmt: skip
        lines += [""]
    if t := figures("tests"):
        ran = (f"killed at its cap after {t['finished']} tests" if t.get("partial")
               else f"{t['tests']} tests in {t['seconds']:.0f} s")  # fmt: skip
        lines += ["## Tests", "", f"`pytest -m \"{MARKERS}\"`: {ran}, {t['passed']} passed, {t['failed']} failed, "
                  f"{t['errors']} errors, {t['skipped']} skipped.", ""]  # fmt: skip
        lines += [f"- {f['kind'].upper()} {f['test']}: {f['message']}" for f in t["failures"]]
        lines += [f"- skipped ({n}): {reason}" for reason, n in t.get("skip_reasons", {}).items()] + [""]
    if k := figures("kernels"):
        lines += ["## Kernels against their references", ""]
        lines += table(["case", "size", "figure", "measured", "target", "met"],
                       [[t["case"], t["size"], t["figure"].replace("_vs_reference", " ratio"),
                         fmt(t["measured"], ".2f"), f">= {t['target']:g}",
                         fmt(t["met"]) if t["met"] is not None else t["why"]]
                        for t in k["targets"]])  # fmt: skip
        lines += table(["case", "backend", "us p50", "speedup", "peak MiB", "memory ratio"],
                       [[r["case"], r["backend"], fmt(r["us_p50"], ",.1f"), fmt(r.get("speedup_vs_reference"), ".2f"),
                         fmt(r.get("peak_mib"), ",.1f"), fmt(r.get("memory_vs_reference"), ".2f")]
                        for r in k["rows"]])  # fmt: skip
    if pr := figures("profile"):
        lines += ["## Profile of batch-1 decodes (random weights)", ""]
        for method, f in pr.items():
            lines += [f"{method}: {fmt(f['ms_per_sentence'], ',.1f')} ms per sentence, {fmt(f['passes'], '.1f')} "
                      "passes; the ops with the most host time (ms), then with the most device time:", ""]  # fmt: skip
            for key in ("top_host", "top_device"):
                if f[key]:
                    lines += table(["op", "calls", "self host ms", "self device ms"],
                                   [[r["op"], str(r["calls"]), fmt(r["self_cpu_ms"], ".2f"),
                                     fmt(r["self_device_ms"], ".2f")] for r in f[key][:8]])  # fmt: skip
    for name, heading in (("decode", "Decoding, random weights"), ("decode_trained", "Decoding a trained model")):
        if d := figures(name):
            lines += [f"## {heading}", "", "ms per sentence (p50, encoder included) and speedup over AR beam 5:", ""]
            lines += decode_table(d["rows"])
    if tc := figures("train_compare"):
        f, r = tc["runs"]["fused"], tc["runs"]["reference"]
        memory = tc["memory_figure"]
        lines += ["## Training: fused linear + loss against the reference", "",
                  f"{tc['updates']} updates each, same seed and batches; loss agreement (relative): first update "
                  f"{fmt(tc['loss_rel_diff_first_update'])} (<= {FIRST_UPDATE_RTOL:g}), worst update "
                  f"{fmt(tc['loss_rel_diff_max'])} (<= {RUN_RTOL:g}): {'agree' if tc['loss_agrees'] else 'DISAGREE'}.",
                  ""]  # fmt: skip
        peak = {"cuda_peak_allocated_mib": "peak MiB (CUDA allocated)", "peak_rss_mib": "peak MiB (process RSS)"}
        lines += table(["path", "backend", "target tokens/s", "s/update", peak[memory], "valid loss"],
                       [[label, x["backend"], fmt(x["tokens_per_s"], ",.0f"), fmt(x["s_per_update"], ".3f"),
                         fmt(x.get(memory), ",.0f"), fmt(x["valid"].get("loss"), ".3f")]
                        for label, x in (("fused", f), ("reference", r))])  # fmt: skip
        lines += [f"Fused / reference tokens/s: {fmt(tc['tokens_per_s_ratio'], '.2f')}; reference / fused peak memory: "
                  f"{fmt(tc['memory_ratio'], '.2f')}.", ""]  # fmt: skip
    if tr := figures("train"):
        v = tr["valid"]
        lines += ["## Training on while the time allows", "",
                  f"Updates {tr['from_update']} -> {tr['steps']} in {tr['seconds']:.0f} s, "
                  f"{fmt(tr['tokens_per_s'], ',.0f')} target tokens/s; validation NLL: P_AR {fmt(v.get('ar_nll'))}, "
                  f"P_NAR {fmt(v.get('nar_nll'))}, P_AUX {fmt(v.get('aux_nll'))}, "
                  f"length {fmt(v.get('length'))}.", ""]  # fmt: skip
    if ev := figures("evaluate"):
        lines += ["## BLEU on the test split", "", f"The model after {ev['checkpoint_update']} updates, "
                  f"{ev['sentences']} sentences, {ev['dtype']}; `{ev['bleu_signature']}`.", ""]  # fmt: skip
        lines += table(["mode", "settings", "BLEU", "chrF", "passes/sent", "sent/s"],
                       [[m, r["settings"], fmt(r["bleu"], ".2f"), fmt(r["chrf"], ".1f"), fmt(r["mean_passes"], ".1f"),
                         fmt(r["sentences_per_second"], ",.1f")] for m, r in ev["modes"].items()])  # fmt: skip
    return "\n".join(lines)


def decode_table(rows: list[dict[str, Any]]) -> list[str]:
    sizes = sorted({r["batch"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    at = {(r["method"], r["batch"]): r for r in rows}
    bleu = any(r.get("bleu") is not None for r in rows)
    # BLEU of the largest batch size: the most sentences.
    header = ["method"] + [f"b{b} ms" for b in sizes] + [f"b{b} vs beam5" for b in sizes]
    header += [f"BLEU (b{sizes[-1]})"] if bleu else []
    body = []
    for m in methods:
        cells = [m] + [fmt(at.get((m, b), {}).get("ms_p50"), ",.1f") for b in sizes]
        cells += [fmt(at.get((m, b), {}).get("vs_beam5"), ".2f") for b in sizes]
        if bleu:
            cells.append(fmt(at.get((m, sizes[-1]), {}).get("bleu"), ".2f"))
        body.append(cells)
    return table(header, body)


def plot_training(state: dict[str, Any], path: Path) -> None:
    """Training loss per update: the fused and the reference run, and the fused run continued."""
    from harness import pyplot

    steps = state["steps"]
    series = []
    if steps.get("train_compare", {}).get("status") == "done":
        for label, run in steps["train_compare"]["figures"]["runs"].items():
            series.append((f"{label} ({run['backend']})", run["losses"]))
    if steps.get("train", {}).get("status") == "done":
        series.append(("fused, continued", steps["train"]["figures"]["losses"]))
    plt = pyplot() if series else None
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, losses in series:
        ax.plot([s for s, _ in losses], [v for _, v in losses], marker=".", label=label)
    ax.set_xlabel("update")
    ax.set_ylabel("training loss")
    ax.set_title(f"janus objective, {state['settings']['sizes']['preset']} preset", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None, start: Optional[float] = None) -> dict[str, Any]:
    """Run the check (``start``: when its budget began, default now); returns the state written to OUT."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="every step at toy size on the CPU")
    p.add_argument("--corpus", default=str(REPO / "tests" / "data" / "libreoffice-de-en"),
                   help="folder with {train,valid,test}.{de,en} (default: the 3,000-pair slice in "
                   "tests/data)")  # fmt: skip
    p.add_argument("--checkpoint", default="", help="a trained model for step decode_trained (default: none)")
    p.add_argument("--out", default="", help="output folder, at most 8 files (default: benchmarks/results/gpu; "
                   "dry run: runs/gpu_check_dry_run)")  # fmt: skip
    p.add_argument("--work", default="", help="intermediate files: prepared data, checkpoints, raw results "
                   "(default: runs/gpu_check.work; dry run: runs/gpu_check_dry_run.work)")  # fmt: skip
    p.add_argument("--total-minutes", type=float, default=None,
                   help="budget of this command (default 8.75; dry run 5)")  # fmt: skip
    p.add_argument("--steps", default="", help=f"comma list of steps to consider (default: all of {STEP_NAMES})")
    p.add_argument("--redo", default="", help="comma list of steps to run again although done")
    p.add_argument("--fresh", action="store_true", help="forget the state in OUT and start over")
    args = p.parse_args(argv)
    sizes = DRY_RUN if args.cpu_dry_run else GPU
    args.out = args.out or str(REPO / ("runs/gpu_check_dry_run" if args.cpu_dry_run else "benchmarks/results/gpu"))
    # Outside the output folder, which is committed; runs/ is ignored by git.
    args.work = args.work or str(REPO / ("runs/gpu_check_dry_run.work" if args.cpu_dry_run else "runs/gpu_check.work"))
    # The commands run in the repository root: every path they get is absolute.
    for option in ("out", "work", "corpus", "checkpoint"):
        if getattr(args, option):
            setattr(args, option, str(Path(getattr(args, option)).resolve()))
    for option in ("steps", "redo"):
        unknown = set(filter(None, getattr(args, option).split(","))) - set(STEP_NAMES)
        if unknown:
            raise SystemExit(f"--{option} {getattr(args, option)}: unknown steps {sorted(unknown)}; "
                             f"choose from {', '.join(STEP_NAMES)}")  # fmt: skip
    if not args.cpu_dry_run and importlib.util.find_spec("torch") is not None:
        import torch

        if torch.version.cuda is None:
            raise SystemExit(f"torch {torch.__version__} has no CUDA: run the GPU check on a GPU machine, "
                             "or pass --cpu-dry-run")  # fmt: skip
    # benchmarks/harness.py imports janus, which the build step installs: until then it is the repository.
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))

    c = Check(args, sizes, start if start is not None else time.monotonic())
    c.out.mkdir(parents=True, exist_ok=True)
    c.work.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in STEPS if not args.steps or s.name in args.steps.split(",")]
    redo = set(filter(None, args.redo.split(",")))
    c.log(f"\n#### gpu_check {sizes.mode} started {now()}: budget {c.total_s:.0f} s, output {c.out}, work {c.work}")
    run = {"started": now(), "seconds": 0.0, "budget_s": c.total_s}
    c.state["runs"].append(run)
    for step in chosen:
        if c.done(step.name) and step.name not in redo:
            c.log(f"== {step.name}: done in an earlier run, skipped (--redo {step.name} runs it again)")
            continue
        reason = why_not_run(c, step)
        if reason:
            c.state["steps"][step.name] = {**{k: v for k, v in c.record(step.name).items() if k == "previous"},
                                           "title": step.title, "status": "skipped", "reason": reason,
                                           "cap_s": step_cap(c, step) or None}  # fmt: skip
            c.log(f"== {step.name}: skipped: {reason}")
            c.save()
            continue
        run_step(c, step)
        run["seconds"] = round(time.monotonic() - c.start, 1)
    c.state["environment"] = environment(sizes)
    plot_training(c.state, c.out / "training.png")
    run["seconds"] = round(time.monotonic() - c.start, 1)
    c.save()
    files = sorted(p.name for p in c.out.iterdir())
    if len(files) > MAX_FILES:
        raise SystemExit(f"{c.out} holds {len(files)} files, more than {MAX_FILES}: {files}")
    c.log(f"#### gpu_check finished in {run['seconds']:.0f} s: {c.out / SUMMARY}")
    return c.state


if __name__ == "__main__":
    main(start=START)
