"""CLI commands of the network feature area (registered on the apps of controller.cli.runner)."""

from __future__ import annotations
