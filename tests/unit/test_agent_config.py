"""Agent configuration: precedence file < environment < flags, defaults and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.main import main
from common.errors import InvalidRequest

URL_FILE = "amqp://file:file@broker-file:5672/%2F"
URL_ENV = "amqp://env:env@broker-env:5672/%2F"
URL_FLAG = "amqp://flag:flag@broker-flag:5672/%2F"


def test_defaults() -> None:
    cfg = config.resolve({}, {}, {"host_id": "hv1", "libvirt_uri": "qemu:///system"})
    assert cfg == config.AgentConfig(
        host_id="hv1", libvirt_uri="qemu:///system", state_dir=Path("/var/lib/virtfleet/agent/hv1")
    )
    assert cfg.amqp_url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert cfg.state_dir == Path("/var/lib/virtfleet/agent/hv1")
    assert (cfg.report_interval, cfg.heartbeat_interval) == (30.0, 5.0)
    assert cfg.storage_pool == "default"
    assert cfg.simulate_hw_virt is True


def test_precedence_file_env_flags() -> None:
    file = {
        "host_id": "from-file",
        "libvirt_uri": "test:///default",
        "amqp_url": URL_FILE,
        "report_interval": 10,
    }
    env = {"VIRTFLEET_AMQP_URL": URL_ENV, "VIRTFLEET_AGENT_HOST_ID": "from-env"}
    flags = {"amqp_url": URL_FLAG, "host_id": None, "report_interval": None}

    cfg = config.resolve(file, env, flags)

    assert cfg.amqp_url == URL_FLAG  # flag beats env beats file
    assert cfg.host_id == "from-env"  # env beats file; a None flag is "not given"
    assert cfg.libvirt_uri == "test:///default"  # only the file says it
    assert cfg.report_interval == 10.0


def test_env_beats_file() -> None:
    cfg = config.resolve(
        {"host_id": "a", "libvirt_uri": "qemu:///system"}, {"VIRTFLEET_LIBVIRT_URI": "test:///default"}, {}
    )
    assert cfg.libvirt_uri == "test:///default"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"libvirt_uri": "test:///default"}, "host id is required"),
        ({"host_id": "hv1"}, "libvirt URI is required"),
        ({"host_id": "bad host!", "libvirt_uri": "x"}, "invalid host id"),
        ({"host_id": "hv1", "libvirt_uri": "x", "report_interval": 0}, "positive"),
        ({"host_id": "hv1", "libvirt_uri": "x", "heartbeat_interval": "soon"}, "number of seconds"),
        ({"host_id": "hv1", "libvirt_uri": "x", "log_level": "chatty"}, "log_level"),
        ({"host_id": "hv1", "libvirt_uri": "x", "simulate_hw_virt": "yes"}, "true or false"),
        ({"host_id": "hv1", "libvirt_uri": "x", "storage_pool": "a/b"}, "invalid pool"),
    ],
)
def test_invalid(values: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        config.resolve(values, {}, {})


def test_file_values_table_and_top_level() -> None:
    assert config.file_values({"agent": {"host_id": "a"}, "controller": {"x": 1}}) == {"host_id": "a"}
    assert config.file_values({"host_id": "a", "controller": {"x": 1}}) == {"host_id": "a"}
    with pytest.raises(InvalidRequest, match="unknown key"):
        config.file_values({"agent": {"host_idd": "a"}})


def test_load_reads_toml_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[agent]\nhost_id = "hv-file"\nlibvirt_uri = "test:///default"\nheartbeat_interval = 2.5\n'
        'simulate_hw_virt = false\nstate_dir = "/srv/state"\n'
    )
    cfg = config.load(
        ["--config", str(path), "--host-id", "hv-flag", "--report-interval", "7", "--log-level", "debug"],
        {"VIRTFLEET_AGENT_HOST_ID": "hv-env"},
    )
    assert cfg.host_id == "hv-flag"
    assert cfg.heartbeat_interval == 2.5
    assert cfg.report_interval == 7.0
    assert cfg.log_level == "DEBUG"
    assert cfg.simulate_hw_virt is False
    assert cfg.state_dir == Path("/srv/state")


def test_load_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("host_id = ")
    with pytest.raises(InvalidRequest, match="not valid TOML"):
        config.load(["--config", str(bad)], {})
    with pytest.raises(InvalidRequest, match="cannot read"):
        config.load(["--config", str(tmp_path / "missing.toml")], {})


def test_main_exits_2_on_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--libvirt-uri", "test:///default"]) == 2
    assert "host id is required" in capsys.readouterr().err


# ------------------------------------------------------------------------------ several hosts


NODE = Path(__file__).resolve().parents[1] / "fixtures" / "nodes" / "small.xml"


def test_simulate_gives_one_config_per_host_on_the_template(tmp_path: Path) -> None:
    multi = config.load_any(
        [
            "--simulate",
            "12",
            "--node-template",
            str(NODE),
            "--state-dir",
            str(tmp_path),
            "--log-level",
            "debug",
        ],
        {"VIRTFLEET_AGENT_HOST_ID": "ignored", "VIRTFLEET_AMQP_URL": "amqp://u:p@broker/%2F"},
    )
    assert isinstance(multi, config.MultiHostConfig)
    ids = [h.host_id for h in multi.hosts]
    assert ids[:2] == ["sim-01", "sim-02"] and ids[-1] == "sim-12" and len(set(ids)) == 12
    assert {h.libvirt_uri for h in multi.hosts} == {f"test://{NODE}"}
    assert [h.state_dir for h in multi.hosts[:2]] == [tmp_path / "sim-01", tmp_path / "sim-02"]
    assert {(h.amqp_url, h.log_level) for h in multi.hosts} == {("amqp://u:p@broker/%2F", "DEBUG")}


def test_hosts_by_id_and_uri_add_to_the_simulated_ones() -> None:
    multi = config.load_any(
        [
            "--host",
            "big=test:///b.xml",
            "--simulate",
            "2",
            "--node-template",
            str(NODE),
            "--host-prefix",
            "x",
        ],
        {},
    )
    assert isinstance(multi, config.MultiHostConfig)
    assert [(h.host_id, h.libvirt_uri) for h in multi.hosts][:2] == [
        ("big", "test:///b.xml"),
        ("x1", f"test://{NODE}"),
    ]
    assert multi.hosts[0].state_dir == config.DEFAULT_STATE_ROOT / "big"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--simulate", "2"], "needs --node-template"),
        (["--simulate", "0", "--node-template", str(NODE)], "at least 1"),
        (["--simulate", "2", "--node-template", "/nonexistent.xml"], "no such file"),
        (["--node-template", str(NODE), "--host-id", "a", "--libvirt-uri", "test:///default"], "goes with"),
        (["--host", "a=test:///x", "--host-id", "b"], "single-host"),
        (["--host", "a=test:///x", "--host", "a=test:///y"], "given twice"),
        (["--host", "no-uri"], "ID=URI"),
    ],
)
def test_bad_multi_host_flags(argv: list[str], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        config.load_any(argv, {})


def test_load_is_for_one_host() -> None:
    with pytest.raises(InvalidRequest, match="several hosts"):
        config.load(["--simulate", "2", "--node-template", str(NODE)], {})


# ------------------------------------------------------------------ signing keys


def test_key_file_and_signing_limits() -> None:
    flags = {"host_id": "hv1", "libvirt_uri": "qemu:///system"}
    assert config.resolve({}, {}, flags).key_file is None
    cfg = config.resolve(
        {"key_file": "/k/{host}.key", "max_message_lifetime": 1200, "clock_skew": 0},
        {},
        flags,
    )
    assert (cfg.key_file, cfg.max_message_lifetime, cfg.clock_skew) == (Path("/k/hv1.key"), 1200.0, 0.0)
    assert config.resolve({}, {"VIRTFLEET_AGENT_KEY_FILE": "/e.key"}, flags).key_file == Path("/e.key")
    with pytest.raises(InvalidRequest, match="at least 600 s"):
        config.resolve({"max_message_lifetime": 599}, {}, flags)


def test_several_hosts_name_their_key_files_with_a_placeholder() -> None:
    argv = ["--host", "a=test:///x", "--host", "b=test:///y"]
    multi = config.load_any([*argv, "--key-file", "/keys/{host}.key"], {})
    assert isinstance(multi, config.MultiHostConfig)
    assert [h.key_file for h in multi.hosts] == [Path("/keys/a.key"), Path("/keys/b.key")]
    with pytest.raises(InvalidRequest, match=r"must name each host's file with \{host\}"):
        config.load_any([*argv, "--key-file", "/keys/one.key"], {})
    with pytest.raises(InvalidRequest, match=r"\{host\}"):
        config.load_any(argv, {"VIRTFLEET_AGENT_KEY_FILE": "/keys/one.key"})


def test_commands_are_obeyed_from_the_controller_login_and_checked_unless_told_otherwise() -> None:
    base = {"host_id": "hv1", "libvirt_uri": "qemu:///system"}
    cfg = config.resolve(base, {}, {})
    assert (cfg.controller_login, cfg.trust_broker_logins) == ("controller", True)
    cfg = config.resolve(
        {**base, "controller_login": "vf-ctl"}, {"VIRTFLEET_TRUST_BROKER_LOGINS": "false"}, {}
    )
    assert (cfg.controller_login, cfg.trust_broker_logins) == ("vf-ctl", False)
    with pytest.raises(InvalidRequest, match="true or false"):
        config.resolve(base, {"VIRTFLEET_TRUST_BROKER_LOGINS": "maybe"}, {})
