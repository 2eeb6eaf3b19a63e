"""Overhead of routing monitoring on training steps of the ``small`` preset.

Runs plain training steps (forward + backward + AdamW) and alternates steps *with* and *without* the
``routing.jsonl`` callback (:class:`moe_lab.train.callbacks.router_monitor.RouterMonitorCallback`, every step,
co-selection every 50) and, separately, with the forward-hook :class:`moe_lab.analytics.RouterMonitor`.
Reports the median step times, the overhead from their difference, and the time spent inside the monitoring
code itself (a less noisy measure). Appends a section to ``benchmarks/RESULTS.md`` with ``--append``.

Run:
    python benchmarks/monitor_overhead.py --steps 30 --batch 8 --seq 128 --append
    python benchmarks/monitor_overhead.py --quick --out results.json   # CI size, compare.py records
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_lab.analytics import RouterMonitor
from moe_lab.bench import appending_enabled, record, write_records
from moe_lab.models import MoEModel
from moe_lab.train.callbacks.router_monitor import RouterMonitorCallback


class _Trainer:
    def __init__(self, model: torch.nn.Module, path: Path) -> None:
        self.model = model
        self.run_dir = type("RD", (), {"path": path})()
        self.summary_extra: dict[str, object] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(steps: int, batch: int, seq: int, device: str, dtype: str) -> dict[str, float | str]:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = MoEModel.from_preset("small").to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    vocab = model.config.vocab_size
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bf16" else None
    tmp = Path(tempfile.mkdtemp())
    trainer = _Trainer(model, tmp)
    cb = RouterMonitorCallback(every=1, co_selection_every=50)
    cb.on_train_begin(trainer)
    monitor = RouterMonitor(co_selection=True)
    times: dict[str, list[float]] = {"none": [], "callback": [], "hooks": []}
    cpu: dict[str, list[float]] = {"none": [], "callback": [], "hooks": []}
    inside: dict[str, list[float]] = {"callback": [], "hooks": []}
    inside_cpu: dict[str, list[float]] = {"callback": [], "hooks": []}

    def step(mode: str, i: int) -> None:
        ids = torch.randint(0, vocab, (batch, seq), device=dev)
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        ctx = monitor.track(model) if mode == "hooks" else _Null()
        with ctx:
            if amp is not None:
                with amp:
                    out = model(ids, labels=ids)
            else:
                out = model(ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if mode == "callback":
                t1, c1 = time.perf_counter(), time.process_time()
                cb.on_routing(trainer, i, [d.detach() for d in out.routing])
                inside["callback"].append(time.perf_counter() - t1)
                inside_cpu["callback"].append(time.process_time() - c1)
            if mode == "hooks":
                t1, c1 = time.perf_counter(), time.process_time()
                monitor.end_step(i)
                inside["hooks"].append(time.perf_counter() - t1)
                inside_cpu["hooks"].append(time.process_time() - c1)
        _sync(dev)
        times[mode].append(time.perf_counter() - t0)
        cpu[mode].append(time.process_time() - c0)

    for i in range(3):  # warm-up
        step("none", -1 - i)
    order = ["none", "callback", "none", "hooks"]
    rng = random.Random(0)
    for i in range(steps):
        rng.shuffle(order)  # no mode always runs right after another: position effects average out
        for mode in order:
            step(mode, i)
    cb.on_train_end(trainer, None)
    base = statistics.median(times["none"])
    base_cpu = statistics.median(cpu["none"])
    res: dict[str, float | str] = {"device": device, "dtype": dtype, "step_s": base, "step_cpu_s": base_cpu}
    for mode in ("callback", "hooks"):
        res[f"{mode}_step_s"] = statistics.median(times[mode])
        res[f"{mode}_overhead_pct"] = 100 * (statistics.median(times[mode]) - base) / base
        res[f"{mode}_inside_ms"] = 1000 * statistics.median(inside[mode])
        res[f"{mode}_inside_pct"] = 100 * statistics.median(inside[mode]) / base
        res[f"{mode}_cpu_overhead_pct"] = 100 * (statistics.median(cpu[mode]) - base_cpu) / base_cpu
        res[f"{mode}_inside_cpu_pct"] = 100 * statistics.median(inside_cpu[mode]) / base_cpu
    # the hook path's work happens during forward; time it directly on the last outputs
    ids = torch.randint(0, vocab, (batch, seq), device=dev)
    with torch.no_grad():
        out = model(ids)
    probe = RouterMonitor(co_selection=True)
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(10):
        probe.observe(out.routing)
    _sync(dev)
    res["observe_ms"] = 100 * (time.perf_counter() - t0)
    res["observe_pct"] = 100 * (time.perf_counter() - t0) / 10 / base
    res["observe_cpu_pct"] = 100 * (time.process_time() - c0) / 10 / base_cpu
    return res


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = default)")
    p.add_argument("--append", action="store_true", help="append the result to benchmarks/RESULTS.md")
    p.add_argument("--quick", action="store_true", help="CI size: 6 rounds, batch 4 x seq 64")
    p.add_argument("--out", help="write compare.py records (JSON) here")
    args = p.parse_args()
    if args.quick:
        args.steps, args.batch, args.seq = min(args.steps, 6), min(args.batch, 4), min(args.seq, 64)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args.steps, args.batch, args.seq, args.device, args.dtype)
    lines = [
        f"- device {res['device']} ({args.dtype}), small preset, batch {args.batch} x seq {args.seq}, "
        f"{args.steps} alternating rounds, torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"- median step without monitoring: {1000 * float(res['step_s']):.1f} ms wall, "
        f"{1000 * float(res['step_cpu_s']):.1f} ms process CPU time",
        f"- routing.jsonl callback (every step, co-selection every 50): step {1000 * float(res['callback_step_s']):.1f}"
        f" ms -> overhead {float(res['callback_overhead_pct']):+.2f}% (difference of medians); time inside the "
        f"callback {float(res['callback_inside_ms']):.2f} ms = {float(res['callback_inside_pct']):.2f}% of a step; "
        f"in CPU time: overhead {float(res['callback_cpu_overhead_pct']):+.2f}%, inside "
        f"{float(res['callback_inside_cpu_pct']):.2f}%",
        f"- RouterMonitor forward hooks (with co-selection): step {1000 * float(res['hooks_step_s']):.1f} ms -> "
        f"overhead {float(res['hooks_overhead_pct']):+.2f}% (in CPU time {float(res['hooks_cpu_overhead_pct']):+.2f}%); "
        "RouterMonitor.observe alone "
        f"{float(res['observe_ms']):.2f} ms = {float(res['observe_pct']):.2f}% of a step "
        f"({float(res['observe_cpu_pct']):.2f}% in CPU time)",
        f"- machine load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(other jobs share the cores: wall-clock differences are noisy; the 'inside' figures are direct)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:  # step time with monitoring / without (1.0 = free); CPU time is the steadier measure
        write_records(
            args.out,
            [
                record(
                    "monitor_overhead/callback_cpu_step_ratio",
                    1 + float(res["callback_cpu_overhead_pct"]) / 100,
                    higher_is_better=False,
                ),
                record(
                    "monitor_overhead/hooks_cpu_step_ratio",
                    1 + float(res["hooks_cpu_overhead_pct"]) / 100,
                    higher_is_better=False,
                ),
            ],
        )
    if args.append and appending_enabled():
        path = Path(__file__).resolve().parent / "RESULTS.md"
        head = "" if path.exists() else "# Benchmark results\n"
        cmd = "python benchmarks/monitor_overhead.py " + " ".join(sys.argv[1:])
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{head}\n## Router monitoring overhead ({stamp})\n\nCommand: `{cmd}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
