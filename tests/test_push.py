"""Push a tiny distilled student to a local fake Hub and load it back (no network: loopback only)."""

import hashlib
import json
import shutil
import socket
import time

import pytest
import torch

from .conftest import make_config
from .fake_hub import FakeHub


TOKEN = "hf_SECRETtoken123"
# ROUGE-L F-measure x 100, as `hf-taskdistill eval` writes it.
EVAL = {"dolly": {"rougeL": {"mean": 25.1234, "std": 0.4049}, "n": 500}, "vicuna": {"rougeL": {"mean": 18.0}}}


class _NoSleep:
    """Stands in for the `time` module with a `sleep` that returns at once."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds):
        pass


def _snapshot(directory):
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hub, with huggingface_hub and transformers pointed at it and offline mode lifted for this test."""
    import transformers.utils.hub
    from huggingface_hub import constants

    server = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # re-created with the patched endpoint

    connect = socket.socket.connect

    def loopback_only(sock, address):
        assert address[0] in ("127.0.0.1", "localhost", "::1"), f"non-loopback connection to {address}"
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    yield server
    server.close()


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A student distilled for 2 steps; `model_dir` is a plain `save_model` output (no card yet)."""
    from datasets import Dataset

    from hf_taskdistill import FeatureDistillTrainer
    from hf_taskdistill.toy import build_toy_tokenizer, make_toy_examples, tiny_llama, to_messages

    tmp = tmp_path_factory.mktemp("distilled")
    tok = build_toy_tokenizer()
    teacher = tiny_llama(len(tok), hidden_size=32, num_layers=3, seed=1)
    teacher.config._name_or_path = "test-org/tiny-teacher"
    student = tiny_llama(len(tok), hidden_size=16, num_layers=2, seed=2)
    data = Dataset.from_list([to_messages(r) for r in make_toy_examples(16, seed=0)])
    args = make_config(tmp, max_steps=2, hub_model_id="test-org/student-trainer", hub_private_repo=True)
    trainer = FeatureDistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                    processing_class=tok)  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp / "model_dir"))
    return trainer, tmp / "model_dir"


def _check_round_trip(repo_id, trainer, revision=None):
    from huggingface_hub import ModelCard, hf_hub_download
    from transformers import AutoModelForCausalLM

    from hf_taskdistill import load_unit_selection

    model = AutoModelForCausalLM.from_pretrained(repo_id, revision=revision, token=TOKEN)
    expected = [ls.indices for ls in trainer.unit_selection.layers]
    assert [ls["indices"] for ls in model.config.task_distill["layers"]] == expected
    assert [ls.indices for ls in load_unit_selection(repo_id, revision=revision, token=TOKEN).layers] == expected
    state = trainer.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k in state)
    card = ModelCard.load(hf_hub_download(repo_id, "README.md", revision=revision, token=TOKEN))
    png = hf_hub_download(repo_id, "unit_scores.png", revision=revision, token=TOKEN)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return card


def _check_card(card, license):
    data = card.data
    assert data.license == license and "licence" not in data.to_dict()
    assert {"distillation", "trl", "feature-distillation", "hf_taskdistill"} <= set(data.tags)
    assert data.distillation["teacher"] == "test-org/tiny-teacher"
    assert data.distillation["num_units"] == 16
    assert {(r.dataset_name, r.metric_type, r.metric_value) for r in data.eval_results} == {
        ("dolly", "rouge", 25.12), ("vicuna", "rouge", 18.0)
    }  # fmt: skip
    assert "| dolly | 25.12 | 0.40 | 500 |" in card.text and "| vicuna | 18.00 | – | – |" in card.text
    assert "![Teacher unit scores" in card.text and "(unit_scores.png)" in card.text
    assert "None" not in str(card) and TOKEN not in str(card)


def test_trainer_push_to_hub(distilled, hub):
    trainer, _ = distilled
    trainer.hub_model_id = None  # as after training: the repo is created by the push
    trainer.push_to_hub(token=TOKEN, revision="run-1", license="mit", eval_results=EVAL)
    repo_id = "test-org/student-trainer"
    assert hub.repos[repo_id].private  # hub_private_repo=True reached create_repo
    assert hub.files(repo_id) == {}  # the new branch got the commit
    files = hub.files(repo_id, "run-1")
    assert {"config.json", "model.safetensors", "README.md", "unit_scores.png", "tokenizer.json"} <= set(files)
    card = _check_round_trip(repo_id, trainer, revision="run-1")
    _check_card(card, "mit")
    assert card.data.distillation["logit_loss"] == "generalized_jsd"
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests if r.method == "POST")
    assert all(TOKEN not in files[name].decode() for name in ("README.md", "config.json"))


def test_push_distilled_private_branch(distilled, hub, tmp_path):
    from hf_taskdistill.hub import push_distilled

    trainer, model_dir = distilled
    before = _snapshot(model_dir)
    results = tmp_path / "results.json"
    results.write_text(json.dumps(EVAL))
    info = push_distilled(model_dir, "test-org/student", private=True, revision="exp/k16", token=TOKEN,
                          eval_results=str(results), license="apache-2.0")  # fmt: skip
    assert "test-org/student" in info.commit_url
    repo = hub.repos["test-org/student"]
    assert repo.private and set(repo.branches) == {"main", "exp/k16"}
    assert hub.files("test-org/student") == {}  # everything went to the branch
    paths = [r.path for r in hub.requests if r.method == "POST"]
    assert "/api/models/test-org/student/branch/exp%2Fk16" in paths
    assert "/api/models/test-org/student/commit/exp%2Fk16" in paths
    card = _check_round_trip("test-org/student", trainer, revision="exp/k16")
    _check_card(card, "apache-2.0")  # generated from config.json's task_distill (the directory had no card)
    assert _snapshot(model_dir) == before  # the card and plot were generated outside the local directory


def test_cli_push(distilled, hub, tmp_path, capsys):
    from huggingface_hub import ModelCard, hf_hub_download

    from hf_taskdistill.cli import main

    _, model_dir = distilled
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"dolly": 30.0}))
    argv = ["push", "--model_dir", str(model_dir), "--repo_id", "test-org/cli", "--eval_results", str(results),
            "--license", "apache-2.0", "--token", TOKEN]  # fmt: skip
    assert main(argv) == 0
    assert "/test-org/cli/commit/" in capsys.readouterr().out
    assert not hub.repos["test-org/cli"].private
    card = ModelCard.load(hf_hub_download("test-org/cli", "README.md"))
    assert card.data.license == "apache-2.0"
    assert [(r.dataset_name, r.metric_value) for r in card.data.eval_results] == [("dolly", 30.0)]


def test_lora_adapter_merged_or_kept(distilled, hub, tmp_path):
    from huggingface_hub import ModelCard
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_taskdistill import load_unit_selection
    from hf_taskdistill.hub import push_distilled
    from hf_taskdistill.model_card import build_model_card
    from hf_taskdistill.toy import tiny_llama

    trainer, _ = distilled
    tiny_llama(trainer.model.config.vocab_size, hidden_size=16, num_layers=2, seed=3).save_pretrained(
        tmp_path / "base"
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)  # what the trainer's `_save` writes for a PEFT student ...
    trainer.unit_selection.save(adapter_dir, sidecar=True)  # ... plus the task_distill.json sidecar
    merged_ref = peft_model.merge_and_unload().state_dict()
    before = _snapshot(adapter_dir)
    expected = [ls.indices for ls in trainer.unit_selection.layers]

    push_distilled(adapter_dir, "test-org/merged", token=TOKEN)
    files = hub.files("test-org/merged")
    assert "adapter_config.json" not in files and {"config.json", "model.safetensors", "README.md"} <= set(files)
    merged = AutoModelForCausalLM.from_pretrained("test-org/merged", token=TOKEN)
    assert [ls["indices"] for ls in merged.config.task_distill["layers"]] == expected
    assert all(torch.allclose(v, merged_ref[k]) for k, v in merged.state_dict().items())
    assert b"library_name: transformers" in files["README.md"] and b"Provide a quick summary" not in files["README.md"]

    push_distilled(adapter_dir, "test-org/adapter", token=TOKEN, adapter=True)
    files = hub.files("test-org/adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "task_distill.json", "README.md"} <= set(files)
    assert "config.json" not in files  # it would break transformers' adapter auto-detection
    assert b"library_name: peft" in files["README.md"]
    assert [ls.indices for ls in load_unit_selection("test-org/adapter", token=TOKEN).layers] == expected
    assert _snapshot(adapter_dir) == before

    # A card of ours (as the trainer writes for a PEFT student): its metadata is carried to the merged model's card.
    build_model_card(trainer.unit_selection, logit_loss="jsd", beta=0.5, lmbda=0.0, library_name="peft",
                     license="mit").save(adapter_dir / "README.md")  # fmt: skip
    push_distilled(adapter_dir, "test-org/merged-2", token=TOKEN)
    card = ModelCard(hub.files("test-org/merged-2")["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.license == "mit"
    assert card.data.distillation["logit_loss"] == "generalized_jsd"


def test_push_keeps_a_trainer_card_and_updates_it(distilled, hub, tmp_path):
    from huggingface_hub import ModelCard

    from hf_taskdistill.hub import push_distilled

    trainer, _ = distilled
    trainer.save_model()
    trainer.create_model_card(license="mit", eval_results={"dolly": 10.0})
    local = tmp_path / "with_card"
    shutil.copytree(trainer.args.output_dir, local)
    before = _snapshot(local)
    push_distilled(local, "test-org/updated", token=TOKEN, license="apache-2.0", eval_results=EVAL)
    card = ModelCard(hub.files("test-org/updated")["README.md"].decode())
    assert card.data.license == "apache-2.0" and "| learning_rate | 0.01 |" in card.text  # the trainer's card, kept
    assert "| dolly | 25.12 | 0.40 | 500 |" in card.text and "| dolly | 10.00 |" not in card.text
    assert {(r.dataset_name, r.metric_value) for r in card.data.eval_results} == {("dolly", 25.12), ("vicuna", 18.0)}
    assert card.text.count("## Evaluation") == 1 and "## Framework versions" in card.text
    assert _snapshot(local) == before


@pytest.mark.parametrize(
    "failure, expected",
    [("refuse", "could not be reached"), ("unauthorized", "HTTP 401"), ("commit_500", "HTTP 500")],
)
def test_push_failures_are_clear_and_harmless(
    distilled, hub, tmp_path, caplog, capsys, monkeypatch, failure, expected
):
    import logging

    import huggingface_hub.utils._http

    from hf_taskdistill.cli import main
    from hf_taskdistill.hub import HubPushError, push_distilled

    _, model_dir = distilled
    local = tmp_path / "student"
    shutil.copytree(model_dir, local)
    before = _snapshot(local)
    hub.refuse() if failure == "refuse" else hub.fail(failure)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubPushError) as info:
        push_distilled(local, "test-org/broken", token=TOKEN, license="mit")
    message = str(info.value)
    assert expected in message and "test-org/broken" in message and hub.endpoint in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained request details
    assert main(["push", "--model_dir", str(local), "--repo_id", "test-org/broken", "--token", TOKEN]) == 1
    captured = capsys.readouterr()
    assert expected in captured.err
    assert TOKEN not in message + caplog.text + captured.out + captured.err
    assert _snapshot(local) == before
    if failure == "commit_500":
        assert "test-org/broken" in hub.repos and hub.files("test-org/broken") == {}

    trainer, _ = distilled  # the trainer's own push fails the same way, and names its output_dir
    trainer.hub_model_id = None
    monkeypatch.setattr(huggingface_hub.utils._http, "time", _NoSleep())  # upload_folder retries 5xx with backoff
    with pytest.raises(HubPushError) as info:
        trainer.push_to_hub(token=TOKEN)
    assert expected in str(info.value) and trainer.args.output_dir in str(info.value)
    assert TOKEN not in str(info.value) + caplog.text


# ----- provenance: what a push uploads never holds a local path -----


def _needles(root) -> list[str]:
    """The tmp folder and its parents down to depth 2 (e.g. /tmp/pytest-of-user): none may appear in an upload."""
    import pathlib

    root = pathlib.Path(root).resolve()
    return [str(p) for p in [root, *root.parents] if len(p.parts) > 2]


def _leaks(files: dict[str, bytes], root) -> dict[str, list[str]]:
    found = {}
    for name, data in files.items():
        hits = [n for n in _needles(root) if n.encode() in data]
        if hits:
            found[name] = hits
    return found


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """`hf-taskdistill train` with a LOCAL teacher folder and a LOCAL student folder, on a Dolly-shaped JSONL."""
    import yaml

    from hf_taskdistill.cli import main
    from hf_taskdistill.toy import build_toy_tokenizer, make_toy_examples, tiny_llama

    root = tmp_path_factory.mktemp("local_run")
    tok = build_toy_tokenizer()
    for name, model in (("my-teacher", tiny_llama(len(tok), hidden_size=32, num_layers=3, seed=1)),
                        ("my-student", tiny_llama(len(tok), hidden_size=16, num_layers=2, seed=2))):  # fmt: skip
        model.save_pretrained(root / "models" / name)
        tok.save_pretrained(root / "models" / name)
    data = root / "data" / "dolly" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in make_toy_examples(24, seed=0)))
    recipe = {"model_name_or_path": str(root / "models" / "my-student"), "train_file": str(data),
              "teacher_model_name_or_path": str(root / "models" / "my-teacher"), "output_dir": str(root / "out"),
              "max_length": 64, "per_device_train_batch_size": 4, "max_steps": 2, "learning_rate": 1e-2,
              "selection_num_samples": 8, "activation_checkpointing": False, "use_cpu": True, "bf16": False,
              "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "seed": 0}  # fmt: skip
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--config", str(root / "recipe.yaml")]) == 0
    return root


def test_push_of_a_local_run_leaks_no_path_and_tells_the_truth(local_run, hub):
    from huggingface_hub import ModelCard

    from hf_taskdistill.cli import main
    from hf_taskdistill.hub import push_distilled

    out = local_run / "out"
    assert (out / "training_args.bin").is_file() and (out / "task_distill_scores.safetensors").is_file()
    push_distilled(out, "test-org/local-run", token=TOKEN, eval_results={"dolly": 12.3456})
    files = hub.files("test-org/local-run")
    assert "training_args.bin" not in files  # left out by default: it holds output_dir
    assert {"config.json", "model.safetensors", "README.md", "unit_scores.png", "task_distill_scores.safetensors",
            "tokenizer.json"} <= set(files)  # fmt: skip
    assert _leaks(files, local_run) == {}

    stored = json.loads(files["config.json"])["task_distill"]
    assert stored["teacher"] == {"model_id": None, "revision": None, "local_name": "my-teacher"}
    assert stored["student"]["local_name"] == "my-student" and stored["student"]["model_id"] is None
    assert stored["data"]["name"] == "dolly/train.jsonl" and stored["data"]["num_examples"] == 24
    card = ModelCard(files["README.md"].decode())
    text = card.text
    assert "`my-teacher` (a local checkpoint, not on the Hub)" in text and "huggingface.co/my-teacher" not in text
    assert "`my-student` (a local checkpoint, not on the Hub)" in text and card.data.base_model is None
    assert card.data.distillation["teacher_local_name"] == "my-teacher" and "teacher" not in card.data.distillation
    assert "`dolly/train.jsonl` (a local file): 24 training examples" in text and card.data.datasets is None
    assert "GKD generalized Jensen-Shannon divergence (beta=0.5, lmbda=0: off-policy)" in text
    assert "| learning_rate | 0.01 |" in text and "| max_steps | 2 |" in text and "| max_length | 64 |" in text
    assert "not recorded" not in text and "does not hold" not in text and "not stored" not in text
    assert "](unit_scores.png)" in text and "| dolly | 12.35 | – | – |" in text

    # `--dry_run DIR` writes exactly what a push uploads, without the network.
    dry, requests = local_run / "dry", len(hub.requests)
    assert main(["push", "--model_dir", str(out), "--repo_id", "test-org/local-run", "--dry_run", str(dry),
                 "--eval_results", json.dumps({"dolly": 12.3456})]) == 0  # fmt: skip
    written = {p.relative_to(dry).as_posix(): p.read_bytes() for p in dry.rglob("*") if p.is_file()}
    assert written.keys() == files.keys() and written["README.md"] == files["README.md"]
    assert written["config.json"] == files["config.json"]
    assert len(hub.requests) == requests  # no network call

    # The one exception, on request: training_args.bin holds the local output_dir (transformers pickles it).
    push_distilled(out, "test-org/local-run-args", token=TOKEN, include_training_args=True)
    with_args = hub.files("test-org/local-run-args")
    assert set(_leaks(with_args, local_run)) == {"training_args.bin"}


def test_reused_selection_keeps_its_scores_and_plot(local_run, hub, tmp_path):
    from hf_taskdistill.cli import main
    from hf_taskdistill.hub import push_distilled

    reused = tmp_path / "reused"
    argv = ["train", "--config", str(local_run / "recipe.yaml"), "--output_dir", str(reused),
            "--selection_path", str(local_run / "out")]  # fmt: skip
    assert main(argv) == 0
    push_distilled(reused, "test-org/reused", token=TOKEN)
    files = hub.files("test-org/reused")
    assert {"unit_scores.png", "task_distill_scores.safetensors"} <= set(files) and _leaks(files, local_run) == {}
    assert _leaks(files, tmp_path) == {}
    assert "](unit_scores.png)" in files["README.md"].decode()


def test_hub_teacher_is_recorded_with_its_revision(hub, tmp_path):
    from datasets import Dataset
    from huggingface_hub import HfApi, ModelCard

    from hf_taskdistill import FeatureDistillTrainer
    from hf_taskdistill.hub import push_distilled
    from hf_taskdistill.toy import build_toy_tokenizer, make_toy_examples, tiny_llama, to_messages

    tok = build_toy_tokenizer()
    tiny_llama(len(tok), hidden_size=32, num_layers=3, seed=1).save_pretrained(tmp_path / "upload")
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo("test-org/hub-teacher")
    revision = api.upload_folder(repo_id="test-org/hub-teacher", folder_path=tmp_path / "upload").oid
    data = Dataset.from_list([to_messages(r) for r in make_toy_examples(16, seed=0)])
    student = tiny_llama(len(tok), hidden_size=16, num_layers=2, seed=2)
    args = make_config(tmp_path, max_steps=1, teacher_model_init_kwargs={"token": TOKEN})
    trainer = FeatureDistillTrainer(model=student, teacher_model="test-org/hub-teacher", args=args,
                                    train_dataset=data, processing_class=tok)  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "model"))
    push_distilled(tmp_path / "model", "test-org/from-hub-teacher", token=TOKEN)
    files = hub.files("test-org/from-hub-teacher")
    teacher = json.loads(files["config.json"])["task_distill"]["teacher"]
    assert teacher["model_id"] == "test-org/hub-teacher" and teacher["revision"] == revision
    card = ModelCard(files["README.md"].decode())
    assert card.data.distillation["teacher"] == "test-org/hub-teacher"
    assert card.data.distillation["teacher_revision"] == revision
    assert f"[test-org/hub-teacher](https://huggingface.co/test-org/hub-teacher) at revision `{revision}`" in card.text
    assert _leaks(files, tmp_path) == {}


def test_generated_card_names_only_what_the_record_lacks(local_run, tmp_path):
    from hf_taskdistill.hub import push_distilled

    def card_for(edit):
        local = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(local_run / "out", local)
        (local / "README.md").unlink(missing_ok=True)
        config = json.loads((local / "config.json").read_text())
        edit(config)
        (local / "config.json").write_text(json.dumps(config))
        push_distilled(local, "org/x", dry_run_dir=local / "dry")
        return (local / "dry" / "README.md").read_text()

    full = card_for(lambda c: None)
    assert "generated by `hf-taskdistill push` from the stored `task_distill` record." in full

    def older(config):  # a record written before `data` and the hyperparameters were stored
        del config["task_distill"]["data"]
        del config["task_distill"]["training"]["hyperparameters"]

    text = card_for(older)
    assert "that record does not hold the training data and the training hyperparameters." in text
    assert "the logit loss" not in text.split("## Quick start")[0] and "## Training hyperparameters" not in text

    text = card_for(lambda c: c.pop("task_distill"))
    assert "from a directory without a `task_distill` record" in text


def test_fresh_student_from_the_teacher_config_is_called_so(local_run, tmp_path):
    from hf_taskdistill.cli import main
    from hf_taskdistill.hub import push_distilled

    out = tmp_path / "fresh"
    overrides = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 2, "head_dim": 8}  # fmt: skip
    argv = ["train", "--config", str(local_run / "recipe.yaml"), "--output_dir", str(out),
            "--model_name_or_path", str(local_run / "models" / "my-teacher"),
            "--student_config_overrides", json.dumps(overrides)]  # fmt: skip
    assert main(argv) == 0
    stored = json.loads((out / "config.json").read_text())["task_distill"]["student"]
    assert stored["config_from"] == {"model_id": None, "revision": None, "local_name": "my-teacher"}
    assert stored["config_overrides"] == overrides and stored["local_name"] is None
    push_distilled(out, "org/fresh", dry_run_dir=tmp_path / "dry")
    text = (tmp_path / "dry" / "README.md").read_text()
    assert (
        "The student started from random weights, built from the config of `my-teacher` (a local checkpoint, " in text
    )
    assert "`hidden_size=16`, `intermediate_size=32`" in text and "base_model" not in text
    files = {p.name: p.read_bytes() for p in (tmp_path / "dry").iterdir() if p.is_file()}
    assert _leaks(files, local_run) == {} and _leaks(files, tmp_path) == {}
