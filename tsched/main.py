"""Entry point: `python -m tsched.main --config=configs/<exp>.py [--config.<field>=<value> ...]`.

The last line printed is the path of the run's summary.json.
"""

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.", lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    from tsched.config import validate  # validate before the heavy imports of the trainer
    validate(_CONFIG.value)
    from tsched.train import trainer

    print(trainer.run(_CONFIG.value))


if __name__ == "__main__":
    app.run(main)
