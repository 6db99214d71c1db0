"""Memory over a long run, measured: the training process's resident memory (RSS) while tools/train.py
trains the digits config for --steps steps; a leak (the queue, fetched tensors, logs kept per step)
shows as growth after the first steps.

    python tools/benchmark_memory.py --steps 400 --json output/bench/memory_digits.json

The run is a tools/train.py process of its own (one process, Global.num_threads 1, no evaluation
or checkpoints); RSS is sampled from /proc every 0.2 s together with the last step its log shows.
Growth is reported per 100 steps from step --settle to the step before the last (allocator pools fill
in the first steps; the last writes a checkpoint); the peak includes that write.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import run, tool_parser  # noqa: E402
from ppmoco.fileio import write_text_atomic  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def parse(argv):
    parser = tool_parser(__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--settle", type=int, default=50, help="steps before growth is counted")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not 0 < args.settle < args.steps:
        parser.error("--settle must lie in (0, --steps)")
    return args


def rss_mb(pid):
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def last_step(log):
    if not os.path.isfile(log):
        return 0
    with open(log, encoding="utf-8") as f:
        steps = re.findall(r"\[train\] epoch: \d+/\d+, step: \[\d+/\d+\].*", f.read())
    return len(steps)  # logging_freq 1: one line per step


def measure(steps, settle):
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", "configs/mocov2_pt_digits_1n2c.yaml"]
        for o in (f"Engine.save_load.output_dir={out}", f"Engine.max_steps={steps}",
                  "Engine.logging_freq=1", "Engine.eval_freq=-1", "Engine.save_load.save_epoch=0",
                  "Global.num_threads=1", "Data.Train.loader.num_workers=0", f"Engine.num_train_epochs={steps}"):
            cmd += ["-o", o]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples = []  # (step, rss MiB)
        log = os.path.join(out, "train.log")
        while proc.poll() is None:
            try:
                samples.append((last_step(log), rss_mb(proc.pid)))
            except (OSError, AttributeError):
                pass
            time.sleep(0.2)
        if proc.returncode != 0:
            raise SystemExit(f"tools/train.py failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    # Up to the last step before the end: the end writes a checkpoint and the run's report, which is
    # not growth over steps.
    after = [rss for step, rss in samples if settle <= step < steps]
    at_settle, at_end = after[0], after[-1]
    return {"rss_at_settle_mb": round(at_settle, 1), "rss_before_end_mb": round(at_end, 1),
            "peak_rss_mb": round(max(rss for _, rss in samples), 1),
            "growth_mb_per_100_steps": round(100 * (at_end - at_settle) / (steps - 1 - settle), 2),
            "series": [(step, round(rss, 1)) for step, rss in samples[::10]]}


def main(argv=None):
    args = parse(argv)
    from ppmoco.fast_path import cpu_info

    result = {"steps": args.steps, "settle": args.settle, "config": "configs/mocov2_pt_digits_1n2c.yaml",
              "cpu": cpu_info(), "run": measure(args.steps, args.settle)}
    r = result["run"]
    print(f"RSS {r['rss_at_settle_mb']} MiB at step {args.settle}, {r['rss_before_end_mb']} MiB at step "
          f"{args.steps - 1} ({r['growth_mb_per_100_steps']:+} MiB per 100 steps), peak {r['peak_rss_mb']} MiB")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    run(main)
