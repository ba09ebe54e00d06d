"""The plugin API: the hooks, the contracts plugins implement, the registries and the plugin host.

Plugin authors import from here (``mlora_core.plugin_api.hookspecs``, ``.protocols``,
``.scheduling``, ``.routing``, ``.data``, ``.conventions``), from
``mlora_core.config.schema`` (the config dataclasses) and from ``mlora_core.errors``.
"""
