"""Run under `paddle.distributed.launch --nproc_per_node 2`: StopSignals.requested() after each of many
short steps, twice: over the default gloo group, then as on a GPU run (the default group said to be
NCCL, so the flag goes through a gloo group of its own). Rank 1 signals itself SIGUSR1 at step
SIGNAL_AT. The ranks aim at different check intervals: they must still check on the same steps.
Writes rank<r>.json: per run, the steps with a collective, their groups, the stop step and, on rank 1,
the seconds from the signal to the stop.
"""
import json
import os
import signal
import sys
import time

import paddle
import paddle.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from ppmoco.engine import preemption  # noqa: E402

STEP_SECONDS, SIGNAL_AT, LIMIT = 0.002, 200, 5000
out_dir = sys.argv[1]
dist.init_parallel_env()
rank = dist.get_rank()
all_reduce = dist.all_reduce


def run():
    state = {"step": 0, "collectives": [], "groups": set()}

    def spy(tensor, *args, group=None, **kwargs):
        state["collectives"].append(state["step"])
        state["groups"].add("default" if group is None else f"{group.backend}:{group.id}")
        return all_reduce(tensor, *args, group=group, **kwargs)

    dist.all_reduce = spy
    signalled = None
    with preemption.StopSignals(check_seconds=0.05 if rank == 0 else 0.2) as stop:
        while state["step"] < LIMIT:
            time.sleep(STEP_SECONDS)
            all_reduce(paddle.ones([4]))  # the step's own collective (gradients) on the default group
            state["step"] += 1
            if rank == 1 and state["step"] == SIGNAL_AT:
                signalled = time.monotonic()
                os.kill(os.getpid(), signal.SIGUSR1)
            if stop.requested():
                break
    dist.all_reduce = all_reduce
    return {"collectives": state["collectives"], "groups": sorted(state["groups"]), "stopped": state["step"],
            "received": stop.received, "checks": stop.checks,
            "latency": None if signalled is None else time.monotonic() - signalled}


results = {"gloo": run()}
preemption._cpu_groups.clear()
dist.get_backend = lambda group=None: "NCCL"
results["nccl"] = run()
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(results, f)
