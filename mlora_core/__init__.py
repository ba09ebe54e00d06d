"""mlora core: hooks, registries, config, the multi-job batch and the training engine.

The core knows no model family, adapter maths or scheduling strategy; those are plugins.
"""

from __future__ import annotations

__version__ = "0.1.0"
