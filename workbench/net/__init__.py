"""Network shaping: a TCP proxy that adds round-trip time and a bandwidth cap (no netem here)."""

from workbench.net.shape import PRESETS, LinkPreset, ProxyStatistics, ShapingProxy, TokenBucket

__all__ = ["PRESETS", "LinkPreset", "ProxyStatistics", "ShapingProxy", "TokenBucket"]
