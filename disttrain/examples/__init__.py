"""The demo kinds: models (``mlp``, ``gpt``) and datasets (``digits``, ``shakespeare``) that ship offline.

The core never imports this package at import time: ``disttrain.models`` and ``disttrain.data``
name these kinds as registry entries (``"module:function"`` strings) and import one only when a
config asks for it. A user's own model or data goes through ``model.target``/``data.target`` instead.
"""
