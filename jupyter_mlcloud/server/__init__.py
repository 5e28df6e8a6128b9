"""jupyter_server extension: REST endpoints under ``/mlcloud/``, thin over the Python API."""

from __future__ import annotations

from typing import Any

from .handlers import ENDPOINTS_KEY, FEEDS_KEY, LISTS_KEY, route_table


def install(web_app: Any) -> None:
    """Add the routes, and the live state they share, to a tornado application."""
    from ..serving.board import Board
    from . import feeds

    live = feeds.Feeds()
    web_app.settings[FEEDS_KEY] = live
    web_app.settings[LISTS_KEY] = feeds.ListWatcher(live)
    web_app.settings[ENDPOINTS_KEY] = Board()
    web_app.add_handlers(".*$", route_table(web_app.settings["base_url"]))


def _load_jupyter_server_extension(server_app: Any) -> None:
    from ..cluster import api as clusters
    from ..tracking import store

    clusters.OWNER = "jupyter-server"  # clusters started from the sidebar say who holds them
    store.default_in(server_app.root_dir)  # the MLflow UI and the Models list read it
    install(server_app.web_app)
    server_app.log.info("jupyter_mlcloud server extension loaded at %smlcloud/",
                        server_app.web_app.settings["base_url"])


# Older jupyter_server versions look for this name.
load_jupyter_server_extension = _load_jupyter_server_extension
