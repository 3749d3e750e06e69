"""Fido: an IMAP to Redis mail fetcher daemon on one Twisted reactor."""

__version__ = "0.1.0"
