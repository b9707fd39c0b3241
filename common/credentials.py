"""Secrets in configuration: broker and database URLs with passwords, read from files, not argv.

A command line is readable by every user of the machine (``ps``, ``/proc/PID/cmdline``), so a
password belongs in a file only its service can read. Each secret setting ``KEY`` (``amqp_url``,
``database_url``) can therefore be given, besides the plain value:

* in the TOML file as ``KEY_file = "/path"`` (a file holding the value on one line);
* in the environment as ``VIRTFLEET_..._FILE=/path``;
* as a systemd credential (``LoadCredential=NAME:/path`` in the unit; systemd copies it into
  ``$CREDENTIALS_DIRECTORY``, readable by the service alone), where NAME is ``amqp-url`` or
  ``database-url``. It counts as the environment layer, since systemd says where it is through
  the environment.

A layer that names a value both directly and through a file is refused (which one was meant?).
A secret file readable by group or others is used, with a warning. A password on the command
line is accepted (tests and quick starts use the well-known ``guest`` login) but warned about:
:func:`argv_password_warnings`. Nothing here logs a secret; :func:`redact` is what messages show.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from common.errors import InvalidRequest

log = logging.getLogger(__name__)

#: Where systemd puts a unit's ``LoadCredential=`` files (systemd.exec(5)).
CREDENTIALS_DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"
#: The suffix of the configuration key that names a file holding a secret setting.
FILE_SUFFIX = "_file"


@dataclass(frozen=True, slots=True)
class SecretSetting:
    """One setting that may hold a password, and the names it can be given under."""

    key: str
    #: The environment variable holding the value itself, e.g. ``VIRTFLEET_AMQP_URL``.
    env_var: str
    #: The systemd credential name, e.g. ``amqp-url``.
    credential: str

    @property
    def file_key(self) -> str:
        return self.key + FILE_SUFFIX

    @property
    def file_env_var(self) -> str:
        return self.env_var + "_FILE"

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


AMQP_URL = SecretSetting("amqp_url", "VIRTFLEET_AMQP_URL", "amqp-url")
DATABASE_URL = SecretSetting("database_url", "VIRTFLEET_DATABASE_URL", "database-url")


def read_secret_file(path: Path) -> str:
    """The one-line value in ``path`` (surrounding whitespace dropped); InvalidRequest if unusable."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(f"cannot read secret file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidRequest(f"secret file {path} is not UTF-8 text") from None
    value = text.strip()
    if not value or "\n" in value:
        raise InvalidRequest(f"secret file {path} must hold exactly one non-empty line")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "secret file %s is readable by group or others (mode %o); chmod 600 it", path, mode & 0o777
        )
    return value


def take_from_table(table: MutableMapping[str, Any], setting: SecretSetting, where: str) -> None:
    """Replace ``KEY_file`` in a parsed config table by ``KEY`` read from that file (in place)."""
    if setting.file_key not in table:
        return
    if setting.key in table:
        raise InvalidRequest(f"{where}: give {setting.key} or {setting.file_key}, not both")
    path = table.pop(setting.file_key)
    if not isinstance(path, str) or not path:
        raise InvalidRequest(f"{where}: {setting.file_key} must be a file path, got {path!r}")
    table[setting.key] = read_secret_file(Path(path))


def from_environment(env: Mapping[str, str], setting: SecretSetting) -> str | None:
    """The value the environment gives ``setting``: the variable, its ``_FILE`` twin, or the
    systemd credential, in that order; None when none of them is set."""
    direct = env.get(setting.env_var)
    named = env.get(setting.file_env_var)
    if direct and named:
        raise InvalidRequest(f"environment: set {setting.env_var} or {setting.file_env_var}, not both")
    if direct:
        return direct
    if named:
        return read_secret_file(Path(named))
    directory = env.get(CREDENTIALS_DIRECTORY_ENV)
    if directory:
        path = Path(directory) / setting.credential
        if path.is_file():
            return read_secret_file(path)
    return None


def has_password(url: str) -> bool:
    """True when ``url`` carries a password (``scheme://user:PASSWORD@host/...``)."""
    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return False


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "<unparsable URL>"
    userinfo, _at, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def argv_password_warnings(argv: Sequence[str], settings: Sequence[SecretSetting]) -> list[str]:
    """One warning per secret setting given with a password on the command line (``--flag URL``
    or ``--flag=URL``): other users of the machine can read it in ``ps``."""
    given: dict[str, str] = {}
    for index, arg in enumerate(argv):
        for setting in settings:
            if arg == setting.flag and index + 1 < len(argv):
                given[setting.flag] = argv[index + 1]
            elif arg.startswith(setting.flag + "="):
                given[setting.flag] = arg.partition("=")[2]
    return [
        f"{setting.flag} {redact(given[setting.flag])} puts a password on the command line, where every"
        f" user of this machine can read it; use {setting.env_var}, {setting.file_env_var}, {setting.file_key}"
        f" in the config file or the systemd credential {setting.credential} (docs/security.md)"
        for setting in settings
        if setting.flag in given and has_password(given[setting.flag])
    ]


__all__ = [
    "AMQP_URL",
    "CREDENTIALS_DIRECTORY_ENV",
    "DATABASE_URL",
    "SecretSetting",
    "argv_password_warnings",
    "from_environment",
    "has_password",
    "read_secret_file",
    "redact",
    "take_from_table",
]
