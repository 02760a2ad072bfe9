"""Benchmarks of the whole system: real services as processes, a real broker and database.

Each bench is run as `python -m bench.<name>` from the repository root. It sets up
its own stack (`bench.stack`: a fresh RabbitMQ vhost, a SecantusDB server, the services),
prints progress to stderr and one JSON object as the last line of stdout.

- `bench.container_overhead`: one trivial container job at a time through medhive, against
  a bare `docker run`.
- `bench.control_plane`: many jobs at once on node agents with the `instant` runtime,
  so that only the scheduler, the broker, the audit and the database are measured.
"""
