"""How `dnschaos run` builds its settings: flags > DNSCHAOS_* environment
variables (only those set) > the config file > the built-in defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import build_parser, load_settings, settings_values
from proxy.config import DEFAULT_ADMIN, DEFAULT_LISTEN
from proxy.errors import DnschaosError


def run_args(*argv: str):
    return build_parser().parse_args(["run", *argv])


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "dnschaos.yaml"
    path.write_text('listen: ["0.0.0.0:1053"]\nadmin: "0.0.0.0:5380"\n'
                    'upstreams: ["10.0.0.2:53"]\nallow: ["10.0.0.0/8"]\npolicy: random\n')
    return path


def test_without_variables_the_config_file_applies(config):
    for environ in ({}, {"DNSCHAOS_LISTEN": "", "DNSCHAOS_ADMIN_LISTEN": "  ",
                         "DNSCHAOS_UPSTREAMS": ""}):  # empty is as unset
        settings = load_settings(run_args("--config", str(config)), environ)
        assert settings.listen == ["0.0.0.0:1053"] and settings.admin == "0.0.0.0:5380"
        assert settings.upstreams == ["10.0.0.2:53"] and settings.policy == "random"


def test_the_config_file_can_come_from_dnschaos_config(config):
    settings = load_settings(run_args(), {"DNSCHAOS_CONFIG": str(config)})
    assert settings.listen == ["0.0.0.0:1053"]
    with pytest.raises(DnschaosError, match="cannot read config file"):
        settings_values(run_args(), {"DNSCHAOS_CONFIG": str(config) + ".missing"})


def test_a_variable_set_overrides_the_file_and_a_flag_overrides_both(config):
    environ = {"DNSCHAOS_CONFIG": str(config), "DNSCHAOS_LISTEN": "0.0.0.0:2053, [::]:2053",
               "DNSCHAOS_ADMIN_LISTEN": "0.0.0.0:6380",
               "DNSCHAOS_UPSTREAMS": "10.0.0.3 10.0.0.4:5300",
               "DNSCHAOS_ALLOW": "172.28.0.0/24", "DNSCHAOS_ADMIN_TOKEN": "from-env"}
    settings = load_settings(run_args(), environ)
    assert settings.listen == ["0.0.0.0:2053", "[::]:2053"]
    assert settings.admin == "0.0.0.0:6380" and settings.admin_token == "from-env"
    assert settings.upstreams == ["10.0.0.3:53", "10.0.0.4:5300"]
    assert [str(c) for c in settings.allow] == ["172.28.0.0/24"]
    assert settings.policy == "random"  # not in the environment: the file's
    flagged = load_settings(run_args("--listen", "127.0.0.1:3053", "--admin", "off"), environ)
    assert flagged.listen == ["127.0.0.1:3053"] and flagged.admin is None
    assert flagged.upstreams == ["10.0.0.3:53", "10.0.0.4:5300"]


def test_dnschaos_admin_is_not_the_listen_address(config):
    """DNSCHAOS_ADMIN used to be both the image's listen address and the
    client's URL; `dnschaos run` reads DNSCHAOS_ADMIN_LISTEN, the client DNSCHAOS_API."""
    environ = {"DNSCHAOS_ADMIN": "http://10.1.1.1:5380", "DNSCHAOS_API": "http://10.1.1.1:5380"}
    assert load_settings(run_args("--config", str(config)), environ).admin == "0.0.0.0:5380"


def test_nothing_given_gives_the_built_in_defaults():
    settings = load_settings(run_args("--upstream", "127.0.0.1:53"), {})
    assert settings.listen == [DEFAULT_LISTEN] == ["127.0.0.1:1053"]  # 5353 is mDNS
    assert settings.admin == DEFAULT_ADMIN == "127.0.0.1:5380"


def test_the_fast_path_is_on_unless_turned_off():
    up = ["--upstream", "127.0.0.1:53"]
    assert load_settings(run_args(*up), {}).accelerate is True
    assert load_settings(run_args(*up), {"DNSCHAOS_ACCEL": "1"}).accelerate is True
    assert load_settings(run_args(*up), {"DNSCHAOS_ACCEL": "0"}).accelerate is False
    assert load_settings(run_args(*up, "--no-accel"), {}).accelerate is False
