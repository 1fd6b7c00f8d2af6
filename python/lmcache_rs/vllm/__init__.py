"""lmcache_rs inside vLLM: the KV connector (connector.py).

    --kv-transfer-config '{"kv_connector": "LMCacheRsConnector",
                           "kv_connector_module_path": "lmcache_rs.vllm", "kv_role": "kv_both"}'

``LMCacheRsConnector`` loads (and imports vLLM) on first use; ``import lmcache_rs`` never
imports vLLM, and the vLLM-free parts (layout, plan, rank_channel, controller_client) import
without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LMCacheRsConnector"]


def __getattr__(name: str) -> Any:
    if name != "LMCacheRsConnector":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .connector import LMCacheRsConnector

    globals()[name] = LMCacheRsConnector
    return LMCacheRsConnector
