"""Settings from the environment: a bad value is refused with the variable's name."""

from __future__ import annotations

import pytest

from service.config import Settings, SettingsError, UnlearnSettings, load_settings


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("LETHE_FORWARDED_ALLOW_IPS", "10.0.0.0/8, proxy", "'proxy' is not an IP address, a CIDR range or *"),
    ("LETHE_LOG_LEVEL", "LOUD", "unknown log level 'LOUD'"),
    ("LETHE_DEADLINE_DAYS", "0", "greater than or equal to 1"),
])
def test_a_bad_service_setting_names_its_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"^invalid setting {variable}: .*{message}"):
        load_settings(Settings)


@pytest.mark.parametrize(("variable", "value"), [("LETHE_UNLEARN_ADAPTER_BLOCKS", "first-half"),
                                                 ("LETHE_UNLEARN_METHOD", "ng-retain")])
def test_a_bad_unlearning_setting_names_its_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"^invalid setting {variable}: "):
        load_settings(UnlearnSettings)


def test_trusted_proxies_are_normalised_and_star_is_allowed(monkeypatch):
    monkeypatch.setenv("LETHE_FORWARDED_ALLOW_IPS", " 10.0.0.0/8 ,192.168.1.7,*")
    assert load_settings(Settings).forwarded_allow_ips == "10.0.0.0/8,192.168.1.7,*"
