"""Controller configuration (controller/config.py): defaults < file < environment < overrides."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from common.broker_url import DEFAULT_URL
from common.errors import InvalidRequest
from common.messages.descriptor import Role
from controller.config import (
    DEFAULT_DATABASE_URL,
    ENV_VARS,
    ControllerConfig,
    Overcommit,
    load_config,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(text)
    return path


def refusal(
    path: Path | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> str:
    """The message of load_config's refusal (``env`` is empty unless given: not this process's)."""
    with pytest.raises(InvalidRequest) as info:
        load_config(path, env={} if env is None else env, overrides=overrides)
    return info.value.message


def test_defaults() -> None:
    config = load_config(env={})
    assert config == ControllerConfig()
    assert config.amqp_url == DEFAULT_URL
    assert config.database_url == DEFAULT_DATABASE_URL == "sqlite:///./virtfleet.db"
    assert config.down_after_s == 30.0
    assert config.workers == 16
    assert config.strategy == "spread"
    assert config.max_attempts == 3
    assert config.n_plus_one is False
    assert config.claim_retries == 10
    assert config.build_timeout_s == 600.0
    assert config.reconcile_interval_s == 30.0
    assert config.overcommit == Overcommit(
        cpu_ratio=4.0,
        ram_ratio=1.0,
        disk_ratio=1.0,
        reserved_memory_mib=512,
        reserved_cpus=0,
        reserved_disk_gib=0,
    )


def test_env_vars_map_to_real_fields() -> None:
    names = set(ControllerConfig.__dataclass_fields__)
    assert set(ENV_VARS.values()) <= names
    assert dict(ENV_VARS) == {
        "VIRTFLEET_AMQP_URL": "amqp_url",
        "VIRTFLEET_DATABASE_URL": "database_url",
        "VIRTFLEET_DOWN_AFTER": "down_after_s",
        "VIRTFLEET_STRATEGY": "strategy",
        "VIRTFLEET_MASTER_KEY_FILE": "master_key_file",
        "VIRTFLEET_TRUST_BROKER_LOGINS": "trust_broker_logins",
    }


def test_process_environment_is_read_when_env_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VIRTFLEET_STRATEGY", "pack")
    assert load_config().strategy == "pack"


def test_file_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
amqp_url = "amqp://u:p@mq:5672/vf"
database_url = "postgresql+psycopg://vf@db/vf"
down_after_s = 45.5
workers = 4
strategy = "pack"
max_attempts = 5
n_plus_one = true
claim_retries = 3
build_timeout_s = 120.0
reconcile_interval_s = 10.0
""",
    )
    config = load_config(path, env={})
    assert config == ControllerConfig(
        amqp_url="amqp://u:p@mq:5672/vf",
        database_url="postgresql+psycopg://vf@db/vf",
        down_after_s=45.5,
        workers=4,
        strategy="pack",
        max_attempts=5,
        n_plus_one=True,
        claim_retries=3,
        build_timeout_s=120.0,
        reconcile_interval_s=10.0,
    )


def test_string_values_in_file_are_coerced(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = "8"\ndown_after_s = "12.5"\nn_plus_one = "yes"\n')
    config = load_config(path, env={})
    assert config.workers == 8
    assert type(config.workers) is int
    assert config.down_after_s == 12.5
    assert config.n_plus_one is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("TRUE", True), ("on", True), ("0", False), ("no", False), ("off", False)],
)
def test_bool_strings(tmp_path: Path, text: str, expected: bool) -> None:
    assert load_config(write(tmp_path, f'n_plus_one = "{text}"\n'), env={}).n_plus_one is expected


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'strategy = "pack"\ndown_after_s = 45.0\namqp_url = "amqp://file"\nworkers = 4\n')
    env = {"VIRTFLEET_STRATEGY": "spread", "VIRTFLEET_DOWN_AFTER": "90", "VIRTFLEET_AMQP_URL": "amqp://env"}
    config = load_config(path, env=env)
    assert config.strategy == "spread"
    assert config.down_after_s == 90.0
    assert type(config.down_after_s) is float
    assert config.amqp_url == "amqp://env"
    assert config.workers == 4  # from the file, no env var for it


def test_unrelated_env_vars_are_ignored() -> None:
    config = load_config(env={"VIRTFLEET_WORKERS": "x", "VIRTFLEET_BOGUS": "1", "PATH": "/bin"})
    assert config == ControllerConfig()


def test_explicit_overrides_beat_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'strategy = "pack"\ndatabase_url = "sqlite:///file.db"\n')
    env = {"VIRTFLEET_STRATEGY": "pack", "VIRTFLEET_DATABASE_URL": "sqlite:///env.db"}
    config = load_config(path, env=env, overrides={"strategy": "spread", "database_url": "sqlite:///flag.db"})
    assert config.strategy == "spread"
    assert config.database_url == "sqlite:///flag.db"


def test_none_overrides_are_skipped() -> None:
    config = load_config(env={"VIRTFLEET_STRATEGY": "pack"}, overrides={"strategy": None, "workers": 2})
    assert config.strategy == "pack"
    assert config.workers == 2


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "wokers = 4\n")
    assert refusal(path) == f"{path}: unknown setting 'wokers'"


def test_unknown_key_in_overcommit_table(tmp_path: Path) -> None:
    path = write(tmp_path, "[overcommit]\ncpu_ration = 2.0\n")
    assert refusal(path) == "[overcommit]: unknown setting 'cpu_ration'"


@pytest.mark.parametrize("value", ["abc", "", "1e", "30s"])
def test_bad_number_in_env(value: str) -> None:
    assert (
        refusal(env={"VIRTFLEET_DOWN_AFTER": value})
        == f"environment: down_after_s must be a number, got {value!r}"
    )


def test_bad_number_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = "many"\n')
    assert refusal(path) == f"{path}: workers must be a number, got 'many'"


def test_int_field_refuses_decimal_string(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"workers must be a number, got '2\.5'$"):
        load_config(write(tmp_path, 'workers = "2.5"\n'), env={})


@pytest.mark.parametrize("source", ["env", "file", "override"])
def test_bad_strategy(tmp_path: Path, source: str) -> None:
    env: dict[str, str] = {}
    path = None
    overrides = None
    if source == "env":
        env = {"VIRTFLEET_STRATEGY": "random"}
    elif source == "file":
        path = write(tmp_path, 'strategy = "random"\n')
    else:
        overrides = {"strategy": "random"}
    assert refusal(path, env=env, overrides=overrides) == "strategy must be 'spread' or 'pack', got 'random'"


@pytest.mark.parametrize(
    "setting", ["down_after_s = 0", "down_after_s = -1.0", "workers = 0", "max_attempts = 0"]
)
def test_non_positive_limits(tmp_path: Path, setting: str) -> None:
    with pytest.raises(InvalidRequest, match="down_after_s, workers and max_attempts must be positive"):
        load_config(write(tmp_path, setting + "\n"), env={})


def test_choose_among(tmp_path: Path) -> None:
    assert load_config(env={}).choose_among == 1
    assert load_config(write(tmp_path, "choose_among = 3\n"), env={}).choose_among == 3
    assert load_config(overrides={"choose_among": 4}, env={}).choose_among == 4
    with pytest.raises(InvalidRequest, match="choose_among must be at least 1, got 0"):
        load_config(write(tmp_path, "choose_among = 0\n"), env={})


def test_create_batching(tmp_path: Path) -> None:
    defaults = load_config(env={})
    assert (defaults.create_batch_max, defaults.create_batch_window_s) == (32, 0.002)
    path = write(tmp_path, "create_batch_max = 1\ncreate_batch_window_s = 0\n")
    config = load_config(path, env={})
    assert (config.create_batch_max, config.create_batch_window_s) == (1, 0.0)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("create_batch_max = 0", "create_batch_max must be at least 1, got 0"),
        ("create_batch_window_s = -0.001", "create_batch_window_s must be between 0 and 1 s, got -0.001"),
        ("create_batch_window_s = 2.0", "create_batch_window_s must be between 0 and 1 s, got 2.0"),
        ("create_batch_window_s = nan", "create_batch_window_s must be between 0 and 1 s, got nan"),
    ],
)
def test_create_batching_refuses_bad_values(tmp_path: Path, setting: str, message: str) -> None:
    assert refusal(write(tmp_path, setting + "\n")) == message


def test_recovery_settings(tmp_path: Path) -> None:
    defaults = load_config(env={})
    assert (
        defaults.recovery_interval_s,
        defaults.instance_heartbeat_s,
        defaults.instance_expiry_s,
        defaults.lease_ttl_s,
    ) == (5.0, 3.0, 15.0, 15.0)
    path = write(tmp_path, "instance_heartbeat_s = 1\ninstance_expiry_s = 2\nlease_ttl_s = 1.5\n")
    config = load_config(path, env={})
    assert (config.instance_heartbeat_s, config.instance_expiry_s, config.lease_ttl_s) == (1.0, 2.0, 1.5)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("recovery_interval_s = 0", "must be positive"),
        ("lease_ttl_s = -1", "must be positive"),
        ("instance_expiry_s = 5", "instance_expiry_s at least twice instance_heartbeat_s (6 s)"),
        ("lease_ttl_s = 3", "lease_ttl_s must be longer than instance_heartbeat_s (3 s)"),
    ],
)
def test_recovery_settings_refuse_bad_values(tmp_path: Path, setting: str, message: str) -> None:
    assert message in refusal(write(tmp_path, setting + "\n"))


def test_overcommit_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
strategy = "pack"

[overcommit]
cpu_ratio = 16.0
ram_ratio = 1.5
reserved_memory_mib = 2048
reserved_cpus = "2"
""",
    )
    config = load_config(path, env={})
    assert config.strategy == "pack"
    assert config.overcommit == Overcommit(
        cpu_ratio=16.0,
        ram_ratio=1.5,
        disk_ratio=1.0,
        reserved_memory_mib=2048,
        reserved_cpus=2,
        reserved_disk_gib=0,
    )


@pytest.mark.parametrize("name", ["cpu_ratio", "ram_ratio", "disk_ratio"])
@pytest.mark.parametrize("value", ["0", "-1.0"])
def test_overcommit_ratio_must_be_positive(tmp_path: Path, name: str, value: str) -> None:
    assert (
        refusal(write(tmp_path, f"[overcommit]\n{name} = {value}\n")) == f"overcommit.{name} must be positive"
    )


def test_overcommit_bad_number(tmp_path: Path) -> None:
    assert (
        refusal(write(tmp_path, '[overcommit]\nram_ratio = "lots"\n'))
        == "[overcommit]: ram_ratio must be a number, got 'lots'"
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert refusal(path) == f"config file {path} does not exist"


@pytest.mark.parametrize(
    "text", ["workers = ", "[overcommit\n", "a = 1\na = 2\n", "strategy = 'unterminated\n"]
)
def test_bad_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert refusal(path).startswith(f"config file {path} is not valid TOML: ")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == ControllerConfig()


def test_config_is_frozen() -> None:
    config = ControllerConfig()
    with pytest.raises(AttributeError):
        config.workers = 3  # type: ignore[misc]


@pytest.mark.parametrize("setting", ["workers = 2.5", "max_attempts = 1.5", "amqp_url = 5", "n_plus_one = 1"])
def test_wrong_toml_type_is_refused(tmp_path: Path, setting: str) -> None:
    with pytest.raises(InvalidRequest):
        load_config(write(tmp_path, setting + "\n"), env={})


def test_overcommit_that_is_not_a_table(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        load_config(write(tmp_path, "overcommit = 3\n"), env={})


def test_nan_down_after_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        load_config(env={"VIRTFLEET_DOWN_AFTER": "nan"})


def test_access_is_closed_by_default() -> None:
    access = load_config(env={}).access
    assert access.roles == {}
    assert (access.rate_per_s, access.burst, access.read_rate_per_s) == (10.0, 50, 0.0)


def test_access_roles_and_rates_from_file_and_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[access]\nrate_per_s = 2\nburst = 5\n[access.roles]\nalice = "operator"\nbob = "admin"\n',
    )
    access = load_config(path, env={}).access
    assert access.roles == {"alice": Role.OPERATOR, "bob": Role.ADMIN}
    assert (access.rate_per_s, access.burst) == (2.0, 5)
    env = {"VIRTFLEET_ACCESS_ROLES": "guest=admin, rita=reader", "VIRTFLEET_ACCESS_RATE_PER_S": "0"}
    access = load_config(path, env=env).access
    assert access.roles == {"guest": Role.ADMIN, "rita": Role.READER}  # the environment's table wins
    assert access.rate_per_s == 0.0


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (
            '[access.roles]\nalice = "root"\n',
            {},
            "login 'alice' has role 'root'; a role is one of reader, operator, admin",
        ),
        ('[access.roles]\nagent1 = "agent"\n', {}, "a role is one of reader, operator, admin"),
        ("", {"VIRTFLEET_ACCESS_ROLES": "alice"}, "expected LOGIN=ROLE items"),
        ("[access]\nrate_per_s = -1\n", {}, "access.rate_per_s must be 0 (no limit) or positive"),
        ("[access]\nburst = 0\n", {}, "access.burst and access.read_burst must be at least 1"),
        ("[access]\nrate = 3\n", {}, "unknown setting 'rate'"),
    ],
)
def test_access_refusals(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    assert message in refusal(write(tmp_path, text), env=env)


def test_signing_settings() -> None:
    assert load_config(env={}).master_key_file == ""
    config = load_config(env={"VIRTFLEET_MASTER_KEY_FILE": "/etc/virtfleet/master.key"})
    assert config.master_key_file == "/etc/virtfleet/master.key"
    assert "at least 600 s" in refusal(overrides={"max_message_lifetime_s": 300.0})
    assert "clock_skew_s" in refusal(overrides={"clock_skew_s": -1.0})


def test_security_names_the_logins_and_checks_them_unless_told_otherwise(tmp_path: Path) -> None:
    assert load_config(None, env={}).trust_broker_logins  # a deployed config is secure by default
    path = tmp_path / "c.toml"
    path.write_text(
        '[security]\ncontroller_login = "vf-ctl"\nagent_login = "hv-{host}"\ntrust_broker_logins = false\n'
    )
    config = load_config(path, env={})
    assert (config.logins.controller, config.logins.agent_login("h1")) == ("vf-ctl", "hv-h1")
    assert not config.trust_broker_logins
    assert load_config(None, env={"VIRTFLEET_TRUST_BROKER_LOGINS": "false"}).trust_broker_logins is False
    path.write_text('[security]\nagent_login = "agent"\n')
    with pytest.raises(InvalidRequest, match="exactly once"):
        load_config(path, env={})
    path.write_text("[security]\nroles = 1\n")
    with pytest.raises(InvalidRequest, match=r"\[security\] takes only"):
        load_config(path, env={})


def test_the_request_journal_retention_is_at_least_the_longest_request_life() -> None:
    assert ControllerConfig().request_retention_s == 86400.0
    with pytest.raises(InvalidRequest, match="request_retention_s must be at least 600"):
        ControllerConfig(request_retention_s=60)
