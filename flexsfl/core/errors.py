"""The project's one exception tree.

Every error a user can meet is a :class:`FlexSFLError`; its message is one line that names
the file, field or message at fault and says what to do::

    FlexSFLError
    ├── ConfigError        bad argument, config field or profile
    ├── DataError          missing/malformed local data set
    ├── BundleError        missing, tampered, truncated or mismatched bundle
    ├── BackendError       a training runtime is missing or failed
    ├── ExportError        a model could not be partitioned or lowered
    ├── FlashError         SSH flashing failed (host, auth, checks, upload)
    ├── InvalidState       this side misused its own wire Connection (a bug here, not the peer's)
    └── ProtocolError      a peer sent something the wire protocol refuses
        ├── FrameError     bytes that do not parse (header, tensor, size limit)
        ├── TensorError    a tensor with the wrong dtype/shape or non-finite values
        ├── OrderError     a message that is not allowed in the connection's state
        └── AuthError      unknown client, wrong token, bundle hash mismatch

``ProtocolError.code`` is the :class:`ErrorCode` sent to the peer in an ``Error`` message;
``close_code`` is the websocket close code used when the connection must end.

``InvalidState`` is deliberately *not* a ``ProtocolError``: when a side's own code asks its
:class:`~flexsfl.core.wire.Connection` to send a message that the state does not allow, the
peer did nothing wrong, so a transport must not answer it with a ``ProtocolError``'s code and
log line (the server reports its own bug as ``SERVER_ERROR``, close code 1011). Wrong argument
types given to the wire API raise the built-in ``TypeError``.
"""

from __future__ import annotations

import enum

__all__ = [
    "FlexSFLError",
    "ConfigError",
    "DataError",
    "BundleError",
    "BackendError",
    "ExportError",
    "FlashError",
    "InvalidState",
    "ProtocolError",
    "FrameError",
    "TensorError",
    "OrderError",
    "AuthError",
    "ErrorCode",
]


class FlexSFLError(Exception):
    """Root of every error flexsfl raises on purpose."""


class ConfigError(FlexSFLError):
    """A bad argument, configuration field or device profile."""


class DataError(FlexSFLError):
    """A data set is missing, unreadable or malformed."""


class BundleError(FlexSFLError):
    """A bundle is missing, tampered with, truncated or does not match."""


class BackendError(FlexSFLError):
    """A training runtime (ONNX Runtime, ExecuTorch, torch) is unavailable or failed."""


class ExportError(FlexSFLError):
    """A model could not be loaded, partitioned or lowered to on-device artifacts."""


class FlashError(FlexSFLError):
    """Putting a bundle onto a device over SSH failed."""


class InvalidState(FlexSFLError):
    """This side asked its own wire ``Connection`` for something its state does not allow.

    Raised by ``Connection.send`` for a message that is out of order, from the wrong side,
    inconsistent with the session (round or step ids, shapes, encodings) or over the frame
    limit both sides agreed on. It is a bug (or a race with a closing connection) in the code
    that drives the connection, never the peer's fault; the connection is left unchanged.
    """


class ErrorCode(enum.IntEnum):
    """Error codes carried by the wire protocol's ``Error`` message."""

    MALFORMED_FRAME = 1  # header or tensor bytes do not parse
    TOO_LARGE = 2  # frame or tensor over the negotiated size limit
    UNKNOWN_KIND = 3  # message kind not known to this protocol version
    BAD_VERSION = 4  # protocol version not supported
    BAD_TENSOR = 5  # dtype/shape mismatch against the manifest or session
    NON_FINITE = 6  # NaN or Inf in a tensor
    OUT_OF_ORDER = 7  # message not allowed in the connection's state
    UNAUTHORIZED = 8  # unknown client or wrong token
    BUNDLE_MISMATCH = 9  # bundle manifest hash differs from the server's layout
    SERVER_ERROR = 10  # the server failed; the request changed nothing
    BUSY = 11  # the server refuses new work for now (retry later)


# RFC 6455 close codes: 1002 protocol error, 1003 unsupported data, 1008 policy violation,
# 1009 message too big, 1011 internal error, 1013 try again later.
_CLOSE_CODES = {
    ErrorCode.MALFORMED_FRAME: 1002,
    ErrorCode.TOO_LARGE: 1009,
    ErrorCode.UNKNOWN_KIND: 1003,
    ErrorCode.BAD_VERSION: 1002,
    ErrorCode.BAD_TENSOR: 1003,
    ErrorCode.NON_FINITE: 1003,
    ErrorCode.OUT_OF_ORDER: 1002,
    ErrorCode.UNAUTHORIZED: 1008,
    ErrorCode.BUNDLE_MISMATCH: 1008,
    ErrorCode.SERVER_ERROR: 1011,
    ErrorCode.BUSY: 1013,
}


class ProtocolError(FlexSFLError):
    """A peer sent something the wire protocol refuses. Nothing was changed by it."""

    code: ErrorCode = ErrorCode.MALFORMED_FRAME

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def close_code(self) -> int:
        return _CLOSE_CODES[self.code]


class FrameError(ProtocolError):
    """Bytes that do not parse: bad magic, header, tensor table or size."""

    code = ErrorCode.MALFORMED_FRAME


class TensorError(ProtocolError):
    """A tensor whose dtype or shape is wrong, or whose values are not finite."""

    code = ErrorCode.BAD_TENSOR


class OrderError(ProtocolError):
    """A message that the connection's current state does not allow."""

    code = ErrorCode.OUT_OF_ORDER


class AuthError(ProtocolError):
    """Unknown client, wrong token or a bundle that does not match the server."""

    code = ErrorCode.UNAUTHORIZED
