"""The broker URL a fleet uses when none is configured, and its TLS options.

A plain module apart from :mod:`common.transport`: the CLI declares its ``--amqp-url`` option
(and shows this default in ``virtfleet --help``) without loading any transport code
(docs/performance.md, "CLI start-up").

TLS (docs/security.md, "TLS to the broker"): an ``amqps://`` URL takes these query options,
which the AMQP transport turns into pika's ``SSLOptions``::

    amqps://hv1@broker.example:5671/%2F?cafile=/etc/virtfleet/ca.pem&certfile=/etc/virtfleet/hv1.pem&keyfile=/etc/virtfleet/hv1.key

``cafile``: the CA that signed the broker's certificate (default: the system's CAs);
``certfile``/``keyfile``: this client's certificate and key; ``server_name``: the name the
broker's certificate must carry when it is not the URL's host. The configuration keys
``amqp_ca_file``, ``amqp_cert_file``, ``amqp_key_file`` and ``amqp_server_name`` add the same
options (:func:`with_tls`). pika's own ``ssl_options=`` query option works as well.

Several brokers (the nodes of a RabbitMQ cluster, docs/operations.md "Running it highly
available"): the URLs comma-separated, in ``VIRTFLEET_AMQP_URL``, ``--amqp-url`` or the
configuration files::

    amqp://hv1:secret@rabbit1:5672/virtfleet,amqp://rabbit2:5672,amqp://rabbit3:5672

A connection tries them in turn (:func:`split_urls`). A URL without a login, a virtual host or
query options takes those of the first URL, so the password is written once; the TLS options of
the configuration apply to every URL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from common.errors import InvalidRequest

#: The broker of a single-machine installation (RabbitMQ's default user on loopback).
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

CA_FILE = "cafile"
CERT_FILE = "certfile"
KEY_FILE = "keyfile"
SERVER_NAME = "server_name"
#: URL query option -> the configuration key that sets it.
TLS_OPTIONS: Mapping[str, str] = {
    CA_FILE: "amqp_ca_file",
    CERT_FILE: "amqp_cert_file",
    KEY_FILE: "amqp_key_file",
    SERVER_NAME: "amqp_server_name",
}


def split_tls_options(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without the TLS query options of this module, and those options."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    tls = {key: value for key, value in query if key in TLS_OPTIONS}
    if not tls:
        return url, {}
    rest = urlencode([(key, value) for key, value in query if key not in TLS_OPTIONS])
    return urlunsplit(parts._replace(query=rest)), tls


def with_tls(url: str, settings: Mapping[str, str | None]) -> str:
    """``url`` (one or several, comma-separated) with the TLS options that ``settings``
    (configuration key -> value) give, those of the configuration replacing the URL's own."""
    given = {option: settings[key] for option, key in TLS_OPTIONS.items() if settings.get(key)}
    if not given:
        return url
    if SEPARATOR in url:
        return join_urls([with_tls(one, settings) for one in split_urls(url)])
    plain, current = split_tls_options(url)
    parts = urlsplit(plain)
    query = parse_qsl(parts.query, keep_blank_values=True) + sorted({**current, **given}.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


#: What separates the URLs of several brokers.
SEPARATOR = ","


def split_urls(value: str) -> list[str]:
    """The broker URLs in ``value`` (comma-separated), each complete: a URL without a login, a
    virtual host (path) or query options takes those of the first URL. InvalidRequest when there
    is none or the schemes differ (a mix of TLS and plain connections is a mistake)."""
    urls = [part.strip() for part in value.split(SEPARATOR) if part.strip()]
    if not urls:
        raise InvalidRequest("no broker URL given", details={"field": "amqp_url"})
    first = urlsplit(urls[0])
    complete = [urls[0]]
    for url in urls[1:]:
        parts = urlsplit(url)
        if parts.scheme != first.scheme:
            raise InvalidRequest(
                f"broker URLs mix {first.scheme}:// and {parts.scheme}://; give every node the same scheme",
                details={"field": "amqp_url"},
            )
        netloc = parts.netloc
        if "@" not in netloc and "@" in first.netloc:
            netloc = f"{first.netloc.rpartition('@')[0]}@{netloc}"
        path = parts.path if parts.path not in ("", "/") else first.path
        query = parts.query or first.query
        complete.append(urlunsplit(parts._replace(netloc=netloc, path=path, query=query)))
    return complete


def join_urls(urls: Sequence[str]) -> str:
    """The inverse of :func:`split_urls`."""
    return SEPARATOR.join(urls)


def checked_urls(value: str) -> str:
    """``value`` unchanged once :func:`split_urls` accepts it (configuration loading: a bad list
    is refused at start, exit 2, not at the first connection)."""
    split_urls(value)
    return value
