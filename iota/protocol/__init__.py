"""Wire models shared by every role; imports nothing but pydantic and the standard library."""

from iota.protocol.messages import *  # noqa: F403
from iota.protocol.version import CLIENT_HEADER, PROTOCOL_VERSION, VERSION_HEADER  # noqa: F401
