"""The IMP driver: train, prune, rewind, repeat; controls, replicates, run directories, resume and reports.

``lthfast.imp.run(config, model_fn=..., data=...)`` from Python; ``lthfast imp`` / ``lthfast report`` /
``lthfast demo`` on the command line; ``lthfast.imp.report.report(run_dir)`` rebuilds a run's table and plots.
"""

from lthfast.imp.config import Config
from lthfast.imp.driver import RunResult, run
from lthfast.imp.errors import CheckpointError, ConfigError, ImpError, RunDirError

__all__ = ["CheckpointError", "Config", "ConfigError", "ImpError", "RunDirError", "RunResult", "run"]
