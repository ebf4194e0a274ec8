"""Gene embeddings: reading gene → vector tables, concatenating sources, and
turning perturbation labels into feature rows.

A table is read from the format people have (the GenePT pickle
``dict[symbol, list[float]]``, a pickled DataFrame, CSV/TSV with the gene in
the first column, parquet, ``.npz`` with ``genes`` and a matrix, AnnData
``.h5ad``/zarr with genes as ``obs``), from a local path or an fsspec URL.
Rows are L2-normalised; several sources are each normalised, joined on the
genes they share, and normalised again. A perturbation ``A+B`` is encoded as
``normalize(g(A) + g(B))``.

Gene symbols are matched exactly, then through the optional gene map, then
case-insensitively (with a warning). Genes that still have no vector are
never silently replaced: the ``missing`` policy says what happens (``drop``
the perturbation and report it, a seeded ``random`` unit vector, a ``zero``
vector, or an ``error``).

Pickles can run code when loaded: read only pickles you trust.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from .embedding_checks import check_coverage, check_embedding_table
from ..errors import EmbeddingError, ParameterError, listing
from ..pp.labels import parse_label
from ..io.store import delimiter, filesystem, zarr_store

log = logging.getLogger(__name__)

MissingPolicy = Literal["drop", "random", "zero", "error"]
MISSING_POLICIES: tuple[str, ...] = ("drop", "random", "zero", "error")
#: How feature rows are built; recorded with every model.
NORMALISATION = "l2 per source, concatenated on shared genes, l2; pair A+B: l2(g(A)+g(B))"
#: Genes listed by name in logs and reports (the rest are counted).
LIST_LIMIT = 20


@dataclass(frozen=True)
class EmbeddingTable:
    """Gene → vector table with L2-normalised rows.

    Attributes
    ----------
    genes
        Unique gene symbols, one per row.
    vectors
        ``float64`` matrix, genes × dimensions, rows of unit norm.
    sources
        Identity of every source: path, dimension, number of genes and a
        SHA-256 of its genes and values (what a model records).
    """

    genes: pd.Index
    vectors: np.ndarray
    sources: tuple[dict[str, Any], ...]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]


@dataclass(frozen=True)
class Source:
    """One embedding source before joining: genes, raw vectors, identity."""

    genes: pd.Index
    vectors: np.ndarray
    identity: dict[str, Any]


@dataclass(frozen=True)
class Features:
    """Perturbations encoded as feature rows, lazily (see :meth:`rows`).

    Attributes
    ----------
    perturbations
        The perturbations that have features, in input order.
    members
        For each of them, the table rows of its genes.
    vectors
        The table's vectors, plus filler rows for genes the ``random`` or
        ``zero`` policy filled in.
    dropped
        Perturbations without features (policy ``drop``).
    missing_genes
        Genes without a vector in the table, sorted.
    case_matched
        Genes found only case-insensitively: query → table symbol.
    policy
        The missing-gene policy used.
    """

    perturbations: list[str]
    members: list[tuple[int, ...]]
    vectors: np.ndarray
    dropped: list[str] = field(default_factory=list)
    missing_genes: list[str] = field(default_factory=list)
    case_matched: dict[str, str] = field(default_factory=dict)
    policy: MissingPolicy = "drop"

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def rows(self, index: np.ndarray | slice | None = None) -> np.ndarray:
        """Feature rows of the perturbations at ``index`` (all by default)."""
        if index is None:
            return encode(self.vectors, self.members)
        positions = np.arange(len(self.members))[index]
        return encode(self.vectors, [self.members[i] for i in positions])

    def summary(self) -> dict[str, Any]:
        """What the log and the report say about unmatched genes."""
        return {
            "policy": self.policy,
            "n_dropped_perturbations": len(self.dropped),
            "dropped_perturbations": self.dropped[:LIST_LIMIT],
            "n_missing_genes": len(self.missing_genes),
            "missing_genes": self.missing_genes[:LIST_LIMIT],
            "n_case_insensitive_matches": len(self.case_matched),
        }


@dataclass(frozen=True)
class FeatureRows:
    """The feature rows of ``features`` as an array indexed by row positions,
    encoded when read (a block at a time; see :mod:`.blocks`)."""

    features: Features

    def __getitem__(self, index: np.ndarray | slice) -> np.ndarray:
        return self.features.rows(index)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.features.members), self.features.dim


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; all-zero rows stay zero."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


def encode(vectors: np.ndarray, members: Sequence[Sequence[int]]) -> np.ndarray:
    """``normalize(sum of the member rows)`` for each perturbation."""
    out = np.zeros((len(members), vectors.shape[1]))
    for i, rows in enumerate(members):
        out[i] = vectors[list(rows)].sum(axis=0)
    return normalize_rows(out)


# ---------------------------------------------------------------- readers


def read_table(path: str, storage_options: dict[str, Any] | None = None) -> tuple[pd.Index, np.ndarray]:
    """Read one gene → vector table as it is stored (not normalised).

    Parameters
    ----------
    path
        Local path or fsspec URL. The format follows the suffix: ``.pkl`` /
        ``.pickle`` (dict or DataFrame), ``.csv``, ``.tsv`` / ``.txt``,
        ``.parquet``, ``.npz``, ``.h5ad``, ``.zarr``.
    storage_options
        fsspec options for URLs.

    Returns
    -------
    genes
        Gene symbols as stored.
    vectors
        ``float64`` matrix, one row per gene.

    Raises
    ------
    EmbeddingError
        If the file is missing, of an unknown format, or not a gene → vector table.
    """
    name = str(path).rstrip("/").lower()
    suffix = next((s for s in _READERS if name.endswith(s)), None)
    if suffix is None:
        raise EmbeddingError(
            f"{path}: unknown embedding format; use one of {', '.join(_READERS)}"
        )
    fs, root = filesystem(path, storage_options)
    if not fs.exists(root):
        raise EmbeddingError(f"embedding file {path} does not exist")
    try:
        genes, vectors = _READERS[suffix](path, fs, root, storage_options)
    except EmbeddingError:
        raise
    except Exception as err:  # a reader's own error: say which file
        raise EmbeddingError(f"{path}: cannot read embedding table ({type(err).__name__}: {err})") from err
    genes = pd.Index([str(g) for g in genes])
    return genes, check_embedding_table(genes, vectors, path)


def _read_pickle(path, fs, root, storage_options) -> tuple[Any, np.ndarray]:
    with fs.open(root, "rb") as fh:
        obj = pickle.load(fh)
    if isinstance(obj, pd.DataFrame):
        return _from_frame(path, obj, index_is_gene=True)
    if isinstance(obj, Mapping):
        genes = list(obj.keys())
        return genes, [obj[g] for g in genes]
    raise EmbeddingError(
        f"{path}: pickle holds a {type(obj).__name__}; expected a dict symbol -> vector "
        "(GenePT format) or a pandas DataFrame indexed by gene"
    )


def _read_delimited(path, fs, root, storage_options) -> tuple[Any, np.ndarray]:
    sep = delimiter(path)
    with fs.open(root, "rb") as fh:
        frame = pd.read_csv(fh, sep=sep, header=None, index_col=0)
    first = pd.to_numeric(frame.iloc[0], errors="coerce")
    if first.isna().any():  # a header row
        frame = frame.iloc[1:]
    return _from_frame(path, frame, index_is_gene=True)


def _read_parquet(path, fs, root, storage_options) -> tuple[Any, np.ndarray]:
    try:
        import pyarrow  # noqa: F401
    except ImportError as err:
        raise EmbeddingError(f"{path}: reading parquet needs pyarrow; pip install 'genepert-scale[parquet]'") from err
    with fs.open(root, "rb") as fh:
        frame = pd.read_parquet(fh)
    return _from_frame(path, frame, index_is_gene=not isinstance(frame.index, pd.RangeIndex))


def _read_npz(path, fs, root, storage_options) -> tuple[Any, np.ndarray]:
    with fs.open(root, "rb") as fh, np.load(fh, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if "genes" not in arrays:
        raise EmbeddingError(f"{path}: .npz has arrays {sorted(arrays)}; it needs 'genes' and one matrix")
    matrices = [k for k, v in arrays.items() if k != "genes" and v.ndim == 2]
    if len(matrices) != 1:
        raise EmbeddingError(
            f"{path}: .npz needs exactly one 2-D array beside 'genes', found {matrices or 'none'}"
        )
    return arrays["genes"], arrays[matrices[0]].astype(np.float64)


def _read_anndata(path, fs, root, storage_options) -> tuple[Any, np.ndarray]:
    import anndata as ad

    if str(path).rstrip("/").lower().endswith(".zarr"):
        adata = ad.read_zarr(zarr_store(path, storage_options))
    else:
        with fs.open(root, "rb") as fh:
            adata = ad.read_h5ad(fh)
    matrix = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    return adata.obs_names, matrix.astype(np.float64)


def _from_frame(path: str, frame: pd.DataFrame, *, index_is_gene: bool) -> tuple[Any, np.ndarray]:
    if not index_is_gene:
        frame = frame.set_index(frame.columns[0])
    try:
        values = frame.to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise EmbeddingError(
            f"{path}: embedding columns must all be numbers, the gene in the first "
            f"column or the index ({err})"
        ) from err
    return frame.index, values


_READERS = {
    ".pickle": _read_pickle,
    ".pkl": _read_pickle,
    ".csv": _read_delimited,
    ".tsv": _read_delimited,
    ".txt": _read_delimited,
    ".parquet": _read_parquet,
    ".npz": _read_npz,
    ".h5ad": _read_anndata,
    ".zarr": _read_anndata,
}


def load_embeddings(
    paths: str | Sequence[str], storage_options: dict[str, Any] | None = None
) -> EmbeddingTable:
    """Read one or several sources into one normalised table (:func:`join_sources`)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ParameterError("give at least one embedding source (--embeddings)")
    return join_sources([read_source(path, storage_options) for path in paths])


def read_source(path: str, storage_options: dict[str, Any] | None = None) -> Source:
    """One source: its genes, raw vectors and identity."""
    names, raw = read_table(path, storage_options)
    return Source(names, raw, {"path": str(path), "dim": raw.shape[1], "n_genes": len(names),
                               "sha256": _fingerprint(names, raw)})


def join_sources(sources: Sequence[Source]) -> EmbeddingTable:
    """Each source L2-normalised per row, joined on the genes they all have
    (in the first source's order), concatenated, and normalised again."""
    genes = sources[0].genes
    for source in sources[1:]:
        genes = genes[genes.isin(source.genes)]
    if len(genes) == 0:
        raise EmbeddingError(
            f"the embedding sources {', '.join(s.identity['path'] for s in sources)} share no gene symbol"
        )
    if len(sources) > 1:
        log.info("concatenated %d embedding sources on %d shared genes", len(sources), len(genes))
    vectors = np.hstack([
        pd.DataFrame(normalize_rows(s.vectors), index=s.genes).loc[genes].to_numpy() for s in sources
    ])
    return EmbeddingTable(genes, normalize_rows(vectors), tuple(s.identity for s in sources))


def _fingerprint(genes: pd.Index, vectors: np.ndarray) -> str:
    digest = hashlib.sha256("\n".join(genes).encode())
    digest.update(np.ascontiguousarray(vectors, dtype="<f8").tobytes())
    return digest.hexdigest()


def read_gene_map(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Read a two-column table (CSV, or TSV for ``.tsv``/``.txt``): name used in
    the screen → name in the embedding (an Ensembl id → symbol, an old → new
    symbol). A header row is harmless. Later rows win."""
    fs, root = filesystem(path, storage_options)
    if not fs.exists(root):
        raise EmbeddingError(f"gene map {path} does not exist")
    sep = delimiter(path)
    with fs.open(root, "rb") as fh:
        frame = pd.read_csv(fh, sep=sep, header=None, dtype=str, comment="#")
    if frame.shape[1] < 2:
        raise EmbeddingError(f"gene map {path} needs two columns (from, to), found {frame.shape[1]}")
    frame = frame.dropna(subset=[0, 1])
    return dict(zip(frame[0].str.strip(), frame[1].str.strip()))


# --------------------------------------------------------------- features


def perturbation_genes(label: str) -> tuple[str, ...]:
    """Genes of a perturbation label (``A``, ``A+B``, GEARS ``A+ctrl``)."""
    genes = parse_label(label, control="ctrl")
    if not genes:
        raise EmbeddingError(f"perturbation {label!r} names no gene")
    return genes


def featurize(
    table: EmbeddingTable,
    perturbations: Sequence[str],
    *,
    missing: MissingPolicy = "drop",
    gene_map: Mapping[str, str] | None = None,
    seed: int = 0,
) -> Features:
    """Match the genes of every perturbation to table rows.

    Parameters
    ----------
    table
        The embedding table.
    perturbations
        Labels, ``A`` or ``A+B``.
    missing
        For genes without a vector: ``drop`` the perturbation (reported),
        use a ``random`` unit vector (seeded by ``seed`` and the gene name, so
        the same gene always gets the same vector), a ``zero`` vector, or
        raise (``error``).
    gene_map
        Screen name → embedding name, tried after the exact name.
    seed
        Seed of the ``random`` policy.

    Raises
    ------
    EmbeddingError
        Under ``error``, if a gene has no vector; always, if no perturbation
        is left.
    """
    if missing not in MISSING_POLICIES:
        raise ParameterError(f"missing policy {missing!r}: use one of {', '.join(MISSING_POLICIES)}")
    matcher = _Matcher(table.genes, gene_map or {})
    genes_of = {p: perturbation_genes(p) for p in perturbations}
    missing_genes = sorted({g for genes in genes_of.values() for g in genes if matcher.row(g) is None})
    if matcher.case_matched:
        log.warning(
            "%d genes matched the embedding only case-insensitively: %s",
            len(matcher.case_matched),
            ", ".join(f"{k}->{v}" for k, v in list(matcher.case_matched.items())[:LIST_LIMIT]),
        )
    if missing_genes and missing == "error":
        affected = [p for p, genes in genes_of.items() if set(genes) & set(missing_genes)]
        raise EmbeddingError(
            f"{len(missing_genes)} genes have no embedding vector ({_sources(table)}): "
            f"{listing(missing_genes, LIST_LIMIT)}; {len(affected)} perturbations affected. Add them to "
            "the embedding, map them with --gene-map, or choose --missing drop|random|zero"
        )
    vectors, filler = table.vectors, {}
    if missing_genes and missing in ("random", "zero"):
        extra = np.vstack([_filler(g, table.dim, missing, seed) for g in missing_genes])
        filler = {g: table.vectors.shape[0] + i for i, g in enumerate(missing_genes)}
        vectors = np.vstack([table.vectors, extra])
        log.warning("%d genes have no embedding vector, using %s vectors: %s",
                    len(missing_genes), missing, listing(missing_genes, LIST_LIMIT))
    kept, members, dropped = [], [], []
    for p, genes in genes_of.items():
        rows = [_coalesce(matcher.row(g), filler.get(g)) for g in genes]
        if any(r is None for r in rows):
            dropped.append(p)
        else:
            kept.append(p)
            members.append(tuple(rows))
    if dropped:
        log.warning(
            "dropping %d of %d perturbations whose genes have no embedding vector: %s "
            "(genes: %s)", len(dropped), len(genes_of), listing(dropped, LIST_LIMIT), listing(missing_genes, LIST_LIMIT),
        )
    if not kept:
        check_coverage([g for genes in genes_of.values() for g in genes], table.genes,
                       " + ".join(s["path"] for s in table.sources))
        raise EmbeddingError(
            f"no perturbation has embedding vectors for all its genes ({_sources(table)}); "
            f"missing genes: {listing(missing_genes, LIST_LIMIT)}. Check the symbols or pass --gene-map"
        )
    return Features(kept, members, vectors, dropped, missing_genes, dict(matcher.case_matched), missing)


class _Matcher:
    """Row of a gene: exact symbol, then the gene map, then case-insensitive."""

    def __init__(self, genes: pd.Index, gene_map: Mapping[str, str]):
        self.index = {g: i for i, g in enumerate(genes)}
        lower: dict[str, list[int]] = {}
        for i, g in enumerate(genes):
            lower.setdefault(g.lower(), []).append(i)
        self.lower = {k: v[0] for k, v in lower.items() if len(v) == 1}
        self.genes = genes
        self.gene_map = gene_map
        self.case_matched: dict[str, str] = {}

    def row(self, gene: str) -> int | None:
        names = [gene] + ([self.gene_map[gene]] if gene in self.gene_map else [])
        for name in names:
            if name in self.index:
                return self.index[name]
        for name in names:
            if name.lower() in self.lower:
                row = self.lower[name.lower()]
                self.case_matched[gene] = self.genes[row]
                return row
        return None


def _coalesce(first: int | None, second: int | None) -> int | None:
    return first if first is not None else second


def _filler(gene: str, dim: int, policy: str, seed: int) -> np.ndarray:
    if policy == "zero":
        return np.zeros(dim)
    vector = np.random.default_rng([seed, zlib.crc32(gene.encode())]).normal(size=dim)
    return vector / np.linalg.norm(vector)


def _sources(table: EmbeddingTable) -> str:
    return "embedding " + " + ".join(s["path"] for s in table.sources)
