"""Pulumi components for the iotplat Azure stack: Network, Firewall, Host, and Platform wiring them."""
