"""Entry point: `python -m tsched.main --config=configs/<exp>.py[:<arg>] [--config.<field>=<value> ...]`.

The last line printed is the path of the run's summary.json. A bad config (unknown field, wrong type,
value out of range, name not registered, a budget the data does not fit, a run directory written by a
different config) prints one line naming the field to stderr and exits with status 2, before anything is
written to the run directory.

A run that stops early prints one line to stderr and exits with (see `tsched.train.trainer`):
143 preempted by SIGTERM / SIGINT (a checkpoint of the finished step was written; rerun with
`--config.train.resume=auto` to continue), 3 too many non-finite steps in a row, 4 a checkpoint could not
be written (the message names the path).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.", lock_config=True)
EXIT_CONFIG_ERROR = 2


def config_error(message: str) -> None:
    """One line on stderr and exit 2. A config file that raised comes wrapped in its traceback by absl:
    keep the flag and the exception's own line."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    print(f"tsched: config error: {' '.join(lines[:1] + lines[1:][-1:])}", file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a failed config override reported as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        config_error(str(e))
    except (AttributeError, KeyError) as e:  # an override of a field the config does not have
        key = str(e).strip("\"'")
        named = [a.split("=")[0][len("--config."):] for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
        config_error(f"unknown config field {named[0] if named else key!r}: {e}")
    except (TypeError, ValueError) as e:  # raised by the config file's get_config(arg) or an override
        config_error(f"{type(e).__name__}: {e}".replace("\n", " "))


def main(argv):
    if len(argv) > 1:
        config_error(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    from tsched import multihost
    from tsched.config import ConfigError, validate  # before the heavy imports of the trainer

    try:
        multihost.initialize(_CONFIG.value.mesh)  # multi-host: before JAX is asked for its devices
        validate(_CONFIG.value)
        from tsched.train import trainer

        try:
            print(trainer.run(_CONFIG.value))
        except Exception as e:  # noqa: BLE001 - only the early stops below are turned into a status
            status = trainer.exit_status(e)
            if status is None:
                raise
            print(f"tsched: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Everything is on disk (saves are synchronous): skip interpreter teardown, where checkpointer
            # and XLA threads still running at a preemption crashed the process (SIGSEGV) now and then.
            os._exit(status)
    except ConfigError as e:
        config_error(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
