from __future__ import annotations

from pathlib import Path

import pytest

from dotllm import cli
from dotllm.settings import Settings, default_compile_workers


def test_settings_round_trip_through_the_environment():
    settings = Settings(compile_workers=3, compile_timeout=2.5, max_index_mib=7,
                                index_cache_url="memory://x", index_cache_dir="off")
    assert Settings.from_environ(settings.to_environ()) == settings
    assert Settings.from_environ({}) == Settings()


def test_disk_dir_default_explicit_and_off(tmp_path):
    assert Settings().disk_dir(tmp_path) == tmp_path / "indexes"
    assert Settings(index_cache_dir="/x").disk_dir(tmp_path) == Path("/x")
    assert Settings(index_cache_dir="off").disk_dir(tmp_path) is None
    assert Settings(compile_workers=5).workers == 5
    assert Settings().workers >= 1


def test_cli_options_become_settings_and_environment_gives_defaults(monkeypatch, embedded_model):
    monkeypatch.setenv("DOTLLM_COMPILE_TIMEOUT", "9")
    args = cli.build_serve_parser(on_gpu=False).parse_args(
        [str(embedded_model), "--dotllm-compile-workers", "2", "--dotllm-index-cache-url",
         "file:///tmp/shared-indexes"])
    settings = cli.dotllm_settings(args)
    assert settings.compile_workers == 2
    assert settings.compile_timeout == 9.0
    assert settings.index_cache_url == "file:///tmp/shared-indexes"


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 1), (4, 2), (8, 6), (16, 12),
                                                (128, 16)])
def test_compile_workers_follow_the_cores_leaving_the_engine_its_share(cores, workers):
    assert default_compile_workers(cores) == workers
