"""Routers of the dashboard app: ``runs`` (JSON API per run), ``compare`` and ``pages`` (HTML + assets)."""
