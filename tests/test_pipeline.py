"""The task registry and what goes through it: every task has the whole interface, a new task reaches the
server without a change there, and the classifier's evaluation never depends on how texts are batched."""
import numpy as np
import pytest
import torch

import main
import server
import task_cls
from config import ClassifierConfig
from models import Classifier
from registry import TASKS, tasks_with
from task import Task
from tokenizer import train_tokenizer


def test_every_task_is_registered_once_with_the_whole_interface():
    assert list(TASKS) == ["cls", "lm", "seq2seq"]
    routes = [t.route for t in TASKS.values()]
    assert len(set(routes)) == len(routes) and all(r.startswith("/api/") for r in routes)
    for name, task in TASKS.items():
        assert task.name == name and task.train_hint == f"python main.py --train --task {name}"
        assert set(task.modes) <= set(main.MODES) and task.select.lstrip("-") in task.metrics
        for method in ("splits", "new_tokenizer", "sized", "data", "analysis_texts", "analysis_batches",
                       "export_inputs", "serve_load", "answer"):
            assert getattr(type(task), method) is not getattr(Task, method) or method == "export_inputs", \
                (name, method)
    assert tasks_with("infer") == ["cls", "seq2seq"] and tasks_with("generate") == ["lm"]


def test_a_mode_of_another_task_is_refused_in_one_line(capsys):
    assert main.main(["--generate", "--task", "cls"]) == 2
    assert capsys.readouterr().err.strip() == "error: --generate is for --task lm; --task cls has --infer, --classify"


class EchoTask(Task):
    name, route, request_fields = "echo", "/api/echo", {"text": "string"}

    def serve_load(self, path, device):
        return "loaded"

    def answer(self, loaded, req, device):
        return {"echo": req["text"], "model": loaded}


def test_a_new_task_is_served_without_changing_the_server(monkeypatch, tmp_path):
    monkeypatch.setitem(server.TASKS, "echo", EchoTask())
    models = server.Models({t: str(tmp_path / f"{t}.pt") for t in server.TASKS}, torch.device("cpu"))
    assert models.answer("/api/echo", {"text": "你好"}) == {"echo": "你好", "model": "loaded"}
    assert "/api/echo" in server.openapi_spec()["paths"]
    status = models.status()
    assert status["echo"] == {"ready": True, "checkpoint": str(tmp_path / "echo.pt")}
    assert not status["cls"]["ready"] and "python main.py --train --task cls" in status["cls"]["error"]


@pytest.fixture(scope="module")
def classifier_inputs():
    texts = ["这家酒店很好", "服务太差了", "房间干净，早餐不错", "再也不来了", "价格便宜", "非常失望", "推荐",
             "一般般吧，还行"] * 3
    tokenizer = train_tokenizer("char", texts, 64, progress=False)
    seqs = [tokenizer.encode(t) for t in texts]
    labels = [i % 2 for i in range(len(texts))]
    return tokenizer, seqs, labels


def evaluate(model, cfg, tokenizer, seqs, labels, batch_size):
    return task_cls.evaluate(model, tokenizer, seqs, labels, None, cfg, batch_size, torch.device("cpu"), "fp32")


@pytest.mark.parametrize("routing", ["token", "expert"])
def test_classifier_evaluation_is_independent_of_labels_and_order(classifier_inputs, routing):
    """Batches are cut by length, never by label, so no label reaches a prediction (under expert choice a text's
    experts depend on its batch-mates: batched by class, they would). Under token choice, every prediction is
    the same whatever the batch size or the order of the texts; under expert choice it may change with them, as
    any batch-level top-k does at inference."""
    tokenizer, seqs, labels = classifier_inputs
    cfg = ClassifierConfig(vocab_size=tokenizer.n_vocab, num_classes=2, max_len=32, d_model=16, n_heads=2,
                           num_layers=1, d_ff=16, num_experts=4, top_k=2, routing=routing, dropout=0.0)
    torch.manual_seed(0)
    model = Classifier(cfg)
    base = evaluate(model, cfg, tokenizer, seqs, labels, 4)
    flipped = evaluate(model, cfg, tokenizer, seqs, [1 - y for y in labels], 4)
    np.testing.assert_array_equal(base["_logits"], flipped["_logits"])  # the labels never reach the logits
    assert base["_class_counts"].sum() == base["_layer_counts"].sum()  # every routed token counted once
    np.testing.assert_array_equal(base["_class_counts"][::-1], flipped["_class_counts"])  # by index, not batch
    if routing == "token":
        order = np.random.default_rng(0).permutation(len(seqs))
        shuffled = evaluate(model, cfg, tokenizer, [seqs[i] for i in order], [labels[i] for i in order], 16)
        np.testing.assert_allclose(shuffled["_logits"], base["_logits"][order], rtol=1e-5, atol=1e-6)
        assert (shuffled["_logits"].argmax(1) == base["_logits"][order].argmax(1)).all()
        np.testing.assert_array_equal(shuffled["_class_counts"], base["_class_counts"])
