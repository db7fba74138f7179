"""Creditdesk settings: one module per concern, every secret and endpoint from the environment."""

from .base import *  # noqa: F401,F403
