"""The one error tree of virtfleet, and its wire form.

Tree (``retryable`` in brackets where it is true)::

    VirtfleetError
    ├── InvalidRequest             bad input: names, sizes, unknown fields
    ├── NotFound                   unknown host, VM, image, snapshot
    ├── AlreadyExists              duplicate VM name, image in use
    ├── Conflict                   state does not allow it (e.g. delete a running VM) [sometimes]
    │   └── HostDown               the host is down: refused before sending, or a wait aborted [retryable]
    ├── NoValidHost                placement refused; carries per-host reasons
    ├── CapacityExceeded           a claim lost to capacity (e.g. live grow)
    ├── Unsupported                the hypervisor or host cannot do it
    ├── HypervisorError            libvirt failed; keeps libvirt's error code
    │   └── HypervisorUnavailable  the agent has lost its libvirt connection and is reconnecting [retryable]
    ├── StorageError               qemu-img / storage pool failed
    ├── NetworkConfigError         netlink / host network change failed
    ├── ProtocolError              a message we cannot understand
    │   ├── DecodeError            not MessagePack / not an envelope
    │   └── UnsupportedVersion     incompatible protocol major version
    ├── TransportError             broker unreachable or channel lost [retryable]
    │   └── ControllerUnavailable  nobody answered the CLI's request [retryable]
    ├── RequestTimeout             the peer did not answer in time [retryable]
    ├── StoreUnavailable           the controller's database failed transiently (connection lost, serialization) [retryable]
    ├── Unauthenticated            a message whose sender could not be proven (login, signature, expiry, replay)
    ├── PermissionDenied           the caller's role does not allow the operation
    ├── RateLimited                the caller sent too many requests [retryable]; details.retry_after_s
    └── InternalError              a bug; logged with a traceback where it happened

Errors cross the wire as data (``type``, ``message``, ``retryable``, ``details``) and are
rebuilt only from :data:`WIRE_TYPES`, an explicit allow-list; anything else arrives as
:class:`InternalError` so a peer can never make us instantiate an arbitrary class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class VirtfleetError(Exception):
    """Root of every error virtfleet raises on purpose."""

    retryable_default: ClassVar[bool] = False
    #: Expected errors are logged without a traceback; unexpected ones with one.
    expected: ClassVar[bool] = True

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.retryable_default if retryable is None else retryable
        self.details: dict[str, Any] = dict(details or {})

    def to_wire(self) -> dict[str, Any]:
        """The error as plain data for a reply body."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "retryable": self.retryable,
            "details": self.details,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidRequest(VirtfleetError, ValueError):
    """The request is malformed or a value is out of range; nothing was changed.

    Also a ValueError, so that msgspec reports a message's own ``__post_init__`` refusal with the
    path of the field that holds it (and keeps this error as the cause).
    """


class NotFound(VirtfleetError):
    """The named object does not exist."""


class AlreadyExists(VirtfleetError):
    """An object with that identity exists already."""


class Conflict(VirtfleetError):
    """The object's current state does not allow the operation."""


class HostDown(Conflict):
    """The host is down (no heartbeat within ``down_after_s``): a command to it was refused before it
    was sent, or a wait for its reply was aborted when the host was declared down.
    ``details["host"]`` names it."""

    retryable_default = True


class NoValidHost(VirtfleetError):
    """Placement found no host; ``details["reasons"]`` lists every host and why."""


class CapacityExceeded(VirtfleetError):
    """A claim would push a host past its capacity."""


class Unsupported(VirtfleetError):
    """The hypervisor, driver or host cannot do this."""


class HypervisorError(VirtfleetError):
    """libvirt reported an error; ``details["code"]`` keeps libvirt's error code."""


class HypervisorUnavailable(HypervisorError):
    """The agent cannot reach libvirt (libvirtd restarted or stopped) and is reconnecting;
    nothing was done on the host. Retry once the host is ``up`` again."""

    retryable_default = True


class StorageError(VirtfleetError):
    """An image or storage pool operation failed."""


class NetworkConfigError(VirtfleetError):
    """A host network change failed (netlink, bridge, bond, routes)."""


class ProtocolError(VirtfleetError):
    """A message could not be understood."""


class DecodeError(ProtocolError):
    """The bytes are not a valid virtfleet envelope."""


class UnsupportedVersion(ProtocolError):
    """The envelope's protocol major version is not one we speak."""


class TransportError(VirtfleetError):
    """The broker could not be reached or the channel was lost."""

    retryable_default = True


class ControllerUnavailable(TransportError):
    """No controller answered the request."""


class RequestTimeout(VirtfleetError):
    """The peer did not answer in time; the operation may or may not have happened."""

    retryable_default = True


class StoreUnavailable(VirtfleetError):
    """The controller's database failed in a way that may pass (connection lost, restart, a
    serialization conflict); nothing was committed. Retry."""

    retryable_default = True


class Unauthenticated(VirtfleetError):
    """A message whose sender could not be proven: wrong broker login, bad or missing signature,
    expired or replayed; nothing was done."""


class Replayed(Unauthenticated):
    """An authentic message whose id was seen before and is not answered: a replay, or a copy
    re-published after a broker connection was lost whose first copy did not answer before it
    expired (an agent waits that long for it, then answers the copy from its journal). It is
    dead-lettered and never answered, so that its requester gets the answer of the copy that ran."""


class PermissionDenied(VirtfleetError):
    """The authenticated caller's role does not allow this operation; nothing was done."""


class RateLimited(VirtfleetError):
    """The caller sent more requests than its rate allows; ``details["retry_after_s"]`` says when to retry."""

    retryable_default = True


class InternalError(VirtfleetError):
    """An unexpected failure: a bug, reported to the caller without internals."""

    expected = False


#: The allow-list of error types that may be rebuilt from the wire.
WIRE_TYPES: Mapping[str, type[VirtfleetError]] = {
    cls.__name__: cls
    for cls in (
        VirtfleetError,
        InvalidRequest,
        NotFound,
        AlreadyExists,
        Conflict,
        HostDown,
        NoValidHost,
        CapacityExceeded,
        Unsupported,
        HypervisorError,
        HypervisorUnavailable,
        StorageError,
        NetworkConfigError,
        ProtocolError,
        DecodeError,
        UnsupportedVersion,
        TransportError,
        ControllerUnavailable,
        RequestTimeout,
        StoreUnavailable,
        Unauthenticated,
        PermissionDenied,
        RateLimited,
        Replayed,
        InternalError,
    )
}


def error_from_wire(data: object) -> VirtfleetError:
    """Rebuild an error from its wire form; unknown or malformed types become InternalError."""
    if not isinstance(data, Mapping):
        return InternalError(f"malformed error payload: {data!r:.200}")
    type_name = data.get("type")
    message = data.get("message")
    retryable = data.get("retryable")
    details = data.get("details")
    text = message if isinstance(message, str) else repr(message)
    cls = WIRE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        return InternalError(f"{type_name}: {text}")
    return cls(
        text,
        retryable=retryable if isinstance(retryable, bool) else None,
        details=details if isinstance(details, Mapping) else None,
    )
