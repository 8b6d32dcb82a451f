"""Hotkey-signed requests: client signing (``signing``), server verification as FastAPI dependencies (``verify``,
``roles``), replay protection (``nonces``), rate limits (``ratelimit``) and wallets on disk (``wallet``)."""

from iota.auth.nonces import JournaledNonceStore, MemoryNonceStore, NonceStore, SqliteNonceStore
from iota.auth.ratelimit import IPRateLimitMiddleware, RateLimiter, client_ip
from iota.auth.roles import Miner, Operator, Validator, require_miner, require_operator, require_validator
from iota.auth.signing import AUTH_ERROR_HEADER, HotkeyAuth, sign_headers
from iota.auth.verify import (
    Authenticator,
    Caller,
    ServerHeadersMiddleware,
    VerifiedCaller,
    check_protocol_version,
    install_auth,
    verified_caller,
)
from iota.auth.wallet import create_wallet, load_hotkey

__all__ = [
    "AUTH_ERROR_HEADER",
    "Authenticator",
    "Caller",
    "HotkeyAuth",
    "IPRateLimitMiddleware",
    "JournaledNonceStore",
    "MemoryNonceStore",
    "Miner",
    "NonceStore",
    "Operator",
    "RateLimiter",
    "ServerHeadersMiddleware",
    "SqliteNonceStore",
    "Validator",
    "VerifiedCaller",
    "check_protocol_version",
    "client_ip",
    "create_wallet",
    "install_auth",
    "load_hotkey",
    "require_miner",
    "require_operator",
    "require_validator",
    "sign_headers",
    "verified_caller",
]
