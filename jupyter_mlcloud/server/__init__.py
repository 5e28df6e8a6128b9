"""jupyter_server extension: REST endpoints under ``/mlcloud/``, thin over the Python API."""

from __future__ import annotations

from typing import Any

from .handlers import route_table


def _load_jupyter_server_extension(server_app: Any) -> None:
    from .. import clusters

    clusters.OWNER = "jupyter-server"  # clusters started from the sidebar say who holds them
    web_app = server_app.web_app
    base_url = web_app.settings["base_url"]
    web_app.add_handlers(".*$", route_table(base_url))
    server_app.log.info("jupyter_mlcloud server extension loaded at %smlcloud/", base_url)


# Older jupyter_server versions look for this name.
load_jupyter_server_extension = _load_jupyter_server_extension
