"""TLS options of broker URLs (common/broker_url.py) and the configuration keys that set them;
lists of broker URLs (the nodes of a cluster)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agent import config as agent_config
from common.broker_url import split_tls_options, split_urls, with_tls
from common.errors import InvalidRequest, TransportError
from common.transport.amqp import connection_parameters, safe_url
from controller.config import load_config

URL = "amqps://hv1:pw@broker.example:5671/%2F"


def test_tls_options_are_split_from_the_url() -> None:
    plain, tls = split_tls_options(URL + "?cafile=/ca.pem&heartbeat=10&certfile=/c.pem&keyfile=/c.key")
    assert plain == URL + "?heartbeat=10"
    assert tls == {"cafile": "/ca.pem", "certfile": "/c.pem", "keyfile": "/c.key"}
    assert split_tls_options(URL) == (URL, {})


def test_configuration_keys_replace_the_urls_options() -> None:
    url = with_tls(URL + "?cafile=/old.pem", {"amqp_ca_file": "/ca.pem", "amqp_server_name": "rmq1"})
    assert split_tls_options(url)[1] == {"cafile": "/ca.pem", "server_name": "rmq1"}
    assert with_tls(URL, {"amqp_ca_file": None}) == URL


def test_amqps_without_options_verifies_against_the_system_cas() -> None:
    params = connection_parameters(URL)
    assert params.ssl_options is not None
    assert params.ssl_options.context.check_hostname
    assert safe_url(URL + "?cafile=/ca.pem") == "amqps://broker.example:5671/"


def test_unusable_tls_files_and_options_without_amqps_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match=r"cannot set up TLS to amqps://broker\.example:5671/"):
        connection_parameters(URL + f"?cafile={tmp_path / 'absent.pem'}")
    with pytest.raises(TransportError, match="need an amqps:// URL"):
        connection_parameters("amqp://127.0.0.1/?cafile=/ca.pem")


def test_controller_and_agent_tls_keys(tmp_path: Path) -> None:
    toml = tmp_path / "controller.toml"
    toml.write_text(f'amqp_url = "{URL}"\namqp_ca_file = "/etc/virtfleet/ca.pem"\n')
    assert split_tls_options(load_config(toml, env={}).amqp_url)[1] == {"cafile": "/etc/virtfleet/ca.pem"}
    cfg = agent_config.resolve(
        agent_config.file_values({"amqp_url": URL, "amqp_cert_file": "/c.pem", "amqp_key_file": "/c.key"}),
        {},
        {"host_id": "hv1", "libvirt_uri": "test:///default"},
    )
    assert split_tls_options(cfg.amqp_url)[1] == {"certfile": "/c.pem", "keyfile": "/c.key"}


def test_a_list_of_broker_urls_shares_the_first_urls_login_vhost_and_options() -> None:
    given = "amqp://hv1:pw@rmq1:5672/fleet?heartbeat=5, amqp://rmq2:5673 ,amqp://other:pw2@rmq3/vh2,"
    assert split_urls(given) == [
        "amqp://hv1:pw@rmq1:5672/fleet?heartbeat=5",
        "amqp://hv1:pw@rmq2:5673/fleet?heartbeat=5",
        "amqp://other:pw2@rmq3/vh2?heartbeat=5",
    ]
    assert split_urls(URL) == [URL]
    assert safe_url(given) == "amqp://rmq1:5672/fleet,amqp://rmq2:5673/fleet,amqp://rmq3:5672/vh2"


def test_tls_configuration_applies_to_every_url_of_a_list() -> None:
    both = with_tls(f"{URL},amqps://broker2.example:5671", {"amqp_ca_file": "/ca.pem"})
    for url in split_urls(both):
        assert split_tls_options(url)[1] == {"cafile": "/ca.pem"}
        assert urlsplit(url).username == "hv1"


@pytest.mark.parametrize("bad", ["", " , ", "amqps://a/%2F,amqp://b"])
def test_an_empty_or_mixed_list_of_broker_urls_is_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        split_urls(bad)


def test_controller_and_agent_configurations_take_a_list_of_urls() -> None:
    urls = "amqps://hv1:pw@rmq1:5671/%2F,amqps://rmq2:5671"
    assert load_config(None, env={"VIRTFLEET_AMQP_URL": urls}).amqp_url == urls
    agent = agent_config.resolve(
        agent_config.file_values({"amqp_url": urls}), {}, {"host_id": "hv1", "libvirt_uri": "test:///default"}
    )
    assert agent.amqp_url == urls
    with pytest.raises(InvalidRequest, match="mix"):
        load_config(None, env={"VIRTFLEET_AMQP_URL": "amqps://a,amqp://b"})
    with pytest.raises(InvalidRequest, match="mix"):
        agent_config.resolve(
            agent_config.file_values({"amqp_url": "amqps://a,amqp://b"}),
            {},
            {"host_id": "hv1", "libvirt_uri": "test:///default"},
        )
