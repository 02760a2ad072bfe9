"""The medhive services; each is independent and shares only `shared/` and messages."""
