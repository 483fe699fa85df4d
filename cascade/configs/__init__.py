"""Shipped training configurations, installed as the package ``cascade.configs`` (``--config NAME`` finds them)."""
