"""The `medhive` command line: submit and follow jobs, read audit, run a local stack."""
