"""The config: its schema and loading (``schema``), and its checks against the plugins (``validation``)."""
