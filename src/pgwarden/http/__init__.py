"""The monitor's HTTP endpoints, as an ASGI app: see `create_app`.

Needs the ``starlette`` and ``prometheus_client`` packages.
"""

from .app import create_app

__all__ = ["create_app"]
