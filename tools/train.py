"""Train a method from a YAML config: python [-m paddle.distributed.launch] tools/train.py -c CFG [-o k=v]."""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppmoco.cli import on_fatal, parse_args, run  # noqa: E402
from ppmoco.config import load_config  # noqa: E402


def main(argv=None):
    args = parse_args(__doc__, argv)
    cfg = load_config(args.config, args.override)
    from ppmoco.engine import Engine, setup_environment, setup_logger
    from ppmoco.engine.lock import training_lock
    from ppmoco.modules import build_module

    env = setup_environment(cfg["Global"], cfg["Distributed"])
    # Before anything is written there; `attempt`: which run of a job the launcher may restart this is.
    with training_lock(cfg["Engine"]["save_load"]["output_dir"], env) as attempt:
        setup_logger(cfg["Engine"]["save_load"]["output_dir"], env.is_main)
        module = build_module(cfg["Model"])
        engine = Engine(cfg, module, env, attempt=attempt)
        on_fatal(engine.record_failure)
        engine.fit()
        if env.is_main:
            from ppmoco.report import write_report

            path = write_report(cfg["Engine"]["save_load"]["output_dir"], args.config, load_config(args.config),
                                cfg, engine.last_results)
            print(f"wrote {path}")


if __name__ == "__main__":
    run(main, preferred_allocator=True)
