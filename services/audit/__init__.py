"""The audit service: the append-only, hash-chained record of every command and event."""
