"""The network gateway: MAC/IP leases and port forwards for VM jobs (a later issue)."""
