"""The flexsfl wire protocol, sans I/O: the one codec the edge client and the server share.

* :mod:`.tensors`  - one numpy array <-> a tensor-table entry plus payload bytes (encodings).
* :mod:`.messages` - the message dataclasses, :func:`~.messages.parse` and ``serialize()``.
* :mod:`.protocol` - the per-connection state machine and session-level checks.

Pure functions over bytes and numpy; no sockets, no asyncio, and never torch.
"""

from flexsfl.core.wire.messages import (
    CLIENT_ID_RE,
    MAGIC,
    PROTOCOL_VERSION,
    Activations,
    Adapters,
    Bye,
    Error,
    Gradients,
    Hello,
    Message,
    MessageKind,
    Metrics,
    MiddleOutput,
    Predictions,
    RoundConfig,
    RoundEnd,
    RoundMode,
    TopGradients,
    Upload,
    Welcome,
    parse,
)
from flexsfl.core.wire.protocol import Connection, Pending, Role, State, check_activations, check_tensors
from flexsfl.core.wire.tensors import DEFAULT_LIMITS, DTYPES, ENCODINGS, Limits, TensorHeader, decode, encode, payload_nbytes

__all__ = [
    "PROTOCOL_VERSION",
    "MAGIC",
    "CLIENT_ID_RE",
    "MessageKind",
    "Message",
    "Hello",
    "Welcome",
    "RoundConfig",
    "RoundMode",
    "Adapters",
    "Activations",
    "Gradients",
    "Predictions",
    "MiddleOutput",
    "TopGradients",
    "Upload",
    "Metrics",
    "RoundEnd",
    "Error",
    "Bye",
    "parse",
    "Role",
    "State",
    "Pending",
    "Connection",
    "check_activations",
    "check_tensors",
    "Limits",
    "DEFAULT_LIMITS",
    "DTYPES",
    "ENCODINGS",
    "TensorHeader",
    "encode",
    "decode",
    "payload_nbytes",
]
