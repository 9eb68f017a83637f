"""`ladle serve --model-repository DIR` and `model_repository:` in a config file: a bad folder or a
bad config.yaml stops the start with one line naming the file and the key."""

from __future__ import annotations

import pytest

from helpers import assert_one_line_error, run_ladle

pytest.importorskip("skl2onnx")


@pytest.fixture()
def repo(tmp_path):
    from ladle.bench.onnx_classifier import build_classifier_repository

    build_classifier_repository(tmp_path / "models", "iris")
    return tmp_path / "models"


def test_a_missing_folder(tmp_path):
    result = run_ladle("serve", "--model-repository", str(tmp_path / "nope"), "--port", "0")
    assert_one_line_error(result, "--model-repository", "not a folder")


def test_a_mistyped_key_names_the_file_and_the_key(repo):
    config = repo / "iris" / "config.yaml"
    config.write_text(config.read_text().replace("max_queue_delay_ms", "max_queue_delay"))
    result = run_ladle("serve", "--model-repository", str(repo), "--port", "0")
    assert_one_line_error(result, str(config), "dynamic_batching.max_queue_delay: unknown key", "max_queue_delay_ms")


def test_the_config_file_key_is_relative_to_the_file(repo, tmp_path):
    config = repo / "iris" / "config.yaml"
    config.write_text(config.read_text().replace("instances: 1", "instances: 0"))
    ladle_yaml = tmp_path / "ladle.yaml"
    ladle_yaml.write_text("model_repository: models\n")
    result = run_ladle("serve", "--config", str(ladle_yaml), "--port", "0")
    assert_one_line_error(result, "config.yaml", "instances must be at least 1")
