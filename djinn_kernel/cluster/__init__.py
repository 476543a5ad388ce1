"""Djinn on a Ray cluster: one engine per GPU, each session routed to the engine that holds it (docs/cluster.md).

``connect_cluster()`` starts or joins Ray and returns a backend with the engine's methods; pass it to
``djinn_kernel.load(name, backend=...)``. Ray is imported only when a cluster is started (``pip install
'djinn-kernel[ray]'``); the placement policy (placement.py) needs no Ray.
"""

from .placement import EngineLoad, Placement, place

__all__ = ["ClusterBackend", "EngineLoad", "Placement", "connect_cluster", "place"]


def __getattr__(name: str) -> object:
    if name in ("ClusterBackend", "connect_cluster"):  # these import torch and the engine: on first use only
        from . import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'djinn_kernel.cluster' has no attribute {name!r}")
