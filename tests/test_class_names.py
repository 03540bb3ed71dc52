"""Class names saved with a pipeline: written beside the model, read back, bad files refused by name."""

import json

import pytest
from conftest import tiny_flowar_pipeline

from flowar.registry import load_pipeline
from flowar.pipeline import FlowARPipeline


def test_class_names_survive_save_and_load(tmp_path):
    pipe = tiny_flowar_pipeline()
    n = pipe.model.config.num_classes
    names = [f"class {i}" for i in range(n)]
    FlowARPipeline(pipe.model, pipe.autoencoder, class_names=names).save_pretrained(tmp_path / "named")
    pipe.save_pretrained(tmp_path / "plain")
    assert load_pipeline(tmp_path / "named").class_names == names
    assert load_pipeline(tmp_path / "plain").class_names is None
    assert not (tmp_path / "plain" / "class_names.json").exists()


@pytest.mark.parametrize("content", ['["a", "b"]', '{"0": "a"}', "[1, 2", None])
def test_a_bad_class_names_file_is_refused_by_name(tmp_path, content):
    pipe = tiny_flowar_pipeline()
    pipe.save_pretrained(tmp_path)
    n = pipe.model.config.num_classes
    (tmp_path / "class_names.json").write_text(content if content else json.dumps([0] * n))
    with pytest.raises(ValueError, match="class_names.json"):
        load_pipeline(tmp_path)


def test_the_number_of_names_must_match_the_classes():
    pipe = tiny_flowar_pipeline()
    with pytest.raises(ValueError, match="class_names has 2 names"):
        FlowARPipeline(pipe.model, pipe.autoencoder, class_names=["a", "b"])
