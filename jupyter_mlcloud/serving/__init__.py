"""Real-time inference endpoints: model replicas on Dask workers, each an Open Inference
Protocol v2 server (uvicorn + Starlette, TLS and a bearer token by default) with its own
dynamic batcher and Prometheus metrics.

- :mod:`.security`: per-endpoint self-signed certificates and bearer tokens;
- :mod:`.batching`: the per-replica dynamic batcher (bounded queue, SLO, timings);
- :mod:`.protocol`: Open Inference Protocol tensors, in JSON and Triton's binary extension;
- :mod:`.metrics`: a replica's Prometheus registry;
- :mod:`.runner`: the model on a worker (loaded once, on its GPU when it has one);
- :mod:`.replica`: the ASGI app of one replica (routes, auth, limits, errors);
- :mod:`.host`: on a worker, the uvicorn servers of its replicas (start, stop, list);
- :mod:`.launch`: from the kernel, a replica started on a worker and stopped again;
- :mod:`.router`: on a worker, an endpoint's one URL over its replicas (least outstanding
  requests, retries on another replica);
- :mod:`.api`: from the kernel, ``serve`` and ``endpoints``: an endpoint's router and
  replicas, described on the cluster so any client of its scheduler can manage it.
"""
