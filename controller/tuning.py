"""Performance tuning use cases: pinning, hugepages, IO."""

from __future__ import annotations

from common.transport.rpc import HandlerFn
from controller.service import ControllerService


def api_handlers(service: ControllerService) -> dict[str, HandlerFn]:
    """The API kinds of this feature area, bound to the service."""
    return {}
