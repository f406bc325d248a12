"""forwarder: an asynchronous buffering event forwarder for AWS CloudWatch Evidently."""

__version__ = "0.1.0"
