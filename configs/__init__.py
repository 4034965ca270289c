"""Experiment configs (``get_config()`` per file); ``common.get_config`` composes them."""
