"""`--network_module lorakit.kohya` for kohya's sd-scripts; see lorakit.network.kohya."""
from lorakit.network.kohya import *  # noqa: F401,F403
