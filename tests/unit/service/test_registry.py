"""The registry (service/registry.py): which models are served, and how a request's names become numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import checkpoint
from models.config import preset
from models.consistency import ConsistencyModel
from models.denoiser import Denoiser
from service.errors import InvalidRequest, UnknownModel
from service.registry import (
    DEFAULT_MODEL_NAME,
    EMBEDDED_DEFAULT,
    ModelFilesError,
    ModelSpec,
    Registry,
    ServedModel,
    check_model_files,
    default_max_images,
    load_model,
    max_images_for,
    model_specs,
)
from service.settings import Settings

TINY = preset("digits").replace(model_channels=16, num_groups=4)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    checkpoint.save(path, ConsistencyModel.from_config(TINY), preset="digits",
                    class_names=[f"digit-{d}" for d in range(10)])
    settings = Settings(models={"tiny": path}, batch_buckets=[1], max_batch=1, max_steps=4)
    return load_model(ModelSpec("tiny", path), settings)


def test_without_cm_models_the_embedded_default_is_served(tmp_path: Path) -> None:
    assert model_specs(Settings()) == [ModelSpec(DEFAULT_MODEL_NAME, EMBEDDED_DEFAULT)]
    given = {"a": tmp_path / "a.safetensors"}
    assert model_specs(Settings(models=given)) == [ModelSpec("a", given["a"])]


def test_the_default_model_answers_requests_that_name_none(served: ServedModel) -> None:
    registry = Registry("tiny")
    registry.add(served)
    assert registry.get(None) is served and registry.get("tiny") is served
    with pytest.raises(UnknownModel, match=r"unknown model 'x'; served models: \['tiny'\]") as e:
        registry.get("x")
    assert e.value.field == "model"


@pytest.mark.parametrize(("size", "cap", "expected"), [(8, 64, 64), (64, 64, 64), (256, 64, 16), (1024, 64, 1)])
def test_images_per_request_default_to_about_a_megapixel(size: int, cap: int, expected: int) -> None:
    assert default_max_images(size, cap) == expected


def test_an_explicit_images_per_request_setting_wins() -> None:
    assert max_images_for(Settings(), 256) == 16
    assert max_images_for(Settings(max_images_per_request=40), 256) == 40


def test_steps_take_the_recommended_schedule_and_sigmas_are_checked(served: ServedModel) -> None:
    assert served.resolve_sigmas(None, None) == served.schedules[1] == [80.0]
    assert served.resolve_sigmas(2, None) == served.schedules[2]
    assert served.resolve_sigmas(None, [80.0, 1.0]) == [80.0, 1.0]
    for steps, sigmas, field in [(5, None, "steps"), (0, None, "steps"), (None, [80.0, 90.0], "sigmas"),
                                 (None, [80.0, 1.0, 0.5, 0.2, 0.1], "sigmas")]:
        with pytest.raises(InvalidRequest) as e:
            served.resolve_sigmas(steps, sigmas)
        assert e.value.field == field


def test_class_labels_by_index_or_by_name(served: ServedModel) -> None:
    assert served.resolve_class_label(None) is None
    assert served.resolve_class_label(3) == 3
    assert served.resolve_class_label("digit-7") == 7
    for bad in (10, -1, "seven", "3"):  # "3" is no name of this model's classes
        with pytest.raises(InvalidRequest) as e:
            served.resolve_class_label(bad)
        assert e.value.field == "class_label"


def test_jobs_carry_the_model_schedule_and_seed(served: ServedModel) -> None:
    job = served.make_job(seed=5, n=2, sigmas=[80.0], class_label=None, deadline=1.0)
    assert (job.model, job.seed, job.n, job.sigmas, job.deadline) == ("tiny", 5, 2, [80.0], 1.0)


def test_a_denoiser_file_is_refused_with_one_line_naming_it(tmp_path: Path) -> None:
    """An EDM denoiser (training --recipe edm) is not a consistency model: refused at start-up and at load."""
    path = checkpoint.save(tmp_path / "edm.safetensors", Denoiser.from_config(TINY.replace(kind="denoiser")))
    settings = Settings(models={"edm": path}, batch_buckets=[1], max_batch=1)
    for attempt in (lambda: check_model_files(settings), lambda: load_model(ModelSpec("edm", path), settings)):
        with pytest.raises(ModelFilesError) as e:
            attempt()
        message = str(e.value)
        assert "\n" not in message and str(path) in message, message
        assert "is an EDM denoiser" in message and "not a consistency model" in message, message
