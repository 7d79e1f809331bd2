"""Which units a run distils (`unit_resolution.py`): precedence of the sources and the checks on a stored selection.

Plain functions: no model is built (configs are namespaces), so these run in milliseconds."""

from types import SimpleNamespace

import pytest
import torch

from hf_taskdistill.selection import LayerSelection, UnitSelection
from hf_taskdistill.unit_resolution import (
    at_every_layer,
    check_selection,
    projector_selection,
    pruning_record,
    reconcile_stored,
    scoring_subset,
    selection_dir,
    stored_selection_source,
)


def _args(**overrides):
    base = dict(selection_path=None, feature_projector=False, feature_layers=None, selection_num_units=None)
    return SimpleNamespace(**{**base, **overrides})


def _selection(k=4, pairs=((1, 2),), d_t=8, init=None):
    layers = [LayerSelection(s, t, list(range(k))) for s, t in pairs]
    return UnitSelection(layers=layers, selection_method="grad", teacher_hidden_size=d_t, student_hidden_size=k,
                         init=init or {})  # fmt: skip


def _pruned_student(indices=(5, 1, 3, 0)):
    stored = {"init": {"residual_indices": list(indices)}, "layers": []}
    return SimpleNamespace(config=SimpleNamespace(task_distill=stored))


def test_stored_source_precedence_argument_then_path_then_pruned_units():
    pruned = _pruned_student()
    assert stored_selection_source("given", _args(selection_path="path"), pruned) == "given"
    assert stored_selection_source(None, _args(selection_path="path"), pruned) == "path"
    assert stored_selection_source(None, _args(), pruned) is pruned.config.task_distill
    # the projector matches whole layers: a pruned student's units are not its selection
    assert stored_selection_source(None, _args(feature_projector=True), pruned) is None
    plain = SimpleNamespace(config=SimpleNamespace())
    assert stored_selection_source(None, _args(), plain) is None  # -> the run scores the teacher


def test_pruning_record_needs_residual_indices():
    assert pruning_record(_pruned_student())["residual_indices"] == [5, 1, 3, 0]
    empty = SimpleNamespace(config=SimpleNamespace(task_distill={"init": {"residual_indices": []}}))
    assert pruning_record(empty) is None
    assert pruning_record(SimpleNamespace(config=SimpleNamespace(task_distill="corrupt"))) is None


def test_at_every_layer_repeats_a_pruned_students_units_only():
    pruned = _selection(init={"residual_indices": [7, 2, 4, 0]})
    out = at_every_layer(pruned, [(0, 0), (1, 2)])
    assert [(ls.student_layer, ls.teacher_layer, ls.indices) for ls in out.layers] == [
        (0, 0, [7, 2, 4, 0]),
        (1, 2, [7, 2, 4, 0]),
    ]
    scored = _selection()
    assert at_every_layer(scored, [(0, 0), (1, 2)]).layers == _selection().layers


def test_reconcile_stored_names_both_values():
    with pytest.raises(ValueError, match=r"selection_num_units=3, but the stored selection holds k=4"):
        reconcile_stored(_selection(), [(1, 2)], 4, _args(selection_num_units=3))
    with pytest.raises(ValueError, match=r"holds k=4 units, but the student's hidden size is 6"):
        reconcile_stored(_selection(), [(1, 2)], 6, _args())
    with pytest.raises(ValueError, match=r"layer pairs \[\(0, 0\)\].*made for \[\(1, 2\)\]"):
        reconcile_stored(_selection(), [(0, 0)], 4, _args(feature_layers=[(0, 0)]))
    selection = _selection()
    reconcile_stored(selection, None, 6, _args(selection_num_units=4))  # k set explicitly: a wider student is fine
    assert selection.student_hidden_size == 6
    projector = projector_selection([(1, 2)], 8, 6, {"model_id": None, "revision": None})
    reconcile_stored(projector, [(1, 2)], 6, _args())  # no k to agree on
    assert projector.k == 0 and projector.student_hidden_size == 6


def test_check_selection_teacher_width_student_width_and_layer_range():
    cfg = lambda d, n: SimpleNamespace(hidden_size=d, num_hidden_layers=n)  # noqa: E731
    check_selection(_selection(), cfg(4, 2), cfg(8, 3))
    with pytest.raises(ValueError, match="teacher of hidden size 8, but this teacher has 16"):
        check_selection(_selection(), cfg(4, 2), cfg(16, 3))
    with pytest.raises(ValueError, match="4 units, more than the student's hidden size 3"):
        check_selection(_selection(), cfg(3, 2), cfg(8, 3))
    with pytest.raises(ValueError, match="teacher"):
        check_selection(_selection(pairs=((1, 5),)), cfg(4, 2), cfg(8, 3))


def test_selection_dir(tmp_path):
    (tmp_path / "task_distill.json").write_text("{}")
    assert selection_dir(tmp_path) == str(tmp_path)
    assert selection_dir(tmp_path / "task_distill.json") == str(tmp_path)
    assert selection_dir("org/not-a-local-dir") is None and selection_dir({"layers": []}) is None


def test_scoring_subset_seeded_for_datasets_and_torch_datasets_head_for_streams():
    from datasets import Dataset

    rows = Dataset.from_list([{"x": i} for i in range(20)])
    a, b = scoring_subset(rows, 5, seed=3), scoring_subset(rows, 5, seed=3)
    assert a["x"] == b["x"] and len(a) == 5 and a["x"] != scoring_subset(rows, 5, seed=4)["x"]
    assert len(scoring_subset(rows, 50, seed=0)) == 20

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"x": i}

    picked = scoring_subset(Plain(), 4, seed=0)
    assert len(picked) == 4 and len({r["x"] for r in picked}) == 4
    stream = rows.to_iterable_dataset()
    assert scoring_subset(stream, 3, seed=0)["x"] == [0, 1, 2]
    with pytest.raises(ValueError, match="needs a train_dataset"):
        scoring_subset(None, 3, seed=0)
