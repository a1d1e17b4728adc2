"""Routers of the management API."""
