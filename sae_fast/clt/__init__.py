"""Cross-layer transcoders: the module (module.py) and its config without the module
(config.py, which the formats read and write), and the TopK-to-JumpReLU calibration
(calibrate.py). Names import on first use, so the formats can
import the config without the module."""

from ..lazy import exports

_EXPORTS = {
    "CLTOutput": ".module",
    "CrossLayerTranscoder": ".module",
    "to_jumprelu": ".calibrate",
}
__all__ = sorted(_EXPORTS)
__getattr__ = exports(__name__, _EXPORTS)
