"""Shared core of the SLED fleet: protocol, configuration, logging, model store and the CLI."""

__version__ = "0.1.0"
