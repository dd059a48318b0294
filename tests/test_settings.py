"""Settings come from the environment and an `.env` file; the suite is isolated from both."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddserve.settings import Settings, env_file, settings_table


def test_the_suite_reads_no_env_file_and_no_developer_variables() -> None:
    assert env_file() is None
    assert Settings().redis_url is None  # whatever the developer's shell or .env says


def test_env_file_variable_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDSERVE_ENV_FILE", "deploy/prod.env")
    assert env_file() == "deploy/prod.env"
    monkeypatch.delenv("DDSERVE_ENV_FILE")
    assert env_file() == ".env"


def test_values_come_from_the_file_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ddserve.env"
    path.write_text("DDSERVE_REDIS_URL=redis://redis:6379/0\nDDSERVE_MAX_BATCH=32\n")
    settings = Settings(_env_file=path)
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.max_batch == 32
    monkeypatch.setenv("DDSERVE_MAX_BATCH", "8")
    assert Settings(_env_file=path).max_batch == 8


def test_the_readme_table_lists_every_setting() -> None:
    table = settings_table()
    for name in Settings.model_fields:
        assert f"`DDSERVE_{name.upper()}`" in table
    assert "`DDSERVE_ENV_FILE`" in table
