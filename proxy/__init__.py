"""dnschaos: a DNS forwarder that injects faults on purpose."""

__version__ = "0.1.0"
