"""sosp: second-order structured pruning (SOSP-H / SOSP-I) experiment runner."""

__version__ = "0.1.0"
