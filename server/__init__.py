"""Fenwick's OpenAI-compatible HTTP server."""
