"""paddle.profiler over a window of training steps, configured by the `Profiler` section (FleetX's keys).

`scheduler: [start, end]` records the steps start..end-1 (counted from 0 in this run), null every
step; each process writes a Chrome trace (chrome://tracing, VisualDL's profiler view) into
`profiler_log` and, when the run ends, logs Paddle's summary tables: the overview, model, operator
and kernel views, or every view with `detailed`. Profiling slows the steps it records.
"""
import logging
import os

import paddle.profiler as profiler

logger = logging.getLogger("ppmoco")


class StepProfiler:
    def __init__(self, cfg, device):
        targets = [profiler.ProfilerTarget.CPU] + ([profiler.ProfilerTarget.GPU] if device == "gpu" else [])
        self.log_dir = cfg["profiler_log"]
        self.detailed = cfg["detailed"]
        self.sort = profiler.SortedKeys.GPUTotal if device == "gpu" else profiler.SortedKeys.CPUTotal
        scheduler = None if cfg["scheduler"] is None else tuple(cfg["scheduler"])
        os.makedirs(self.log_dir, exist_ok=True)
        self._profiler = profiler.Profiler(targets=targets, scheduler=scheduler,
                                           on_trace_ready=profiler.export_chrome_tracing(self.log_dir),
                                           record_shapes=cfg["record_shapes"],
                                           profile_memory=cfg["profile_memory"])
        self._profiler.start()
        logger.warning(f"Profiler.enable: profiling training steps {cfg['scheduler'] or 'all'} into "
                       f"{self.log_dir}; steps run slower while recorded")

    def step(self):
        self._profiler.step()

    def close(self):
        self._profiler.stop()
        views = None if self.detailed else [profiler.SummaryView.OverView, profiler.SummaryView.ModelView,
                                            profiler.SummaryView.OperatorView, profiler.SummaryView.KernelView]
        self._profiler.summary(sorted_by=self.sort, views=views)
        logger.info(f"profiler traces in {self.log_dir}; view them with: visualdl --logdir {self.log_dir}")
