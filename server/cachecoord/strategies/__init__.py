"""Caching strategies, chosen per namespace by name."""

from __future__ import annotations

from cachecoord.config import StrategyName
from cachecoord.strategies.base import Backends, Strategy
from cachecoord.strategies.cache_aside import CacheAside
from cachecoord.strategies.write_behind import WriteBehind
from cachecoord.strategies.write_through import WriteThrough

STRATEGIES: dict[StrategyName, type[Strategy]] = {
    StrategyName.CACHE_ASIDE: CacheAside,
    StrategyName.WRITE_THROUGH: WriteThrough,
    StrategyName.WRITE_BEHIND: WriteBehind,
}

__all__ = ["STRATEGIES", "Backends", "Strategy"]
