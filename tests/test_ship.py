"""Ship and scale: ONNX export + ONNX Runtime parity, the web page and its JSON API (real HTTP client, real
headless Chromium), TensorBoard/MLflow logging read back (torchrun: test_parallel.py)."""
import http.client
import json
import os
import subprocess
import sys
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

import data
from checkpoint import load_checkpoint
from test_cli import ROOT, run_main

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def models(tmp_path_factory, trained_cls, trained_lm, trained_s2s):
    """The session's tiny cls, lm and seq2seq checkpoints, copied into one directory (what --serve reads)."""
    import shutil
    d = tmp_path_factory.mktemp("models")
    for task, (ckpt, _, _) in (("cls", trained_cls), ("lm", trained_lm), ("seq2seq", trained_s2s)):
        shutil.copy(ckpt, d / f"{task}.pt")
    return d


@pytest.fixture(scope="module")
def review_texts():
    """60 real reviews of many lengths (4 to 300+ characters) from the test split."""
    texts = sorted(set(data.reviews_splits(quiet=True)["test"].text), key=len)
    picks = np.linspace(0, len(texts) - 1, 60).astype(int)
    return [texts[i] for i in picks]


# -----------------------------------------------------------------------------
# ONNX

@pytest.fixture(scope="module")
def cls_onnx(models):
    ckpt = load_checkpoint(models / "cls.pt", "")
    if float(ckpt["state_dict"]["deep_scale"]) == 0:  # the tiny run's blend dropped its deep part: give it one,
        ckpt["state_dict"]["deep_scale"] = torch.tensor(0.7)  # so that parity covers both parts of the graph
        torch.save(ckpt, models / "cls.pt")
    proc = run_main("--export", "onnx", "--checkpoint", str(models / "cls.pt"))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["output"] == str(models / "cls.onnx") and os.path.getsize(summary["output"]) > 0
    return summary


def test_onnx_classifier_matches_pytorch_on_real_texts(models, cls_onnx, review_texts):
    from onnx_export import OnnxClassifier
    from task_cls import Predictor
    assert cls_onnx["max_abs_diff_vs_torch"] <= 1e-4
    torch_p = Predictor(str(models / "cls.pt"), torch.device("cpu"))
    onnx_p = Predictor(str(models / "cls.pt"), torch.device("cpu"), backend="onnx")
    assert onnx_p.names == torch_p.names and onnx_p.max_len == torch_p.max_len
    lengths = {len(torch_p.tokenizer.encode(t)) for t in review_texts}
    assert len(review_texts) >= 50 and len(lengths) >= 40 and max(lengths) > torch_p.max_len  # truncation too
    assert onnx_p.features.vocab == torch_p.features.vocab and np.allclose(onnx_p.features.idf, torch_p.features.idf)
    rows = torch_p.features.rows(review_texts)
    for batch_size in (1, 8):
        seqs = data.encode_texts(torch_p.tokenizer, review_texts)
        for start in range(0, len(seqs), batch_size):
            batch = data.collate_cls(torch_p.tokenizer, seqs[start:start + batch_size], None, torch_p.max_len, None,
                                     rows[start:start + batch_size])
            ref, got = torch_p.logits(batch), onnx_p.logits(batch)
            assert got.shape == ref.shape == (len(seqs[start:start + batch_size]), len(torch_p.names))
            assert np.abs(got - ref).max() <= 1e-4
    assert isinstance(onnx_p.session, OnnxClassifier)


def test_onnx_backend_reuses_one_session(models, cls_onnx, review_texts, monkeypatch):
    import onnxruntime
    from task_cls import Predictor
    made = []
    real = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: made.append(1) or real(*a, **k))
    p = Predictor(str(models / "cls.pt"), torch.device("cpu"), backend="onnx")
    for text in review_texts[:10]:
        p.predict([text])
    p.predict(review_texts, batch_size=8)
    assert len(made) == 1


def test_onnx_infer_and_classify_through_main(models, cls_onnx, review_texts, tmp_path):
    ckpt = str(models / "cls.pt")
    text = review_texts[20]
    ref = json.loads(run_main("--infer", "--checkpoint", ckpt, "--text", text, "--json").stdout)
    got = json.loads(run_main("--infer", "--backend", "onnx", "--checkpoint", ckpt, "--text", text,
                              "--json").stdout)
    assert got["label"] == ref["label"]
    assert max(abs(got["probs"][k] - ref["probs"][k]) for k in ref["probs"]) < 1e-5
    inp, out = tmp_path / "in.csv", tmp_path / "preds.csv"
    pd.DataFrame({"text": review_texts}).to_csv(inp, index=False)
    run_main("--classify", "--backend", "onnx", "--checkpoint", ckpt, "--input", str(inp), "--output", str(out),
             "--out_dir", str(tmp_path))
    preds = pd.read_csv(out)
    assert len(preds) == len(review_texts) and set(preds.pred) <= set(ref["probs"])


@pytest.mark.slow
def test_lm_exports_and_seq2seq_is_refused(models, tmp_path):
    import onnxruntime
    out = tmp_path / "lm.onnx"
    summary = json.loads(run_main("--export", "onnx", "--task", "lm", "--checkpoint", str(models / "lm.pt"),
                                  "--output", str(out)).stdout.strip().splitlines()[-1])
    assert summary["max_abs_diff_vs_torch"] <= 1e-4
    from checkpoint import load_trained
    model, tok, _ = load_trained(str(models / "lm.pt"), "lm", "", torch.device("cpu"))
    ids = torch.tensor([tok.encode("新华社北京一月一日电")[:9], tok.encode("今天的天气很好，我们去公园")[:9]])
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(ids)[0].numpy()
    assert np.abs(session.run(None, {"idx": ids.numpy()})[0] - ref).max() <= 1e-4
    proc = run_main("--export", "onnx", "--task", "seq2seq", "--checkpoint", str(models / "seq2seq.pt"),
                    check=False)
    assert proc.returncode == 2 and "does not export" in proc.stderr and "Traceback" not in proc.stderr


def test_onnx_errors_are_one_line(models, tmp_path):
    proc = run_main("--infer", "--backend", "onnx", "--checkpoint", str(tmp_path / "none.pt"), "--text", "好",
                    check=False)
    assert proc.returncode == 2 and "--export onnx" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    proc = run_main("--infer", "--backend", "onnx", "--checkpoint", str(bad), "--text", "好", check=False)
    assert proc.returncode == 2 and "not a readable ONNX model" in proc.stderr
    proc = run_main("--generate", "--backend", "onnx", check=False)
    assert proc.returncode == 2 and "--backend onnx" in proc.stderr


# -----------------------------------------------------------------------------
# The web page and its API

def start_server(checkpoint_dir, *flags) -> tuple[subprocess.Popen, int]:
    """`main.py --serve` (uvicorn) in its own process on a free port; (the process, its port)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--serve", "--port", "0",
                             "--checkpoint_dir", str(checkpoint_dir), "--quiet", *flags], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("serving on"):
            return proc, int(line.split(":")[-1].split("/")[0])
    raise AssertionError(f"--serve did not start (exit {proc.wait()})")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()  # SIGTERM: uvicorn finishes what is in flight and stops
    assert proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """The real server (uvicorn, its own process) on a free port; the seq2seq model is missing from the second."""
    partial_dir = tmp_path_factory.mktemp("partial")
    for task in ("cls", "lm"):
        os.symlink(models / f"{task}.pt", partial_dir / f"{task}.pt")
    full, port = start_server(models)
    partial, partial_port = start_server(partial_dir)
    yield port, partial_port
    stop(full)
    stop(partial)


def request(port, method, path, body=None, raw: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode("utf-8")
    conn.close()
    kind = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(text) if kind.startswith("application/json") else text)


def test_api_serves_the_three_models(server, models):
    port, _ = server
    status, page = request(port, "GET", "/")
    assert status == 200 and "Pinyin" in page and "/api/classify" in page
    status, ready = request(port, "GET", "/api/models")
    assert status == 200 and all(ready[t]["ready"] for t in ("cls", "lm", "seq2seq"))
    status, res = request(port, "POST", "/api/classify", {"text": "这家酒店的服务很差，再也不来了"})
    assert status == 200 and res["label"] in res["probs"] and abs(sum(res["probs"].values()) - 1) < 1e-4
    from task_cls import Predictor
    probs = Predictor(str(models / "cls.pt"), torch.device("cpu")).predict(["这家酒店的服务很差，再也不来了"])[0]
    assert abs(res["probs"][ready["cls"]["labels"][0]] - float(probs[0])) < 1e-5
    body = {"prompt": "新华社北京", "max_new_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    status, gen = request(port, "POST", "/api/generate", body)
    assert status == 200 and isinstance(gen["text"], str) and 0 < gen["new_tokens"] <= 12
    assert request(port, "POST", "/api/generate", body)[1] == gen  # same seed, same text
    status, conv = request(port, "POST", "/api/pinyin", {"text": "wo ai bian cheng", "beam": 2, "num_candidates": 2})
    assert status == 200 and conv["source"] == "wo ai bian cheng" and isinstance(conv["pred"], str)
    assert 1 <= len(conv["candidates"]) <= 2 and conv["candidates"][0]["text"] == conv["pred"]
    for task in ("cls", "lm", "seq2seq"):  # the routing view of each model: every layer routes every input token
        status, routed = request(port, "POST", "/api/routing", {"task": task, "text": "wo ai bian cheng 很好"})
        assert status == 200 and routed["layers"] and all(
            len(layer["experts"]) == len(routed["tokens"]) for layer in routed["layers"])
        top = [t for layer in routed["layers"] for t in layer["experts"] if t]
        assert all(len(t) == 3 and t[0][1] >= t[1][1] >= t[2][1] for t in top)  # likeliest first
    assert request(port, "POST", "/api/routing", {"task": "nope", "text": "x"})[0] == 400
    status, spec = request(port, "GET", "/openapi.json")
    fields = spec["paths"]["/api/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert status == 200 and fields["additionalProperties"] is False and fields["properties"]["seed"] == {
        "type": "integer"} and set(spec["paths"]) == {"/api/models", "/api/classify", "/api/generate", "/api/pinyin"}


def test_generation_streams_the_same_text_as_server_sent_events(server):
    port, _ = server
    body = {"prompt": "新华社北京", "max_new_tokens": 20, "seed": 3}
    whole = request(port, "POST", "/api/generate", body)[1]
    status, stream = request(port, "POST", "/api/generate", {**body, "stream": True})
    events = [json.loads(line[len("data: "):]) for line in stream.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == {"done": True, "new_tokens": whole["new_tokens"]}
    assert "".join(e["text"] for e in events[:-1]) == whole["text"] and len(events) > 2


def test_api_errors(server):
    port, partial = server
    assert request(port, "POST", "/api/classify", raw=b"{not json")[0] == 400
    assert request(port, "POST", "/api/classify", raw=b"[1, 2]")[0] == 400
    status, res = request(port, "POST", "/api/classify", {"text": 5})
    assert status == 400 and "text" in res["error"]
    assert request(port, "POST", "/api/classify", {"text": "   "})[0] == 400
    assert request(port, "POST", "/api/generate", {"max_new_tokens": 0})[0] == 400
    assert request(port, "POST", "/api/generate", {"temperature": "hot"})[0] == 400
    status, res = request(port, "POST", "/api/generate", {"prompt": "a", "max_tokens": 5})  # a misspelt field
    assert status == 400 and "unknown field 'max_tokens'" in res["error"]
    status, res = request(port, "POST", "/api/classify", raw=b"x" * (64 * 1024 + 1))
    assert status == 413 and "limit" in res["error"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # 4 MiB announced: refused before it is sent
    conn.putrequest("POST", "/api/classify")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(4 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "limit" in json.loads(resp.read())["error"]
    conn.close()
    deep = b'{"text": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"  # 40 KB, nested 20,000 deep
    status, res = request(port, "POST", "/api/classify", raw=deep)
    assert status == 400 and "nests deeper" in res["error"]
    for raw in (b'{"prompt": "a", "temperature": NaN}', b'{"prompt": "a", "top_p": Infinity}'):
        status, res = request(port, "POST", "/api/generate", raw=raw)
        assert status == 400 and "not a number" in res["error"]
    for kind in ("text/plain", "application/x-www-form-urlencoded", ""):  # what a page elsewhere could post
        status, res = request(port, "POST", "/api/classify", {"text": "x"}, headers={"Content-Type": kind})
        assert status == 415 and "application/json" in res["error"]
    status, res = request(port, "POST", "/api/classify", {"text": "x"}, headers={"Host": "evil.example:80"})
    assert status == 421 and "not this machine" in res["error"]  # DNS rebinding
    assert request(port, "GET", "/api/models", headers={"Host": f"localhost:{port}"})[0] == 200
    for method in ("PUT", "DELETE", "PATCH"):
        status, res = request(port, method, "/api/classify", {"text": "x"})
        assert status == 405 and "error" in res  # JSON, not an HTML page
    assert request(port, "GET", "/nope")[0] == 404
    assert request(port, "POST", "/api/nope", {"text": "x"})[0] == 404
    status, res = request(partial, "POST", "/api/pinyin", {"text": "wo ai bian cheng"})
    assert status == 503 and "python main.py --train --task seq2seq" in res["error"]
    status, ready = request(partial, "GET", "/api/models")
    assert ready["cls"]["ready"] and not ready["seq2seq"]["ready"]
    assert request(partial, "POST", "/api/classify", {"text": "很好"})[0] == 200  # the others still work


def test_idle_and_slow_clients_do_not_stall_the_server(server):
    """Many silent connections and clients that send a byte at a time: a normal request is still answered at
    once (the event loop waits on sockets, not threads)."""
    port, _ = server
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(80)]
    slow = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /api/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing more for now
        slow.append(sock)
    t0 = time.time()
    status, res = request(port, "POST", "/api/classify", {"text": "很好"})
    assert status == 200 and time.time() - t0 < 5
    for sock in idle + slow:
        sock.close()


def test_api_concurrent_requests(server):
    port, _ = server
    jobs = [("/api/classify", {"text": t}) for t in ("很好", "太差了", "一般般吧", "非常满意，下次还来")] + \
           [("/api/generate", {"prompt": p, "max_new_tokens": 8, "seed": i}) for i, p in enumerate(("我", "新华社"))] + \
           [("/api/pinyin", {"text": t}) for t in ("wo ai bian cheng", "jin tian tian qi hen hao")]
    expected = [request(port, "POST", path, body) for path, body in jobs]
    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(lambda job: request(port, "POST", *job), jobs * 3))
    assert got == expected * 3


def test_over_the_concurrency_limit_is_503_with_retry_after(models):
    proc, port = start_server(models, "--limit_concurrency", "1")
    try:
        body = {"prompt": "新华社", "max_new_tokens": 1024, "stop_at_eos": False}
        for _ in range(5):  # the generation takes well under a second: tried again if it was over before the ask
            with ThreadPoolExecutor(max_workers=1) as pool:
                slow = pool.submit(request, port, "POST", "/api/generate", body)
                time.sleep(0.05)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("POST", "/api/classify", body=json.dumps({"text": "很好"}),
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                busy = (resp.status, resp.getheader("Retry-After"), json.loads(resp.read()).get("error", ""))
                assert slow.result()[0] == 200
            if busy[0] != 200:
                break
        assert busy[0] == 503 and busy[1] == "1" and "busy" in busy[2]
        assert request(port, "POST", "/api/classify", {"text": "很好"})[0] == 200  # free again
    finally:
        stop(proc)


def test_serve_command_binds_localhost_and_warns_on_other_addresses(models):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), "--serve", "--host", "0.0.0.0",
                             "--port", "0", "--checkpoint_dir", str(models), "--quiet"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving on"):
                break
        assert any(l.startswith("warning: --host 0.0.0.0 answers other machines") for l in lines)
        port = int(lines[-1].split(":")[-1].split("/")[0])
        status, ready = request(port, "GET", "/api/models", headers={"Host": "my-server.lan"})
        assert status == 200 and ready["lm"]["ready"]  # not loopback: any Host
    finally:
        stop(proc)


def test_page_in_headless_chromium(server):
    """Load the page in a real browser, submit text in two panels and read the results; the panel of a missing
    model shows its message."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("REQUIRE_BROWSER is set but Debian's chromium/chromium-driver are not installed")
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    port, partial = server
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(f"http://127.0.0.1:{port}/")
        box = driver.find_element(By.ID, "cls-text")
        box.clear()
        box.send_keys("房间很干净，服务也很热情")
        driver.find_element(By.ID, "cls-go").click()
        label = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#cls-result .label").text)
        status, api = request(port, "POST", "/api/classify", {"text": "房间很干净，服务也很热情"})
        assert label == api["label"]
        assert len(driver.find_elements(By.CSS_SELECTOR, "#cls-result .bar")) == len(api["probs"])
        # the routing view: a row of tokens per MoE layer, each with its three likeliest experts on hover
        tokens = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cls-routing .tok"))
        routed = request(port, "POST", "/api/routing", {"task": "cls", "text": "房间很干净，服务也很热情"})[1]
        assert len(tokens) == sum(1 for layer in routed["layers"] for top in layer["experts"] if top)
        assert tokens[0].get_attribute("title").startswith("expert ")
        # Enter submits; the candidates are listed and clickable
        s2s = driver.find_element(By.ID, "s2s-text")
        s2s.send_keys(Keys.ENTER)
        pred = wait.until(lambda d: d.find_element(By.ID, "s2s-result").text not in ("", "…") and
                          d.find_element(By.ID, "s2s-result").text)
        api = request(port, "POST", "/api/pinyin", {"text": "woaibiancheng", "num_candidates": 4})[1]
        assert pred == api["pred"]
        cands = driver.find_elements(By.CSS_SELECTOR, "#s2s-candidates .cand")
        assert len(cands) == len(api["candidates"])
        cands[-1].click()
        assert driver.find_element(By.ID, "s2s-result").text == api["candidates"][-1]["text"]
        # generation streams into the page: the same text as the API's answer for the same settings
        driver.find_element(By.ID, "lm-go").click()
        wait.until(lambda d: d.find_element(By.ID, "lm-go").is_enabled() and
                   d.find_element(By.ID, "lm-result").text not in ("", "…"))
        body = {"prompt": "新华社北京", "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 100, "top_k": 0,
                "seed": 1337, "stop_at_eos": False}
        gen = request(port, "POST", "/api/generate", body)[1]
        shown = driver.find_element(By.ID, "lm-result").text
        assert shown.replace("\n", "") == (gen["prompt"] + gen["text"]).replace("\n", "")
        driver.get(f"http://127.0.0.1:{partial}/")
        msg = wait.until(lambda d: d.find_element(By.ID, "seq2seq-status").text)
        assert "python main.py --train --task seq2seq" in msg
        assert not driver.find_element(By.ID, "s2s-go").is_enabled()
    finally:
        driver.quit()


# -----------------------------------------------------------------------------
# Experiment logging

def test_tensorboard_and_mlflow_logs_read_back(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import mlflow
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the file store back, as the trainer does
    out = tmp_path / "run"
    env = {"MLFLOW_TRACKING_URI": "file:" + str(tmp_path / "mlruns")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--train", "--task", "cls", "--preset",
                           "tiny", "--checkpoint", str(tmp_path / "cls.pt"), "--out_dir", str(out), "--quiet",
                           "--tensorboard", "--mlflow", "--max_steps", "30", "--set", "eval_every=10"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    train_rows = [r for r in rows if "train_loss" in r]
    val_rows = [r for r in rows if "val_acc" in r]
    assert len(val_rows) == 3

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"Train/Loss", "Train/Avg_Loss", "Val/Accuracy", "Val/F1", "Train/Aux_Balance",
            "Experts/layer0/expert0"} <= scalars
    loss = [(e.step, e.value) for e in events.Scalars("Train/Loss")]
    assert loss == [(r["step"], pytest.approx(r["train_loss"], rel=1e-6)) for r in train_rows]
    acc = [(e.step, e.value) for e in events.Scalars("Val/Accuracy")]
    assert acc == [(r["step"], pytest.approx(r["val_acc"], rel=1e-6)) for r in val_rows]

    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("moe-cls").experiment_id])[0]
    assert run.data.params["model.num_experts"] == "4" and run.data.params["task"] == "cls"
    f1 = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "Val/F1"))
    assert f1 == [(r["step"], pytest.approx(r["val_f1"], rel=1e-6)) for r in val_rows]
    avg = [m.value for m in client.get_metric_history(run.info.run_id, "Train/Avg_Loss")]
    assert len(avg) == len(train_rows)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "expert_heatmap.png"} <= artifacts


def test_lm_logs_val_loss_and_missing_package_hint(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    run_main("--train", "--task", "lm", "--preset", "tiny", "--checkpoint", str(tmp_path / "lm.pt"),
             "--out_dir", str(out), "--tensorboard", "--max_steps", "20")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    val = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "val_loss" in r]
    assert [e.value for e in events.Scalars("Val/Loss")] == pytest.approx([r["val_loss"] for r in val])
    assert "Val/Bpc" in events.Tags()["scalars"]

    import tracking
    from errors import DataError
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(DataError, match="pip install mlflow"):
        tracking.MlflowSink("x", "y", {})
