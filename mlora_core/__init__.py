"""mlora core: the plugin API, the config, the base model, the training engine, evaluation,
generation and the ``mlora`` command (see docs/architecture.md for the module map).

The core knows no model family, adapter maths, scheduling strategy, data format or metric
sink; those are plugins.
"""

from __future__ import annotations

__version__ = "0.2.0"
