"""Settings from the environment: a bad value is refused with the variable's name."""

from __future__ import annotations

import pytest

from service.config import Settings, SettingsError, UnlearnSettings, load_settings
from worker.engine.config import UnlearnConfig


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("LETHE_FORWARDED_ALLOW_IPS", "10.0.0.0/8, proxy", "'proxy' is not an IP address, a CIDR range or *"),
    ("LETHE_LOG_LEVEL", "LOUD", "unknown log level 'LOUD'"),
    ("LETHE_DEADLINE_DAYS", "0", "greater than or equal to 1"),
    ("LETHE_DEADLINE", "1M", "'1M' is not an ISO 8601 period"),
    ("LETHE_DEADLINE", "PT72H", "not an ISO 8601 period of years, months, weeks or days"),
    ("LETHE_DEADLINE", "P0D", "an empty period"),
    ("LETHE_DEADLINE", "P9999W99999D", "longer than a year"),
    ("LETHE_DEADLINE_DAYS", "100000", "less than or equal to 366"),
    ("LETHE_GATE_HOLDOUT_FOLDS", "1", "one fold holds back the whole forget set"),
    ("LETHE_GATE_HOLDOUT_FOLDS", "-1", "greater than or equal to 0"),
    ("LETHE_GATE_MAX_HOLDOUT_FORGET_ACC", "101", "less than or equal to 100"),
])
def test_a_bad_service_setting_names_its_variable(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"^invalid setting {variable}: .*{message}"):
        load_settings(Settings)


@pytest.mark.parametrize(("variable", "value"), [("LETHE_UNLEARN_ADAPTER_BLOCKS", "first-half"),
                                                 ("LETHE_UNLEARN_METHOD", "ng-retain"),
                                                 ("LETHE_UNLEARN_TARGETS", " , "),
                                                 ("LETHE_UNLEARN_AUGMENT", "sometimes"),
                                                 ("LETHE_UNLEARN_CONFIRM_VIEWS", "-1"),
                                                 ("LETHE_UNLEARN_MAX_FORGET_PROB", "0"),
                                                 ("LETHE_UNLEARN_ANCHOR_WEIGHT", "0"),
                                                 ("LETHE_UNLEARN_ANCHOR_WEIGHT", "inf"),
                                                 ("LETHE_UNLEARN_FEW_IMAGES_LR", "inf"),
                                                 ("LETHE_UNLEARN_LR", "nan"),
                                                 ("LETHE_UNLEARN_CONFIRM_VIEWS", "65")])
def test_a_bad_unlearning_setting_names_its_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"^invalid setting {variable}: "):
        load_settings(UnlearnSettings)


@pytest.mark.parametrize(("value", "written"), [
    (" 10.1.2.3/8 ,192.168.1.7", "10.0.0.0/8,192.168.1.7"),  # the form uvicorn parses strictly
    ("*", "*"), ("::1, fd00::/8", "::1,fd00::/8"),
])
def test_trusted_proxies_are_written_in_the_form_uvicorn_matches(monkeypatch, value, written):
    monkeypatch.setenv("LETHE_FORWARDED_ALLOW_IPS", value)
    assert load_settings(Settings).forwarded_allow_ips == written


def test_star_among_addresses_is_refused_since_it_would_match_nothing(monkeypatch):
    monkeypatch.setenv("LETHE_FORWARDED_ALLOW_IPS", "10.0.0.1,*")
    with pytest.raises(SettingsError, match="give \\* alone"):
        load_settings(Settings)


def test_a_worker_with_a_bad_unlearning_setting_does_not_start(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "LETHE_HOME": str(tmp_path), "LETHE_UNLEARN_ADAPTER_BLOCKS": "first-half"}
    done = subprocess.run([sys.executable, "-m", "service.cli", "worker"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("lethe: error: invalid setting LETHE_UNLEARN_ADAPTER_BLOCKS: ")


def test_a_run_whose_smallest_forget_set_is_few_images_gets_the_few_image_setting():
    knobs = UnlearnSettings()
    many, few = knobs.engine_settings(knobs.few_images_below), knobs.engine_settings(knobs.few_images_below - 1)
    regime = ("targets", "lr", "augment", "max_forget_prob")
    assert tuple(many[k] for k in regime) == (("qkv",), None, False, 1.0)
    assert tuple(few[k] for k in regime) == (("qkv", "proj", "fc1", "fc2"), 1e-3, True, 0.05)
    assert {k: v for k, v in many.items() if k not in regime} == {k: v for k, v in few.items() if k not in regime}


def test_many_image_runs_on_template_head_rows_get_the_head_row_feature_setting(monkeypatch):
    from service.config import TEMPLATE_HEAD_SETTING

    knobs = UnlearnSettings()
    many, few = knobs.few_images_below, knobs.few_images_below - 1
    templates, not_templates = knobs.engine_settings(many, 0.99), knobs.engine_settings(many, 0.7)
    assert templates == not_templates | TEMPLATE_HEAD_SETTING and templates["feature_prototypes"] == "head"
    assert not_templates == knobs.engine_settings(many) and not_templates["feature_weight"] == 0.0
    assert knobs.engine_settings(few, 0.99) == knobs.engine_settings(few)  # few images: measured without it
    assert knobs.engine_settings(many, knobs.head_template_cosine) == templates  # the threshold is a template
    for variable, value in (("TEMPLATE_HEAD_SETTING", "false"), ("METHOD", "lora-bounded")):
        with monkeypatch.context() as env:  # off, or a method the feature term cannot act with
            env.setenv(f"LETHE_UNLEARN_{variable}", value)
            assert UnlearnSettings().engine_settings(many, 0.99) == UnlearnSettings().engine_settings(many)
            UnlearnConfig(**UnlearnSettings().engine_settings(many, 0.99))
    for cosine in (0.0, 0.99):
        UnlearnConfig(**knobs.engine_settings(many, cosine))  # both settings are ones the engine takes


def test_every_run_resets_the_forgotten_rows_unless_told_not_to(monkeypatch):
    knobs = UnlearnSettings()
    assert knobs.engine_settings(1)["reset_head_rows"] is knobs.engine_settings(5000)["reset_head_rows"] is True
    monkeypatch.setenv("LETHE_UNLEARN_RESET_HEAD_ROWS", "false")
    assert UnlearnSettings().engine_settings(5000)["reset_head_rows"] is False


def test_the_feature_setting_reaches_many_image_runs_only(monkeypatch):
    for variable, value in {"FEATURE_WEIGHT": "30", "FEATURE_TOL": "0.05", "SYNTHETIC_ANCHOR": "true",
                            "BOUNDARY_ANCHOR": "true", "ANCHOR_FEATURE_WEIGHT": "10", "FEATURE_PROTOTYPES": "head",
                            "HEAD_TEMPLATE_COSINE": "0.8"}.items():
        monkeypatch.setenv(f"LETHE_UNLEARN_{variable}", value)
    knobs = UnlearnSettings()
    feature = ("feature_weight", "feature_tol", "synthetic_anchor", "boundary_anchor", "anchor_feature_weight",
               "feature_prototypes")
    many, few = knobs.engine_settings(knobs.few_images_below), knobs.engine_settings(knobs.few_images_below - 1)
    assert tuple(many[k] for k in feature) == (30.0, 0.05, True, True, 10.0, "head")
    assert tuple(few[k] for k in feature) == (0.0, 1.0, False, False, 0.0, "synthetic")  # measured on many images only
    assert many["head_template_cosine"] == 0.8
    UnlearnConfig(**few), UnlearnConfig(**many)  # both settings are ones the engine takes


def test_a_feature_term_without_a_teacher_method_is_refused_at_start(monkeypatch):
    monkeypatch.setenv("LETHE_UNLEARN_FEATURE_WEIGHT", "30")
    monkeypatch.setenv("LETHE_UNLEARN_METHOD", "lora-bounded")
    with pytest.raises(SettingsError, match="LETHE_UNLEARN_FEATURE_WEIGHT needs a method with a teacher"):
        load_settings(UnlearnSettings)


def test_head_prototypes_without_the_feature_term_are_refused_at_start(monkeypatch):
    monkeypatch.setenv("LETHE_UNLEARN_FEATURE_PROTOTYPES", "head")
    with pytest.raises(SettingsError, match="LETHE_UNLEARN_FEATURE_PROTOTYPES.*LETHE_UNLEARN_FEATURE_WEIGHT"):
        load_settings(UnlearnSettings)


@pytest.mark.parametrize("variable", ["ANCHOR_FEATURE_WEIGHT", "BOUNDARY_ANCHOR"])
def test_anchor_settings_without_the_synthetic_anchor_are_refused_at_start(monkeypatch, variable):
    monkeypatch.setenv(f"LETHE_UNLEARN_{variable}", "10" if variable.endswith("WEIGHT") else "true")
    with pytest.raises(SettingsError, match=f"LETHE_UNLEARN_{variable}.*LETHE_UNLEARN_SYNTHETIC_ANCHOR=true"):
        load_settings(UnlearnSettings)


def test_service_runs_train_on_their_own_batch_size_whatever_the_forget_set_s_size(monkeypatch):
    monkeypatch.setenv("LETHE_UNLEARN_BATCH_SIZE", "64")
    knobs = UnlearnSettings()
    assert knobs.engine_settings(5000)["batch_size"] == knobs.engine_settings(1)["batch_size"] == 64
    monkeypatch.setenv("LETHE_UNLEARN_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="batch_size"):
        UnlearnSettings()


def test_without_a_few_image_threshold_every_size_gets_the_same_setting():
    knobs = UnlearnSettings(few_images_below=0)
    assert knobs.engine_settings(1) == knobs.engine_settings(5000)


def test_the_engine_settings_make_a_valid_engine_config():
    from worker.engine import UnlearnConfig

    for size in (1, 5000):
        UnlearnConfig(**UnlearnSettings().engine_settings(size))  # raises ConfigError on a bad knob


@pytest.mark.parametrize(("env", "deadline"), [({}, "P1M"), ({"LETHE_DEADLINE": "p45d"}, "P45D"),
                                               ({"LETHE_DEADLINE": "P2W"}, "P14D"),
                                               ({"LETHE_DEADLINE_DAYS": "45"}, "P45D")])
def test_the_deadline_is_an_iso_8601_period_one_month_unless_set(monkeypatch, env, deadline):
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    assert load_settings(Settings).deadline == deadline


def test_the_deadline_and_its_older_form_in_days_cannot_both_be_set(monkeypatch):
    monkeypatch.setenv("LETHE_DEADLINE", "P1M")
    monkeypatch.setenv("LETHE_DEADLINE_DAYS", "30")
    with pytest.raises(SettingsError, match="^invalid settings: set LETHE_DEADLINE or the older LETHE_DEADLINE_DAYS"):
        load_settings(Settings)
