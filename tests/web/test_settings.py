"""Settings: ``.env.example`` documents every variable with its real default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dotenv import dotenv_values

from web.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).parents[2]


def example() -> dict[str, str]:
    values = dotenv_values(ROOT / ".env.example")
    return {key: value or "" for key, value in values.items()}


def test_env_example_lists_every_variable_the_loader_reads() -> None:
    source = (ROOT / "web" / "settings.py").read_text()
    read = set(re.findall(r'env\.(?:get|text)\(\s*"([A-Z_]+)"', source))
    assert read
    assert read == set(example())


def test_env_example_defaults_are_the_real_defaults() -> None:
    assert load_settings(example()) == load_settings({}) == Settings()


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"MAX_CONCURRENCY": "0"}, "capacity"),
        ({"LOCAL_LATENCY_MS": "900-100"}, "LOCAL_LATENCY_MS"),
        ({"LOCAL_FAIL_RATE": "nan"}, "LOCAL_FAIL_RATE"),
        ({"MIN_IMAGES": "10", "MAX_IMAGES": "5"}, "MIN_IMAGES"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"AUTH_SECRET": "x" * 31}, "AUTH_SECRET"),
    ],
)
def test_malformed_settings_name_the_variable(environ: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        load_settings(environ)


def test_values_are_parsed() -> None:
    settings = load_settings(
        {
            "PORT": "9000",
            "ALLOWED_ORIGINS": "https://a.example, https://b.example/",
            "LOCAL_LATENCY_MS": "250",
            "RETRY_BASE_DELAY_MS": "100",
            "PUBLIC_BASE_URL": "https://img.example/",
        }
    )
    assert settings.port == 9000
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.local.latency_ms == (250, 250)
    assert settings.supervisor.retry.base_delay_s == 0.1
    assert settings.public_base_url == "https://img.example"
