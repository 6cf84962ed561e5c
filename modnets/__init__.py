"""modnets: when and how are modular neural networks better than dense ones?"""

from pathlib import Path

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent
# The config tree: the copy a wheel ships (site-packages/modnets/conf), else conf/ at the top of the
# checkout this package sits in (a clone, an editable install). Hydra and the config checks read it here.
CONF_DIR = _HERE / "conf" if (_HERE / "conf" / "config.yaml").is_file() else _HERE.parent / "conf"
