import pytest

from hf_taskdistill import TaskFeatureDistillConfig
from hf_taskdistill.config import parse_layer_pairs


def test_defaults_and_layer_pairs(tmp_path):
    args = TaskFeatureDistillConfig(output_dir=str(tmp_path), seed=7)
    assert args.layer_pairs == [(-1, -1)]
    assert args.lmbda == 0.0 and args.selection_seed == 7
    assert args.feature_loss_type == "correlation" and args.feature_loss_weight == 1.0
    args = TaskFeatureDistillConfig(output_dir=str(tmp_path), feature_layers=[1, 2, -1, -1])
    assert args.layer_pairs == [(1, 2), (-1, -1)]


def test_teacher_init_kwargs_without_dtype_do_not_crash(tmp_path):
    args = TaskFeatureDistillConfig(output_dir=str(tmp_path), teacher_model_init_kwargs={"revision": "main"})
    assert args.teacher_model_init_kwargs["dtype"] == "auto"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"feature_loss_weight": -1.0}, "feature_loss_weight must be >= 0"),
        ({"selection_num_units": 0}, "selection_num_units must be >= 1"),
        ({"selection_num_samples": 0}, "selection_num_samples"),
        ({"selection_method": "hessian"}, "selection_method"),
        ({"feature_loss_type": "l1"}, "feature_loss_type"),
        ({"selection_order": "random"}, "selection_order"),
        ({"logit_loss": "kl"}, "logit_loss"),
        ({"feature_layers": [1, 2, 3]}, "odd-length"),
        ({"lmbda": 2.0}, "lmbda"),
    ],
)
def test_validation_messages(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskFeatureDistillConfig(output_dir=str(tmp_path), **kwargs)


def test_parse_layer_pairs_forms():
    assert parse_layer_pairs(None) is None
    assert parse_layer_pairs([[0, 1], [1, 3]]) == [[0, 1], [1, 3]]
    assert parse_layer_pairs("0 1, 1 3") == [[0, 1], [1, 3]]
    with pytest.raises(ValueError, match="pairs of integers"):
        parse_layer_pairs([[0, 1.5]])


def test_feature_layers_accept_every_command_line_form():
    from hf_taskdistill.config import parse_layer_pairs

    for value in (["1", "15", "0", "3"], ["1,15", "0,3"], ["[[1,15],[0,3]]"], [[1, 15], [0, 3]], [1, 15, 0, 3]):
        assert parse_layer_pairs(value) == [[1, 15], [0, 3]], value
    with pytest.raises(ValueError, match="integer layer indices"):
        parse_layer_pairs(["last"])
    with pytest.raises(ValueError, match="odd-length"):
        parse_layer_pairs(["1,15", "3"])
