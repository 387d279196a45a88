"""Settings: CM_ environment variables, the --config file, and refusals that name the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.registry import EMBEDDED_DEFAULT, ModelFilesError, check_model_files, model_specs
from service.settings import Settings, SettingsError, load_settings, settings_table, worker_cpus


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CM_"):
            monkeypatch.delenv(name)


def test_defaults_match_the_contract() -> None:
    s = load_settings()
    assert (s.host, s.port, s.models, s.default_model, s.device, s.dtype) == ("127.0.0.1", 8000, {}, "", "auto", "fp32")
    assert (s.channels_last, s.compile) == (False, False)
    assert s.batch_buckets == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert (s.max_batch, s.max_wait_ms, s.max_queue, s.max_images_per_request, s.max_steps) == (256, 2.0, 4096, 64, 8)
    assert (s.request_timeout_s, s.drain_s, s.api_keys, s.max_body_bytes) == (30.0, 20.0, [], 1 << 20)
    assert (s.encode_threads, s.log_level, s.rate_limit_per_key) == (2, "info", 0.0)
    assert s.model_names == ["digits"] and s.default_model_name == "digits"


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CM_MODELS", "a=/m/a.safetensors, b = /m/b.safetensors")
    monkeypatch.setenv("CM_DEFAULT_MODEL", "b")
    monkeypatch.setenv("CM_BATCH_BUCKETS", "16,1,4,4")
    monkeypatch.setenv("CM_MAX_BATCH", "10")
    monkeypatch.setenv("CM_API_KEYS", "k" * 16 + "," + "j" * 20)
    monkeypatch.setenv("CM_COMPILE", "true")
    s = load_settings()
    assert s.models == {"a": Path("/m/a.safetensors"), "b": Path("/m/b.safetensors")}
    assert s.default_model_name == "b" and s.model_names == ["a", "b"]
    assert s.batch_buckets == [1, 4, 16] and s.buckets == [1, 4, 16]
    assert s.api_keys == ["k" * 16, "j" * 20] and s.compile is True
    assert "kkkk" not in repr(s)  # keys never printed


def test_torch_threads_default_to_the_cpus_shared_among_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert load_settings().workers == 1 and load_settings().cpu_threads == 5
    assert load_settings(workers=2).cpu_threads == 2
    assert load_settings(workers=8).cpu_threads == 1
    assert load_settings(workers=2, torch_threads=3).cpu_threads == 3


def test_buckets_stop_at_the_first_that_holds_max_batch() -> None:
    assert load_settings(max_batch=8).buckets == [1, 2, 4, 8]
    assert load_settings(max_batch=5).buckets == [1, 2, 4, 8]
    assert load_settings(max_batch=256).buckets[-1] == 256


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CM_PORT": "http"}, "CM_PORT: Input should be a valid integer"),
        ({"CM_PORT": "70000"}, "CM_PORT: Input should be less than or equal to 65535"),
        ({"CM_DTYPE": "fp64"}, "CM_DTYPE: Input should be 'fp32', 'bf16' or 'fp16'"),
        ({"CM_DEVICE": "tpu"}, "CM_DEVICE='tpu' is not one of auto, cpu, cuda, cuda:N"),
        ({"CM_MODELS": "just-a-path.safetensors"}, "is not name=path"),
        ({"CM_MODELS": "a=/x,a=/y"}, "names the model 'a' twice"),
        ({"CM_MODELS": "bad name=/x"}, "model name 'bad name' must match"),
        ({"CM_BATCH_BUCKETS": "0,4"}, "CM_BATCH_BUCKETS must list positive batch sizes"),
        ({"CM_MAX_BATCH": "512"}, "CM_MAX_BATCH=512 exceeds the largest of CM_BATCH_BUCKETS"),
        ({"CM_DEFAULT_MODEL": "nope"}, "CM_DEFAULT_MODEL='nope' is not one of the served models ['digits']"),
        ({"CM_API_KEYS": "short"}, "CM_API_KEYS holds 1 key(s) shorter than 16 characters"),
        ({"CM_MAX_QUEUE": "0"}, "CM_MAX_QUEUE: Input should be greater than or equal to 1"),
        ({"CM_LOG_LEVEL": "loud"}, "CM_LOG_LEVEL: Input should be"),
        ({"CM_WORKERS": "0"}, "CM_WORKERS: Input should be greater than or equal to 1"),
        ({"CM_WORKERS": "2", "CM_DEVICE": "cuda:0"}, "CM_WORKERS=2 needs CM_DEVICE=cpu"),
        ({"CM_BATCH_INVARIANT": "maybe"}, "CM_BATCH_INVARIANT: Input should be a valid boolean"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert message in str(e.value)


def test_api_keys_never_appear_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CM_API_KEYS", "secret1")
    with pytest.raises(SettingsError) as e:
        load_settings()
    assert "secret1" not in str(e.value)


def test_config_file_with_environment_on_top(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "cmserve.env"
    config.write_text("# serving settings\nCM_PORT=9001\nCM_MAX_BATCH=32\nexport CM_LOG_LEVEL=debug\n")
    s = load_settings(config)
    assert (s.port, s.max_batch, s.log_level) == (9001, 32, "debug")
    monkeypatch.setenv("CM_PORT", "9002")
    assert load_settings(config).port == 9002


def test_config_file_refuses_unknown_names(tmp_path: Path) -> None:
    config = tmp_path / "cmserve.env"
    config.write_text("CM_PORT=9001\nCM_MAX_BACTH=32\n")
    with pytest.raises(SettingsError, match=r"cmserve.env:2: unknown setting 'CM_MAX_BACTH'; known settings: \["):
        load_settings(config)
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(tmp_path / "missing.env")


def test_every_setting_is_documented() -> None:
    table = settings_table()
    for name, info in Settings.model_fields.items():
        assert info.description, f"setting {name} has no description"
        assert f"| `CM_{name.upper()}` |" in table
    assert "| `CM_MAX_QUEUE` | `4096` |" in table and "| `CM_BATCH_BUCKETS` | `1,2,4,8,16,32,64,128,256` |" in table


def test_model_files_are_checked_before_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CM_MODELS", f"a={tmp_path / 'a.safetensors'}")
    with pytest.raises(ModelFilesError, match=r"CM_MODELS names files that do not exist: a=.*a\.safetensors"):
        check_model_files(load_settings())
    (tmp_path / "a.safetensors").write_bytes(b"x")
    assert [spec.name for spec in check_model_files(load_settings())] == ["a"]


def test_no_models_and_no_embedded_default_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import service.registry as registry

    monkeypatch.setattr(registry, "EMBEDDED_DEFAULT", tmp_path / "digits.safetensors")
    with pytest.raises(ModelFilesError, match=r"CM_MODELS is empty and the embedded default checkpoint .* does not"):
        registry.check_model_files(load_settings())


def test_embedded_default_is_served_as_digits() -> None:
    (spec,) = model_specs(load_settings())
    assert spec.name == "digits" and spec.path == EMBEDDED_DEFAULT
    assert EMBEDDED_DEFAULT.parts[-3:] == ("models", "pretrained", "digits.safetensors")


def test_worker_cpus_split_every_usable_cpu_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {7, 1, 3, 5, 9}, raising=False)
    assert [worker_cpus(i, 2) for i in range(2)] == [[1, 3], [5, 7, 9]]
    assert [worker_cpus(i, 5) for i in range(5)] == [[1], [3], [5], [7], [9]]
    assert worker_cpus(0, 1) == [1, 3, 5, 7, 9]
    assert worker_cpus(0, 6) is None  # more workers than CPUs: the OS places them


def test_the_readme_lists_every_setting_as_the_table_prints_it() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    assert settings_table() in readme, "README.md's settings table is stale: paste `python -m service --settings-table`"


def test_the_request_head_and_read_limits_default_as_documented() -> None:
    s = Settings()
    assert (s.max_header_bytes, s.max_headers, s.read_timeout_s) == (16384, 100, 10.0)


@pytest.mark.parametrize("text", [
    "CM_MAX_BATCH=8\nCM_API_KEYS=first-key-0123456789\nsecond-key-0123456789\n",  # the value ran onto line 3
    'CM_API_KEYS="first-key-0123456789,\nsecond-key-0123456789"\n',  # a quoted value over two lines
    "CM_API_KEYS=first-key-0123456789,\nSECONDKEY0123456789=\n",  # a continuation that looks like a name
])
def test_a_key_that_runs_onto_another_line_of_a_config_file_is_never_quoted(tmp_path: Path, text: str) -> None:
    config = tmp_path / "cmserve.env"
    config.write_text(text)
    with pytest.raises(SettingsError) as e:
        load_settings(config)
    message = str(e.value)
    assert "first-key" not in message and "second-key" not in message.lower() and "SECONDKEY" not in message
    assert f"{config}:" in message  # the line is named by its number


def test_frontends_must_be_at_least_one_and_exclude_workers() -> None:
    with pytest.raises(SettingsError, match="CM_FRONTENDS"):
        load_settings(frontends=0)
    with pytest.raises(SettingsError, match=r"CM_FRONTENDS=2 and CM_WORKERS=3"):
        load_settings(frontends=2, workers=3)
    assert load_settings(frontends=4).frontends == 4 and load_settings().frontends == 1
