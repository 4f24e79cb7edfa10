"""Caching strategies, chosen per namespace by name."""

from __future__ import annotations

from cachecoord.config import StrategyName
from cachecoord.strategies.base import Backends, Strategy, StrategyKind
from cachecoord.strategies.cache_aside import CACHE_ASIDE
from cachecoord.strategies.write_behind import WRITE_BEHIND
from cachecoord.strategies.write_through import WRITE_THROUGH

STRATEGIES: dict[StrategyName, StrategyKind] = {
    StrategyName.CACHE_ASIDE: CACHE_ASIDE,
    StrategyName.WRITE_THROUGH: WRITE_THROUGH,
    StrategyName.WRITE_BEHIND: WRITE_BEHIND,
}

__all__ = ["STRATEGIES", "Backends", "Strategy", "StrategyKind"]
