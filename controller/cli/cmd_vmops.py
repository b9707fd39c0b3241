"""CLI commands of the vmops feature area (registered on the apps of controller.cli.runner)."""

from __future__ import annotations
