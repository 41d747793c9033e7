"""Container networks: bridges, veths and leases, the nft firewall, and the network setup init does
inside a container.
"""
