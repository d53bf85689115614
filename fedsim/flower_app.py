"""The Flower app objects that ``flwr run`` loads (deployment and ``flwr run`` simulation).

Both read the scenario from the run config: ``scenario`` holds the resolved scenario as TOML
text, ``out-dir`` the run directory the ServerApp writes (on the SuperLink's machine). Each
process that imports this module (``flwr-serverapp``, one ``flwr-clientapp`` per message)
rebuilds the scenario from that text, so the same two objects run unchanged on every engine.
"""

from __future__ import annotations

from fedsim.catalog import registries
from fedsim.clients.client_app import build_client_app
from fedsim.server import build_server_app

# Fill every registry (strategies' client tasks ``train.<task>`` included) before the ClientApp is
# built; the ServerApp resolves the scenario it reads from the run config.
registries()

server_app = build_server_app()
client_app = build_client_app()

__all__ = ["server_app", "client_app"]
