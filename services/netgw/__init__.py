"""The network gateway: MAC/IP leases, DHCP bindings and port forwards for VM jobs."""
