"""Settings: ``.env.example`` documents every variable with its real default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dotenv import dotenv_values

from actors.providers.replicate import ModelRef, ReplicateSettings
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
        ({"MAX_CONCURRENCY": "0"}, "MAX_CONCURRENCY"),
        ({"LOCAL_LATENCY_MS": "900-100"}, "LOCAL_LATENCY_MS"),
        ({"LOCAL_FAIL_RATE": "nan"}, "LOCAL_FAIL_RATE"),
        ({"MIN_IMAGES": "10", "MAX_IMAGES": "5"}, "MIN_IMAGES"),
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"AUTH_SECRET": "x" * 31}, "AUTH_SECRET"),
        ({"STORE": "postgres"}, "STORE"),
        ({"REDIS_URL": "http://127.0.0.1:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:port/0"}, "REDIS_URL"),
        ({"REDIS_PREFIX": "image gen:"}, "REDIS_PREFIX"),
        ({"REDIS_PREFIX": "imagegen*"}, "REDIS_PREFIX"),
        ({"DATABASE_SYNCHRONOUS": "off"}, "DATABASE_SYNCHRONOUS"),
        ({"STORE_IMAGES": "maybe"}, "STORE_IMAGES"),
        ({"IMAGE_MAX_BYTES": "0"}, "IMAGE_MAX_BYTES"),
        ({"IMAGES_MAX_BYTES": "-1"}, "IMAGES_MAX_BYTES"),
        ({"SHUTDOWN_GRACE_S": "-1"}, "SHUTDOWN_GRACE_S"),
        ({"MAX_STREAMS_PER_USER": "0"}, "MAX_STREAMS_PER_USER"),
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
            "MAX_STREAMS_PER_USER": "7",
        }
    )
    assert settings.port == 9000
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.local.latency_ms == (250, 250)
    assert settings.supervisor.retry.base_delay_s == 0.1
    assert settings.public_base_url == "https://img.example"
    assert settings.supervisor.max_streams_per_user == 7


def test_the_redis_store_is_chosen_with_its_server_and_prefix() -> None:
    store = load_settings(
        {"STORE": "Redis", "REDIS_URL": "redis://:pw@redis.internal:6380/2", "REDIS_PREFIX": "a:"}
    ).store

    assert (store.backend, store.redis_url, store.redis_prefix) == (
        "redis",
        "redis://:pw@redis.internal:6380/2",
        "a:",
    )


# --- Replicate ---------------------------------------------------------------------------------

VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
SIGNING_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # replicate-python's webhook test vector


def replicate_env(**variables: str) -> dict[str, str]:
    return {"REPLICATE_API_TOKEN": "r8_token", **variables}


@pytest.mark.parametrize("token", [None, "", "   "])
def test_without_a_replicate_token_the_local_provider_is_used(token: str | None) -> None:
    environ = {} if token is None else {"REPLICATE_API_TOKEN": token}
    assert load_settings(environ).replicate is None


def test_a_replicate_token_alone_gives_the_documented_defaults() -> None:
    replicate = load_settings({"REPLICATE_API_TOKEN": " r8_token "}).replicate

    assert replicate is not None
    assert replicate == ReplicateSettings(api_token="r8_token")
    assert replicate.model == ModelRef(name="black-forest-labs/flux-schnell", version=None)
    assert replicate.model_input == {}
    assert replicate.base_url == "https://api.replicate.com"
    assert replicate.wait_s == 60
    assert replicate.poll_interval_s == 0.25
    assert (replicate.webhook_url, replicate.webhook_secret, replicate.webhooks) == (
        None,
        None,
        False,
    )


@pytest.mark.parametrize(
    ("value", "model"),
    [
        ("stability-ai/sdxl", ModelRef(name="stability-ai/sdxl", version=None)),
        (f"stability-ai/sdxl:{VERSION}", ModelRef(name="stability-ai/sdxl", version=VERSION)),
        (VERSION, ModelRef(name=None, version=VERSION)),
        (f"  {VERSION}\n", ModelRef(name=None, version=VERSION)),
    ],
    ids=["owner/name", "owner/name:version", "version", "version-with-spaces"],
)
def test_replicate_model_forms(value: str, model: ModelRef) -> None:
    replicate = load_settings(replicate_env(REPLICATE_MODEL=value)).replicate
    assert replicate is not None
    assert replicate.model == model


@pytest.mark.parametrize(
    "value",
    [
        "flux",
        "a/b/c",
        "owner/name:latest",
        "owner/name:",
        f"owner/name:{VERSION[:-1]}",
        VERSION.upper(),
        "owner name/model",
        f":{VERSION}",
    ],
)
def test_malformed_replicate_model_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="REPLICATE_MODEL"):
        load_settings(replicate_env(REPLICATE_MODEL=value))


def test_replicate_input_is_a_json_object() -> None:
    replicate = load_settings(
        replicate_env(REPLICATE_INPUT='{"aspect_ratio": "16:9", "num_outputs": 1}')
    ).replicate
    assert replicate is not None
    assert replicate.model_input == {"aspect_ratio": "16:9", "num_outputs": 1}


@pytest.mark.parametrize("value", ['["a", "b"]', '"text"', "42", "{not json", "{'a': 1}"])
def test_replicate_input_other_than_a_json_object_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="REPLICATE_INPUT"):
        load_settings(replicate_env(REPLICATE_INPUT=value))


def test_replicate_webhooks_need_both_url_and_secret() -> None:
    replicate = load_settings(
        replicate_env(
            REPLICATE_WEBHOOK_URL="https://hooks.example/api/webhooks/replicate/",
            REPLICATE_WEBHOOK_SECRET=SIGNING_SECRET,
        )
    ).replicate
    assert replicate is not None
    assert replicate.webhook_url == "https://hooks.example/api/webhooks/replicate"
    assert replicate.webhook_secret == SIGNING_SECRET
    assert replicate.webhooks


@pytest.mark.parametrize(
    "variables",
    [
        {"REPLICATE_WEBHOOK_URL": "https://hooks.example/api/webhooks/replicate"},
        {"REPLICATE_WEBHOOK_SECRET": SIGNING_SECRET},
    ],
    ids=["url-only", "secret-only"],
)
def test_one_of_webhook_url_and_secret_alone_is_refused(variables: dict[str, str]) -> None:
    with pytest.raises(SettingsError, match="REPLICATE_WEBHOOK_URL and REPLICATE_WEBHOOK_SECRET"):
        load_settings(replicate_env(**variables))


@pytest.mark.parametrize(
    "secret",
    [
        SIGNING_SECRET.removeprefix("whsec_"),  # no prefix
        "whsec_",  # no key
        "whsec_not base64!",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS",  # bad padding
        "WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    ],
    ids=["no-prefix", "empty", "not-base64", "bad-padding", "upper-case-prefix"],
)
def test_malformed_webhook_secret_is_refused(secret: str) -> None:
    environ = replicate_env(
        REPLICATE_WEBHOOK_URL="https://hooks.example/api/webhooks/replicate",
        REPLICATE_WEBHOOK_SECRET=secret,
    )
    with pytest.raises(SettingsError, match="REPLICATE_WEBHOOK_SECRET"):
        load_settings(environ)


@pytest.mark.parametrize("value", ["hooks.example/replicate", "ftp://hooks.example/r", "https://"])
def test_webhook_url_must_be_http(value: str) -> None:
    environ = replicate_env(REPLICATE_WEBHOOK_URL=value, REPLICATE_WEBHOOK_SECRET=SIGNING_SECRET)
    with pytest.raises(SettingsError, match="REPLICATE_WEBHOOK_URL"):
        load_settings(environ)


@pytest.mark.parametrize("value", ["1", "60"])
def test_replicate_wait_s_bounds_are_accepted(value: str) -> None:
    replicate = load_settings(replicate_env(REPLICATE_WAIT_S=value)).replicate
    assert replicate is not None
    assert replicate.wait_s == int(value)


@pytest.mark.parametrize("value", ["0", "61", "-5"])
def test_replicate_wait_s_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="REPLICATE_WAIT_S"):
        load_settings(replicate_env(REPLICATE_WAIT_S=value))


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("600", 600), ("60000", 60_000)])
def test_replicate_max_creates_per_min_is_read(value: str, expected: int) -> None:
    replicate = load_settings(replicate_env(REPLICATE_MAX_CREATES_PER_MIN=value)).replicate
    assert replicate is not None
    assert replicate.max_creates_per_min == expected


def test_replicate_max_creates_per_min_defaults_to_replicates_limit() -> None:
    replicate = load_settings(replicate_env()).replicate
    assert replicate is not None
    assert replicate.max_creates_per_min == 600


@pytest.mark.parametrize("value", ["0", "60001", "-1", "ten", "1.5"])
def test_replicate_max_creates_per_min_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="REPLICATE_MAX_CREATES_PER_MIN"):
        load_settings(replicate_env(REPLICATE_MAX_CREATES_PER_MIN=value))


def test_replicate_numbers_are_parsed() -> None:
    replicate = load_settings(
        replicate_env(
            REPLICATE_BASE_URL="http://127.0.0.1:9000/",
            REPLICATE_WAIT_S="5",
            REPLICATE_POLL_INTERVAL_MS="50",
            REPLICATE_TIMEOUT_S="2.5",
            REPLICATE_WEBHOOK_POLL_INTERVAL_S="30",
        )
    ).replicate
    assert replicate is not None
    assert (replicate.base_url, replicate.wait_s, replicate.poll_interval_s) == (
        "http://127.0.0.1:9000",
        5,
        0.05,
    )
    assert (replicate.request_timeout_s, replicate.webhook_poll_interval_s) == (2.5, 30.0)
