"""hilm_vllm.quality: cosine math, aggregation, exact match, and the offline embedder."""

import math

import numpy as np
import pytest

from hilm_vllm import quality as q

S = 1 / math.sqrt(2)


@pytest.mark.parametrize("a, b, expected", [
    ([1, 0], [1, 0], 1.0),
    ([1, 0], [0, 1], 0.0),
    ([1, 0], [-1, 0], -1.0),
    ([1, 1], [1, 0], S),
    ([3, 4], [6, 8], 1.0),  # scale does not matter
    ([0, 0], [1, 0], 0.0),  # a zero vector has no direction: 0, not NaN
])
def test_cosine(a, b, expected):
    assert q.cosine(a, b) == pytest.approx(expected)


def test_cosine_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one length"):
        q.cosine([1, 0, 0], [1, 0])


def test_paired_cosines_are_row_by_row():
    a = np.array([[1, 0], [1, 1], [0, 0], [2, 0]])
    b = np.array([[1, 0], [1, 0], [1, 0], [0, 3]])
    assert q.paired_cosines(a, b) == pytest.approx([1.0, S, 0.0, 0.0])
    assert q.mean_cosine(a, b) == pytest.approx((1 + S) / 4)
    assert q.mean_cosine(np.zeros((0, 2)), np.zeros((0, 2))) is None
    with pytest.raises(ValueError):
        q.paired_cosines(a, b[:2])


@pytest.mark.parametrize("values, expected", [
    ([1.0, 2.0, 3.0], 2.0), ([1.0, None, 3.0], 2.0), ([None, float("nan"), 4.0], 4.0),
    ([], None), ([None], None),
])
def test_mean_or_none(values, expected):
    assert q.mean_or_none(values) == expected


@pytest.mark.parametrize("num, den, expected", [
    (1.0, 4.0, 0.25), (0.0, 2.0, 0.0), (1.0, 0.0, None), (None, 2.0, None), (1.0, None, None),
])
def test_ratio(num, den, expected):
    assert q.ratio(num, den) == expected


def test_exact_match_rate_skips_missing_pairs():
    assert q.exact_match_rate(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == 0.75
    assert q.exact_match_rate([[1, 2], [3]], [[1, 2], [3, 4]]) == 0.5  # token lists too
    assert q.exact_match_rate(["a", None, "c"], ["a", "b", None]) == 1.0  # one pair left
    assert q.exact_match_rate([None], ["a"]) is None
    with pytest.raises(ValueError, match="2 outputs against 1"):
        q.exact_match_rate(["a", "b"], ["a"])


def test_model_path_is_the_packaged_model():
    path = q.model_path()
    assert (path / "model.safetensors").is_file() and (path / "modules.json").is_file()


@pytest.mark.slow  # importing sentence-transformers + loading the model: 11-35 s on 2 cores
def test_embedder_gives_unit_384_dim_vectors_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    emb = q.Embedder()
    texts = ["def parse(self, text):\n    return text.split()", "import os", "import os",
             "The cat sat on the mat."]
    v = emb.encode(texts)
    assert v.shape == (4, q.EMBEDDING_DIM) == (4, 384)
    assert np.linalg.norm(v, axis=1) == pytest.approx(np.ones(4), abs=1e-5)
    assert q.cosine(v[1], v[2]) == pytest.approx(1.0, abs=1e-6)
    assert q.cosine(v[0], v[3]) < 0.5  # code and prose are far apart
    assert emb.encode([]).shape == (0, 384)
