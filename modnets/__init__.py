"""modnets: when and how are modular neural networks better than dense ones?"""

import os
import sys
from pathlib import Path

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent
# The config tree: the copy a wheel ships (site-packages/modnets/conf), else conf/ at the top of the
# checkout this package sits in (a clone, an editable install). Hydra and the config checks read it here.
CONF_DIR = _HERE / "conf" if (_HERE / "conf" / "config.yaml").is_file() else _HERE.parent / "conf"


def cli() -> None:
    """The `modnets-train` command (and `python -m modnets.train`). W&B's worker process starts
    first, so that wandb's import overlaps torch's (modnets.logger.prelaunch). A single run ends
    with `os._exit` once its files are written and every W&B run is finished: the interpreter's
    own teardown of torch's modules would add about half a second and write nothing. Sweeps, and
    errors that are not a clean exit, end the ordinary way."""
    from modnets import logger

    logger.prelaunch(sys.argv[1:], CONF_DIR)
    try:
        from modnets import train

        train.main()
        code = 0
    except SystemExit as e:
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        logger.discard()  # a prelaunched worker no run adopted (W&B off, a config error)
    ran = getattr(sys.modules.get("modnets.train"), "RUNS", [])
    if ran and not any(ran):  # runs of this process, none a sweep job: nothing left to finish
        import logging

        logging.shutdown()  # Hydra's job log (train.log) flushed and closed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
