"""mirrord: synchronous disk mirroring and automatic failover for a pair of Linux appliances."""

__version__ = "0.1.0"
