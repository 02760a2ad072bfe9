"""Typed payloads of every medhive message, one module per domain."""
