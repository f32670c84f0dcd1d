"""Pulumi components for the iotplat AWS stack: Network, Firewall, Host, and Platform wiring them."""
