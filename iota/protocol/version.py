"""The wire protocol's version and the headers that carry it."""

PROTOCOL_VERSION = 2
"""Bumped on every incompatible change of a message or route; a mismatched client is told to upgrade."""

VERSION_HEADER = "X-Iota-Protocol"
CLIENT_HEADER = "X-Iota-Client"  # package version of the caller, for logs and the upgrade hint
