"""clipserve.clients: Python clients and the `clipserve client` command."""
