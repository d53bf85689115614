"""Built-in client plugins, one module each; importing this package registers them all in ``PLUGINS``.

Each module holds a technique's functional form and its plugin class. A new plugin module must be
imported here. The modules import :mod:`fedsim.clients.plugin_api`, which never imports this
package, so there is no import cycle.
"""

from fedsim.clients.plugins.dp_sgd import DPSGD, preflight
from fedsim.clients.plugins.fedld_margin import FedLDMargin, margin_penalty
from fedsim.clients.plugins.fedprox import FedProx

__all__ = ["DPSGD", "FedLDMargin", "FedProx", "margin_penalty", "preflight"]
