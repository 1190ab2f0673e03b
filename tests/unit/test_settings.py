"""Settings: flags win over environment variables, which win over defaults; bad values refused."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from clipserve.server.settings import (
    Device,
    ServerSettings,
    add_arguments,
    from_sources,
    parse_buckets,
    parse_length_buckets,
    setting_names,
)

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_without_flags_or_environment() -> None:
    settings = from_sources(parse([]), environ={})
    assert settings == ServerSettings()
    assert settings.device is Device.AUTO


def test_environment_overrides_defaults_and_flags_override_environment() -> None:
    environ = {"CLIPSERVE_PORT": "9000", "CLIPSERVE_VISION_MAX_BATCH_SIZE": "4",
               "CLIPSERVE_WARMUP": "false", "CLIPSERVE_DEVICE": "cpu"}
    settings = from_sources(parse(["--port", "9100"]), environ=environ)
    assert settings.port == 9100
    assert settings.vision_max_batch_size == 4
    assert settings.warmup is False
    assert settings.device is Device.CPU
    assert from_sources(parse(["--warmup"]), environ=environ).warmup is True


def test_every_field_is_a_flag_and_an_environment_variable() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    for f in dataclasses.fields(ServerSettings):
        assert f.name in flags
        assert f.metadata["help"]
    assert "CLIPSERVE_MAX_QUEUE_SIZE" in setting_names()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CLIPSERVE_PORT": "eighty"}, "CLIPSERVE_PORT"),
        ({"CLIPSERVE_WARMUP": "maybe"}, "expected a boolean"),
        ({"CLIPSERVE_MAX_QUEUE_SIZE": "0"}, "max_queue_size must be positive"),
        ({"CLIPSERVE_MAX_ITEMS_PER_REQUEST": "5000"}, "must not exceed max_queue_size"),
        ({"CLIPSERVE_BATCH_BUCKETS": "1,x"}, "batch_buckets: cannot parse"),
        ({"CLIPSERVE_TEXT_LENGTH_BUCKETS": "1,8"}, "lengths must be >= 2"),
        ({"CLIPSERVE_PREPROCESS_NICE": "25"}, "preprocess_nice must be 0 to 19"),
        ({"CLIPSERVE_SWITCH_INTERVAL_US": "-1"}, "switch_interval_us must be >= 0"),
        ({"CLIPSERVE_DRAIN_GRACE_S": "-1"}, "drain_grace_s and max_connection_age_s"),
        ({"CLIPSERVE_MAX_CONNECTION_AGE_S": "-5"}, "drain_grace_s and max_connection_age_s"),
        ({"CLIPSERVE_CUDNN_CONV_ALGO_SEARCH": "fastest"},
         "cudnn_conv_algo_search must be heuristic, exhaustive or default, got 'fastest'"),
        ({"CLIPSERVE_GPU_MEM_LIMIT_MB": "-1"}, "gpu_mem_limit_mb must be >= 0, got -1"),
        ({"CLIPSERVE_CUDA_GRAPHS": "true", "CLIPSERVE_IO_BINDING": "false"},
         "cuda_graphs needs io_binding"),
        ({"CLIPSERVE_URL_MAX_BYTES": "0"}, "url_max_bytes and url_timeout_s must be positive"),
        ({"CLIPSERVE_URL_TIMEOUT_S": "0"}, "url_max_bytes and url_timeout_s must be positive"),
        ({"CLIPSERVE_SESSION_FAILURE_THRESHOLD": "-1"},
         "session_failure_threshold and max_session_rebuilds must be >= 0"),
        ({"CLIPSERVE_MAX_SESSION_REBUILDS": "-1"},
         "session_failure_threshold and max_session_rebuilds must be >= 0"),
        ({"CLIPSERVE_BATCH_BUCKETS": "0,4"}, "batch_buckets: sizes must be >= 1"),
        ({"CLIPSERVE_TEXT_LENGTH_BUCKETS": "8,x"}, "text_length_buckets: cannot parse"),
    ],
)
def test_invalid_values_name_the_setting(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_sources(parse([]), environ=environ)


def test_switch_interval_setting_sets_the_interpreters() -> None:
    from clipserve.server.app import set_switch_interval

    settings = from_sources(parse(["--switch-interval-us", "500"]), environ={})
    before = sys.getswitchinterval()
    try:
        set_switch_interval(settings.switch_interval_us)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        set_switch_interval(0)  # the default leaves the interval as it is
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


def test_buckets() -> None:
    assert parse_buckets("pow2", 16) == (1, 2, 4, 8, 16)
    assert parse_buckets("pow2", 12) == (1, 2, 4, 8, 12)
    assert parse_buckets("all", 3) == (1, 2, 3)
    assert parse_buckets("1,4,64", 16) == (1, 4, 16)
    assert parse_length_buckets("8,16,32,77", 77) == (8, 16, 32, 77)
    assert parse_length_buckets("8,100", 77) == (8, 77)


def test_the_readme_settings_table_matches_the_code() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_serve_help_explains_every_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "clipserve", "serve", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for name in setting_names():
        assert name in result.stdout


def test_an_http_port_without_the_http_extra_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from clipserve.server.app import _http_api_class
    from clipserve.server.settings import ConfigError

    monkeypatch.setitem(sys.modules, "clipserve.server.http_api", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"http_port needs the `http` extra \(pip install"):
        _http_api_class()
