"""Training infrastructure shared by all methods."""
from ppmoco.engine.engine import Engine
from ppmoco.engine.env import RunEnv, setup_environment
from ppmoco.engine.logger import setup_logger

__all__ = ["Engine", "RunEnv", "setup_environment", "setup_logger"]
