"""The scheduler: job queue and state, placement, retries, walltime, the job API."""
