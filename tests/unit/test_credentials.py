"""Secrets from files, the environment and systemd credentials; never logged, warned on argv."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent import config as agent_config
from common import credentials
from common.errors import InvalidRequest
from controller import main as controller_main
from controller.config import load_config

BROKER = "amqp://ctl:s3cret-broker@broker.example:5672/%2F"
DATABASE = "postgresql://ctl:s3cret-db@db.example/virtfleet"


def secret(tmp_path: Path, name: str, value: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")
    path.chmod(mode)
    return path


def test_redact_hides_only_the_password() -> None:
    assert credentials.redact(BROKER) == "amqp://ctl:***@broker.example:5672/%2F"
    assert credentials.redact("amqp://127.0.0.1/") == "amqp://127.0.0.1/"
    assert credentials.has_password(BROKER)
    assert not credentials.has_password("amqps://ctl@broker.example/")


def test_secret_file_must_hold_one_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="exactly one non-empty line"):
        credentials.read_secret_file(secret(tmp_path, "two", "a\nb"))
    with pytest.raises(InvalidRequest, match="cannot read secret file"):
        credentials.read_secret_file(tmp_path / "absent")


def test_group_readable_secret_file_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert credentials.read_secret_file(secret(tmp_path, "url", BROKER, 0o640)) == BROKER
    assert "readable by group or others (mode 640)" in caplog.text
    assert "s3cret" not in caplog.text


def test_controller_reads_urls_from_files_named_in_the_toml(tmp_path: Path) -> None:
    broker, database = secret(tmp_path, "amqp", BROKER), secret(tmp_path, "db", DATABASE)
    toml = tmp_path / "controller.toml"
    toml.write_text(f'amqp_url_file = "{broker}"\ndatabase_url_file = "{database}"\n')
    config = load_config(toml, env={})
    assert (config.amqp_url, config.database_url) == (BROKER, DATABASE)


def test_controller_reads_systemd_credentials_over_the_file(tmp_path: Path) -> None:
    directory = tmp_path / "creds"
    directory.mkdir()
    secret(directory, "amqp-url", BROKER)
    secret(directory, "database-url", DATABASE)
    toml = tmp_path / "controller.toml"
    toml.write_text('amqp_url = "amqp://guest:guest@127.0.0.1/%2F"\n')
    config = load_config(toml, env={credentials.CREDENTIALS_DIRECTORY_ENV: str(directory)})
    assert (config.amqp_url, config.database_url) == (BROKER, DATABASE)


def test_controller_env_file_variable_and_flag_precedence(tmp_path: Path) -> None:
    env = {"VIRTFLEET_AMQP_URL_FILE": str(secret(tmp_path, "amqp", BROKER))}
    assert load_config(env=env).amqp_url == BROKER
    assert load_config(env=env, overrides={"amqp_url": "amqp://127.0.0.1/"}).amqp_url == "amqp://127.0.0.1/"


def test_a_value_given_twice_in_one_layer_is_refused(tmp_path: Path) -> None:
    path = secret(tmp_path, "amqp", BROKER)
    toml = tmp_path / "controller.toml"
    toml.write_text(f'amqp_url = "amqp://x/"\namqp_url_file = "{path}"\n')
    with pytest.raises(InvalidRequest, match="amqp_url or amqp_url_file, not both"):
        load_config(toml, env={})
    with pytest.raises(InvalidRequest, match="VIRTFLEET_AMQP_URL or VIRTFLEET_AMQP_URL_FILE, not both"):
        load_config(env={"VIRTFLEET_AMQP_URL": "amqp://x/", "VIRTFLEET_AMQP_URL_FILE": str(path)})


def test_agent_reads_the_broker_url_from_file_env_and_credentials(tmp_path: Path) -> None:
    path = secret(tmp_path, "amqp-url", BROKER)
    flags = {"host_id": "hv1", "libvirt_uri": "test:///default"}
    from_toml = agent_config.resolve(agent_config.file_values({"amqp_url_file": str(path)}), {}, flags)
    from_env = agent_config.resolve({}, {"VIRTFLEET_AMQP_URL_FILE": str(path)}, flags)
    from_systemd = agent_config.resolve(
        {"amqp_url": "amqp://guest:guest@127.0.0.1/"},
        {credentials.CREDENTIALS_DIRECTORY_ENV: str(tmp_path)},
        flags,
    )
    assert from_toml.amqp_url == from_env.amqp_url == from_systemd.amqp_url == BROKER


def test_argv_password_is_warned_about_without_showing_it() -> None:
    warnings = credentials.argv_password_warnings(
        ["--amqp-url", BROKER, f"--database-url={DATABASE}"], (credentials.AMQP_URL, credentials.DATABASE_URL)
    )
    assert len(warnings) == 2
    assert "--amqp-url amqp://ctl:***@broker.example" in warnings[0]
    assert "VIRTFLEET_AMQP_URL_FILE" in warnings[0]
    assert not any("s3cret" in w for w in warnings)
    assert credentials.argv_password_warnings(["--amqp-url", "amqps://ctl@b/"], (credentials.AMQP_URL,)) == []


def test_controller_main_warns_about_an_argv_password_and_never_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # The config file is missing, so the controller stops right after reading its arguments.
    argv = ["--config", str(tmp_path / "absent.toml"), "--amqp-url", BROKER, "--database-url", DATABASE]
    assert controller_main.main(argv) == 2
    assert (
        "--amqp-url amqp://ctl:***@broker.example:5672/%2F puts a password on the command line" in caplog.text
    )
    assert "--database-url postgresql://ctl:***@db.example/virtfleet puts a password" in caplog.text
    assert "s3cret" not in caplog.text
