"""The gRPC service around the engine: servicer, serve (the life cycle) and its settings
(config), security, admission, the memory estimate, interceptors, metrics, status mapping,
health, listening addresses, signals and logs.

The in-process engine is :mod:`gramstyle.engine`. ``from gramstyle.server import
StyleTransfer`` (and the other engine names) still works for one release, as a deprecated
alias that warns; import them from :mod:`gramstyle.engine` (and the option and result types
from :mod:`gramstyle.options` and :mod:`gramstyle.results`).
"""

import warnings
from importlib import import_module

# Deprecated aliases, kept for one release (0.1.x): name -> the module that defines it now.
_DEPRECATED = {
    "Cancelled": "gramstyle.engine.stop",
    "StyleTransfer": "gramstyle.engine.transfer",
    "StyleOptions": "gramstyle.options",
    "LossReport": "gramstyle.results",
    "Losses": "gramstyle.results",
    "Progress": "gramstyle.results",
    "StylizeResult": "gramstyle.results",
}


def __getattr__(name: str):
    if name in _DEPRECATED:
        module = _DEPRECATED[name]
        public = "gramstyle.engine" if module.startswith("gramstyle.engine") else module
        warnings.warn(
            f"gramstyle.server.{name} is deprecated and will be removed in 0.2: "
            f"import it from {public}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(import_module(module), name)
    raise AttributeError(f"module 'gramstyle.server' has no attribute {name!r}")
