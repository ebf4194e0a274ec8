"""The ``genepert-scale`` command.

Every subcommand shares the cluster options (``--scheduler``, ``--workers``,
…) and ``--storage-options``; input errors print one clear message (no
traceback unless ``--debug``) and exit with :data:`INPUT_ERROR_EXIT_CODE`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from .. import __version__
from ..pp.params import N_TOP_WORDS, PARAMETERS, PseudobulkParams
from ..cluster import dask_client, limit_heap_fragmentation
from ..tl.embeddings import MISSING_POLICIES
from ..errors import INPUT_ERROR_EXIT_CODE, GenePertInputError, ParameterError
from ..pp.labels import GEARS_CONTROL, parse_label
from ..tl.ridge import DEFAULT_ALPHAS, DEFAULT_SELECT_BY, SELECT_BY
from ..tl.splits import SPLIT_KINDS
from ..tl.data_embedding import PCA_BASELINE_K
from ..io.store import check_output_free, hold_output, local_parent

log = logging.getLogger("genepert_scale")

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}
#: Commands that choose their cluster themselves (from a config file).
OWN_CLUSTER: set[str] = set()


def command(name: str, *, own_cluster: bool = False) -> Callable[[Command], Command]:
    """Register a subcommand handler.

    Handlers run inside the cluster chosen by the common options, unless
    ``own_cluster`` is set.
    """

    def register(func: Command) -> Command:
        COMMANDS[name] = func
        if own_cluster:
            OWN_CLUSTER.add(name)
        return func

    return register


def _storage_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ParameterError(f"--storage-options is not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise ParameterError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def _n_top_genes(text: str) -> int | str:
    if text in N_TOP_WORDS:
        return text
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, 'all' or 'default', got {text!r}") from err


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("cluster and storage")
    group.add_argument("--scheduler", help="address of a running dask scheduler (or DASK_SCHEDULER_ADDRESS)")
    group.add_argument("--workers", type=int, help="start a LocalCluster with N worker processes")
    group.add_argument("--threads-per-worker", type=int, help="threads per LocalCluster worker")
    group.add_argument("--memory-limit", default="auto", help="memory limit per LocalCluster worker, e.g. 2GiB; also caps the pass's block size, "
                            "convert's slabs and the blocks evaluate scores at once")
    group.add_argument("--storage-options", help="JSON of fsspec options for URLs (s3://, gs://, ...)")
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    group.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="genepert-scale",
        description="Out-of-core GenePert: pseudo-bulk Perturb-seq screens and predict unseen perturbations.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parent = common_options()

    p = sub.add_parser("synth", parents=[parent], help="write a synthetic screen and its embedding table")
    p.add_argument("out", help="output zarr store")
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--perturbations", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-rows", type=int, default=10_000, help="rows per written block")
    p.add_argument("--threads", type=int, help="threads drawing cells (default: the CPUs, at most 8)")
    p.add_argument("--responder-share", type=float, default=1.0,
                   help="share of perturbed cells that respond, set by a cell state (default 1: all)")

    p = sub.add_parser("convert", parents=[parent],
                       help="stream an .h5ad (CSR, dense or CSC X) into a chunked CSR zarr store")
    p.add_argument("source", help="input .h5ad")
    p.add_argument("out", help="output zarr store")

    p = sub.add_parser("sort", parents=[parent],
                       help="write a screen with its cells in group order (then a pass in "
                            "group slabs reads it about once)",
                       description="Give the grouping options as the pseudobulk run will.")
    p.add_argument("screen", help="AnnData zarr store (path or URL) or .h5ad")
    p.add_argument("out", help="output zarr store")
    add_parameter_options(p, ("perturbation_key", "control", "context_key", "batch_key"))

    p = sub.add_parser("pseudobulk", parents=[parent], help="normalize, select HVGs, pseudo-bulk")
    add_pseudobulk_options(p)
    p.add_argument("--out", required=True, help="output pseudo-bulk zarr store")

    p = sub.add_parser("evaluate", parents=[parent],
                       help="K-fold CV of GenePert's ridge and baselines over perturbations")
    p.add_argument("pseudobulk", help="pseudo-bulk zarr store")
    add_model_options(p)
    p.add_argument("--folds", type=int, default=5,
                   help="folds over perturbations (kfold), or inner-CV folds choosing alpha")
    p.add_argument("--split", choices=SPLIT_KINDS, default="kfold",
                   help="kfold over perturbations, GEARS' simulation split (held-out genes, "
                        "pairs by seen genes), custom from --split-file (within each context of a "
                        "store with contexts), or context: hold each context out in turn")
    p.add_argument("--split-file", help="custom split: CSV/TSV (perturbation, split = train/val/test "
                                        "or a fold number) or GEARS' JSON {train: [...], test: [...]}")
    p.add_argument("--test-share", type=float,
                   help="simulation split: share of genes (and fully seen pairs) held out (default 0.25)")
    p.add_argument("--pca-baseline", type=int, default=PCA_BASELINE_K, metavar="K",
                   help="K of the pca_ridge baseline (ridge on pca:K gene embeddings of each fold's "
                        "training deltas, for perturbations of measured genes); 0: none (default: %(default)s)")
    p.add_argument("--exclude-targets", action="store_true",
                   help="leave each perturbation's own target genes out of its metrics "
                        "(the Virtual Cell Challenge's convention)")
    p.add_argument("--out", required=True, help="report directory")

    p = sub.add_parser("compare", parents=[parent], help="merge several evaluation reports into one table")
    p.add_argument("runs", nargs="+", help="report directories written by 'evaluate'")
    p.add_argument("--labels", help="comma-separated run names (default: directory names)")
    p.add_argument("--out", required=True, help="output directory: compare.csv, compare.md, compare.png")

    p = sub.add_parser("fit", parents=[parent], help="fit GenePert's ridge on every perturbation")
    p.add_argument("pseudobulk", help="pseudo-bulk zarr store")
    add_model_options(p)
    p.add_argument("--folds", type=int, default=5, help="folds of the CV choosing alpha from a grid")
    p.add_argument("--out", required=True, help="model zarr store")

    p = sub.add_parser("predict", parents=[parent], help="predict perturbations from their embeddings")
    add_prediction_options(p, "model zarr store written by 'fit'")
    p.add_argument("--out", required=True, help="predictions: .zarr, .h5ad or .csv")

    p = sub.add_parser("run", parents=[parent],
                       help="run a batch job from a TOML config, skipping stages already done")
    p.add_argument("config", help="TOML config file (see README, 'Batch runs')")
    p.add_argument("--until", help="last stage to run (pseudobulk, evaluate, fit, predict)")
    p.add_argument("--dry-run", action="store_true", help="only print which stages would run")

    p = sub.add_parser("demo", parents=[parent], help="run the whole job on an embedded synthetic screen")
    p.add_argument("--out", default="demo-output", help="directory for every demo output")

    p = sub.add_parser("cells", parents=[parent],
                       help="cell-level model (VAE latent, OT control->perturbed, embedding-"
                            "conditioned shift): K-fold evaluation and predicted cells (cells extra)")
    add_cells_options(p)

    p = sub.add_parser("cells-predict", parents=[parent],
                       help="predicted cells of perturbations from a saved cell model (cells extra)")
    add_prediction_options(p, "cell model store: DIR/model written by 'cells'")
    p.add_argument("--context", action="append",
                   help="a context to predict in (repeat; default: every context of the model)")
    p.add_argument("--n-cells", type=int, default=500, help="cells per perturbation and context")
    p.add_argument("--out", required=True, help="predicted cells: .h5ad")

    p = sub.add_parser("export-pseudobulk", parents=[parent],
                       help="write a pseudo-bulk store as AnnData (.h5ad)")
    p.add_argument("pseudobulk", help="pseudo-bulk zarr store")
    p.add_argument("out", help="output .h5ad")

    p = sub.add_parser("export-cell-eval", parents=[parent],
                       help="write an evaluation's held-out predictions and the screen's cells as the "
                            "pred.h5ad and real.h5ad that cell-eval scores")
    p.add_argument("evaluation", help="directory written by 'evaluate --out'")
    p.add_argument("screen", help="the screen its pseudo-bulk was made from (zarr store or .h5ad)")
    p.add_argument("--model", default="genepert_ridge", help="the model to export (default: %(default)s)")
    p.add_argument("--block-rows", type=int, help="rows per block read from the screen (default: auto)")
    p.add_argument("--out", required=True, help="output directory: pred.h5ad, real.h5ad")

    p = sub.add_parser("embed-text", parents=[parent],
                       help="embed gene summaries with a sentence-transformers model (text extra)")
    p.add_argument("summaries", help="JSON object: gene symbol -> summary text")
    p.add_argument("--model", default="all-MiniLM-L6-v2",
                   help="model directory or name (all-MiniLM-L6-v2 is packaged)")
    p.add_argument("--out", required=True, help="output parquet table (gene, dim_0, ...)")
    p.add_argument("--names-only", action="store_true", help='embed only "Gene Symbol X"')
    p.add_argument("--batch-size", type=int, default=32)
    return parser


def add_prediction_options(p: argparse.ArgumentParser, model_help: str) -> None:
    """Options of the steps that predict from a saved model (predict, cells-predict)."""
    p.add_argument("model", help=model_help)
    p.add_argument("--embeddings", action="append", required=True,
                   help="the embedding source(s) the model was fitted with, same order")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--perturbations", help='comma-separated, e.g. "GENE1,GENE2,GENE1+GENE3"')
    which.add_argument("--perturbations-file", help="one perturbation per line")
    p.add_argument("--missing", choices=MISSING_POLICIES, default="error",
                   help="genes without a vector: error (default), drop, random or zero")
    p.add_argument("--gene-map", help="two-column table: name to predict -> embedding name")
    p.add_argument("--seed", type=int, default=0, help="seed of --missing random (and of cells drawn)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options of the steps that fit ridge models (evaluate, fit)."""
    p.add_argument("--context", help="the context to model, of a pseudo-bulk made with "
                                     "--context-key (evaluate: every context by default)")
    p.add_argument("--embeddings", action="append", required=True,
                   help="gene embedding table (path or URL), or pca:K (evaluate: top-K principal "
                        "components of each fold's training pseudo-bulk); repeat to concatenate")
    p.add_argument("--alpha", type=float, nargs="+",
                   help="one alpha, or a grid chosen by cross-validation "
                        "(default: 13 values, log-spaced from 1e-3 to 1e3)")
    p.add_argument("--select-by", choices=SELECT_BY, default=DEFAULT_SELECT_BY,
                   help="what the cross-validation chooses alpha by: the mean per-perturbation Pearson "
                        "of predicted vs true delta (the report's lead metric), or the MSE "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds (and of --missing random)")
    p.add_argument("--missing", choices=MISSING_POLICIES, default="drop",
                   help="perturbations whose genes have no vector: drop (reported), random, zero or error")
    p.add_argument("--gene-map", help="two-column table: screen gene name -> embedding name")
    p.add_argument("--solver", choices=("auto", "primal", "dual"), default="auto",
                   help="ridge form; auto: dual when fewer perturbations than dimensions")


def add_pseudobulk_options(p: argparse.ArgumentParser) -> None:
    """Options of the pseudo-bulk step (shared by commands that run it): one
    per field of :class:`.pp.params.PseudobulkParams`, with its default,
    choices and help, and the block size of the pass."""
    p.add_argument("screen", help="AnnData zarr store (path or URL) or .h5ad")
    add_parameter_options(p, PARAMETERS)
    p.add_argument("--block-rows", type=int, help="rows per block of the pass (default: auto)")


def add_parameter_options(p: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """An option for each :class:`.pp.params.PseudobulkParams` field of
    ``names``, with its default, choices and help."""
    for spec in (f for f in fields(PseudobulkParams) if f.name in names):
        flag, meta = "--" + spec.name.replace("_", "-"), spec.metadata
        if isinstance(spec.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=spec.default,
                           help=meta["help"])
            continue
        kind = _n_top_genes if spec.name == "n_top_genes" else _option_type(meta["types"])
        p.add_argument(flag, type=kind, default=spec.default, choices=meta["choices"] or None,
                       help=meta["help"])


def _option_type(types: type | tuple[type, ...]) -> type:
    """The command-line type of a parameter that takes ``types`` (the widest)."""
    types = types if isinstance(types, tuple) else (types,)
    return float if float in types else types[0]


def pseudobulk_params(args: argparse.Namespace) -> dict[str, Any]:
    """The pseudo-bulk parameters among parsed options, by name."""
    return {name: getattr(args, name) for name in PARAMETERS}


#: Options of ``cells`` that set a :class:`.CellsConfig` field (unset: its default).
CELLS_CONFIG_OPTIONS = ("latent_dim", "epochs", "batch_size", "beta", "ot_cells", "ot_epsilon",
                        "ot_map", "injection", "head_epochs", "control_cells", "output", "device", "threads")


def add_cells_options(p: argparse.ArgumentParser) -> None:
    """Options of the cell model (``cells``): the pseudo-bulk options
    (:func:`add_pseudobulk_options`; ``--context-key``: each perturbation's
    cells are moved from its context's control cells), then the model's;
    config options default to :class:`.CellsConfig`'s."""
    add_pseudobulk_options(p)
    p.add_argument("--embeddings", action="append", required=True,
                   help="gene embedding table (path or URL); repeat to concatenate")
    p.add_argument("--pseudobulk", help="the screen's pseudo-bulk store, made with the same "
                                        "options (default: run the pass)")
    p.add_argument("--folds", type=int, default=5, help="folds over perturbations (evaluate's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, samples and networks")
    p.add_argument("--alpha", type=float, nargs="+", help="ridge alpha grid of ridge_shift")
    p.add_argument("--missing", choices=MISSING_POLICIES, default="drop",
                   help="perturbations whose genes have no vector: drop, random, zero or error")
    p.add_argument("--gene-map", help="two-column table: screen gene name -> embedding name")
    model = p.add_argument_group("cell model (defaults: genepert_scale.tl.cells.CellsConfig)")
    model.add_argument("--latent-dim", type=int, help="VAE latent width (32)")
    model.add_argument("--epochs", type=int, help="VAE passes over the training cells (30)")
    model.add_argument("--batch-size", type=int, help="cells per VAE minibatch (256)")
    model.add_argument("--beta", type=float, help="weight of the VAE's KL term (0.01)")
    model.add_argument("--ot-cells", type=int, help="cells per side of each OT problem (500)")
    model.add_argument("--ot-epsilon", type=float, help="entropic OT regularisation, relative (0.1)")
    model.add_argument("--ot-map", choices=("debiased", "barycentric"),
                       help="debiased (default): minus the map to other control cells; barycentric")
    model.add_argument("--injection", choices=("additive", "film", "concat"),
                       help="how the embedding enters the shift head (additive)")
    model.add_argument("--head-epochs", type=int, help="shift-head passes over the OT pairs (40)")
    model.add_argument("--control-cells", type=int, help="control cells kept to be moved (2000)")
    model.add_argument("--output", choices=("residual", "decoded"),
                       help="residual: control cell + decoded change (default); decoded: decoded cell")
    model.add_argument("--device", help="torch device: auto (a GPU if any), cpu, cuda")
    model.add_argument("--threads", type=int, help="torch CPU threads (1)")
    p.add_argument("--eval-cells", type=int, default=500, help="true cells per held-out perturbation")
    p.add_argument("--onehot", action=argparse.BooleanOptionalAction, default=True,
                   help="also score latent_ot_onehot: a learned vector per perturbation, trained "
                        "on every perturbation's cells, held-out ones included (a seen upper bound)")
    p.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=True,
                   help="also fit the model on every perturbation and save it as DIR/model "
                        "(for cells-predict)")
    p.add_argument("--out", required=True, help="output directory")


@command("synth")
def _synth(args: argparse.Namespace) -> int:
    from ..datasets.synth import synth_screen

    out, emb = synth_screen(
        args.out, cells=args.cells, genes=args.genes, perturbations=args.perturbations,
        seed=args.seed, chunk_rows=args.chunk_rows, overwrite=args.overwrite, threads=args.threads,
        responder_share=args.responder_share,
    )
    print(f"screen: {out}\nembedding: {emb}")
    return 0


@command("convert")
def _convert(args: argparse.Namespace) -> int:
    from ..io.convert import convert_h5ad

    print(convert_h5ad(args.source, args.out, overwrite=args.overwrite,
                       storage_options=_storage_options(args.storage_options),
                       memory_limit=args.memory_limit))
    return 0


@command("sort")
def _sort(args: argparse.Namespace) -> int:
    from ..pp.sort import sort_screen

    print(sort_screen(args.screen, args.out, perturbation_key=args.perturbation_key,
                      control=args.control, context_key=args.context_key,
                      batch_key=args.batch_key, overwrite=args.overwrite,
                      storage_options=_storage_options(args.storage_options),
                      memory_limit=args.memory_limit))
    return 0


def run_pseudobulk(args: argparse.Namespace, out: str) -> str:
    """Run the pseudo-bulk step from parsed options and write ``out``."""
    from ..pp.aggregate import pseudobulk, write_pseudobulk

    options = _storage_options(args.storage_options)
    ds = pseudobulk(
        args.screen, **pseudobulk_params(args), storage_options=options,
        block_rows=args.block_rows, progress=not args.no_progress,
        memory_limit=_memory_limit(args),
        as_xarray=True,
    )
    return write_pseudobulk(ds, out, overwrite=args.overwrite, storage_options=options)


@command("pseudobulk")
def _pseudobulk(args: argparse.Namespace) -> int:
    print(run_pseudobulk(args, args.out))
    return 0


def _memory_limit(args: argparse.Namespace) -> str | None:
    """``--memory-limit``, or ``None`` where it is left to the machine ("auto")."""
    return None if args.memory_limit in (None, "auto") else args.memory_limit


def model_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`.model.fit` / :func:`.evaluate.evaluate` from parsed options."""
    return {
        "alphas": args.alpha or DEFAULT_ALPHAS, "n_folds": args.folds, "seed": args.seed,
        "select_by": args.select_by, "missing": args.missing, "gene_map": args.gene_map, "solver": args.solver,
        "storage_options": _storage_options(args.storage_options), "progress": not args.no_progress,
    }


def _pseudobulk_input(args: argparse.Namespace) -> Any:
    """The pseudo-bulk to model: its path, or with ``--context`` that context's rows."""
    if args.context is None:
        return args.pseudobulk
    from ..pp.aggregate import one_context, open_pseudobulk

    store = open_pseudobulk(args.pseudobulk, _storage_options(args.storage_options))
    return one_context(store, args.context, args.pseudobulk)


@command("evaluate")
def _evaluate(args: argparse.Namespace) -> int:
    from ..tl.evaluate import evaluate
    from ..pl.report import write_report

    result = evaluate(_pseudobulk_input(args), args.embeddings, split=args.split,
                      split_file=args.split_file, test_share=args.test_share,
                      pca_baseline=args.pca_baseline or None, exclude_targets=args.exclude_targets,
                      memory_limit=_memory_limit(args), scratch=local_parent(args.out),
                      **model_options(args))
    print(summary_table(result.summary))
    written = write_report(result, args.out, overwrite=args.overwrite,
                           storage_options=_storage_options(args.storage_options))
    print(f"report: {written}")
    return 0


@command("compare")
def _compare(args: argparse.Namespace) -> int:
    from ..pl.compare import COMPARE_METRICS, compare_runs, markdown

    table = compare_runs(args.runs, args.out, labels=args.labels.split(",") if args.labels else None,
                         overwrite=args.overwrite)
    print(markdown(table, COMPARE_METRICS[:3]))
    print(f"comparison: {args.out}")
    return 0


@command("fit")
def _fit(args: argparse.Namespace) -> int:
    from ..tl.model import fit
    from ..tl.ridge import save_model

    model = fit(_pseudobulk_input(args), args.embeddings, **model_options(args))
    print(save_model(model, args.out, overwrite=args.overwrite,
                     storage_options=_storage_options(args.storage_options)))
    return 0


def read_perturbations(args: argparse.Namespace) -> list[str]:
    """Perturbations named by ``--perturbations`` or ``--perturbations-file``."""
    if args.perturbations is not None:
        names = args.perturbations.split(",")
    else:
        try:
            names = Path(args.perturbations_file).read_text().splitlines()
        except OSError as err:
            raise ParameterError(f"cannot read --perturbations-file: {err}") from err
    names = [n.strip() for n in names if n.strip() and not n.strip().startswith("#")]
    if not names:
        raise ParameterError("no perturbation given to predict")
    return names


@command("predict")
def _predict(args: argparse.Namespace) -> int:
    from ..tl.model import predict, write_predictions

    options = _storage_options(args.storage_options)
    predictions = predict(args.model, args.embeddings, read_perturbations(args), missing=args.missing,
                          gene_map=args.gene_map, seed=args.seed, storage_options=options)
    print(write_predictions(predictions, args.out, overwrite=args.overwrite, storage_options=options))
    return 0


def summary_table(summary: dict, metrics: Sequence[str] = ("pearson_delta", "rmse_delta")) -> str:
    """A plain-text table: one row per model, mean ± std over folds of each metric."""
    width = max(18, *(len(model) + 2 for model in summary))
    lines = [f"{'model':<{width}}" + "".join(f"{m:>24}" for m in metrics)]
    for model, values in summary.items():
        cells = []
        for m in metrics:
            mean, std = values[m]["fold_mean"], values[m]["fold_std"]
            cells.append("n/a" if mean is None else f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}"))
        lines.append(f"{model:<{width}}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


@command("run", own_cluster=True)
def _run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipeline import STAGES, default_until, run_stages, select

    config = load_config(args.config, storage_options=_storage_options(args.storage_options))
    stages = select(STAGES, args.until or default_until(config))
    cluster = config.cluster.client_options()
    if args.scheduler or args.workers:
        cluster = {"scheduler": args.scheduler, "workers": args.workers,
                   "threads_per_worker": args.threads_per_worker,
                   "memory_limit": args.memory_limit, "slurm": None}
    with contextlib.nullcontext() if args.dry_run else dask_client(**cluster):
        outcome = run_stages(config, stages, force=args.overwrite, dry_run=args.dry_run,
                             progress=not args.no_progress)
    for planned, what in outcome:
        print(f"{planned.stage.name:<12} {what:<10} {planned.output}")
    return 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from ..tl.embeddings import load_embeddings
    from ..tl.evaluate import evaluate
    from ..tl.model import fit, predict, write_predictions
    from ..pl.report import write_report
    from ..tl.ridge import save_model
    from ..datasets.synth import synth_screen

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    screen, embedding = synth_screen(str(out / "screen.zarr"), cells=20_000, genes=2_000,
                                     perturbations=200, seed=0, overwrite=True)
    pb_args = build_parser().parse_args(["pseudobulk", screen, "--out", "unused",
                                         "--n-top-genes", "1000", "--group-variance", "--overwrite"])
    pb_args.no_progress = args.no_progress
    pb = run_pseudobulk(pb_args, str(out / "pseudobulk.zarr"))
    print(f"pseudo-bulk: {pb}")
    table = load_embeddings(embedding)
    result = evaluate(pb, table, n_folds=5, seed=0, progress=progress)
    report = write_report(result, str(out / "report"), overwrite=True)
    model = save_model(fit(pb, table, progress=progress), str(out / "model.zarr"), overwrite=True)
    seen = {g for p in result.folds["perturbation"] for g in parse_label(p, GEARS_CONTROL)}
    unseen = [g for g in table.genes if g not in seen][:3]
    predictions = write_predictions(
        predict(model, table, [*unseen, f"{unseen[0]}+{unseen[1]}"]),
        str(out / "predictions.csv"), overwrite=True,
    )
    print("\nheld-out perturbations, 5-fold CV (mean ± std over folds):")
    print(summary_table(result.summary))
    print(f"\nreport: {report}\nmodel: {model}\npredictions of unseen {', '.join(unseen)} "
          f"and {unseen[0]}+{unseen[1]}: {predictions}")
    return 0


@command("cells")
def _cells(args: argparse.Namespace) -> int:
    from ..tl.cells import CellsConfig, cells_evaluate
    from ..pl.cells_report import write_cells_report

    from ..tl.cells.model import OWN_PARAMETERS

    options = _storage_options(args.storage_options)
    config = CellsConfig(**{name: getattr(args, name) for name in CELLS_CONFIG_OPTIONS
                            if getattr(args, name) is not None})
    params = pseudobulk_params(args)
    own = {name: params.pop(name) for name in OWN_PARAMETERS}
    with tempfile.TemporaryDirectory(prefix="genepert-cells-") as scratch:
        result = cells_evaluate(
            args.screen, args.embeddings, **own, pseudobulk=args.pseudobulk,
            pseudobulk_options=params, n_folds=args.folds, seed=args.seed,
            alphas=args.alpha or DEFAULT_ALPHAS, missing=args.missing, gene_map=args.gene_map,
            config=config, onehot=args.onehot, final_model=args.save_model,
            eval_cells=args.eval_cells, block_rows=args.block_rows,
            predicted_path=str(Path(scratch) / "predicted_cells.h5ad"), storage_options=options,
            progress=not args.no_progress,
        )
        print(summary_table(result.summary, ("energy_distance", "mmd_rbf", "pearson_delta", "rmse_delta")))
        print(f"report: {write_cells_report(result, args.out, overwrite=args.overwrite, storage_options=options)}")
    return 0


@command("cells-predict")
def _cells_predict(args: argparse.Namespace) -> int:
    from ..tl.cells import load_cells_model, write_predicted_cells
    from ..tl.cells.model import predicted_parts, prediction_features

    options = _storage_options(args.storage_options)
    model = load_cells_model(args.model, options)
    features = prediction_features(model, read_perturbations(args), embeddings=args.embeddings,
                                   missing=args.missing, gene_map=args.gene_map, seed=args.seed,
                                   storage_options=options)
    parts = predicted_parts(model, features, contexts=args.context, n_cells=args.n_cells,
                            seed=args.seed)
    print(write_predicted_cells(model, parts, args.out, overwrite=args.overwrite,
                                storage_options=options))
    return 0


@command("export-pseudobulk")
def _export_pseudobulk(args: argparse.Namespace) -> int:
    from ..io.interop import export_pseudobulk

    print(export_pseudobulk(args.pseudobulk, args.out, overwrite=args.overwrite,
                            storage_options=_storage_options(args.storage_options)))
    return 0


@command("export-cell-eval")
def _export_cell_eval(args: argparse.Namespace) -> int:
    from ..io.celleval import PRED, REAL, export_cell_eval, read_held_out

    options = _storage_options(args.storage_options)
    out = export_cell_eval(args.evaluation, args.screen, args.out, model=args.model,
                           overwrite=args.overwrite, storage_options=options,
                           block_rows=args.block_rows,
                           memory_limit=None if args.memory_limit in (None, "auto") else args.memory_limit)
    held = read_held_out(args.evaluation, args.model, options)
    print(f"{out}\nscore it with: cell-eval run -ap {out}/{PRED} -ar {out}/{REAL} "
          f"--control-pert {shlex.quote(held.control)} --pert-col {shlex.quote(held.perturbation_key)} "
          "--profile anndata")
    return 0


@command("embed-text")
def _embed_text(args: argparse.Namespace) -> int:
    from ..tl.textembed import embed_genes, read_summaries, write_table

    table = embed_genes(read_summaries(args.summaries), args.model,
                        names_only=args.names_only, batch_size=args.batch_size)
    print(write_table(table, args.out, overwrite=args.overwrite,
                      storage_options=_storage_options(args.storage_options)))
    return 0


#: Commands whose ``--out`` is a directory they fill (not one output to replace).
WRITES_INTO_OUT = frozenset({"demo"})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``genepert-scale`` command."""
    args = build_parser().parse_args(argv)
    limit_heap_fragmentation()
    # the ~10^6 objects of the imported libraries are long-lived: keep every
    # garbage collection (during the run and at exit, ~0.5 s each) from walking them
    gc.freeze()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        with contextlib.ExitStack() as held:
            if args.command not in WRITES_INTO_OUT and getattr(args, "out", None):
                # fail before hours of work, not at the end: the output exists,
                # or another run is writing it
                options = _storage_options(args.storage_options)
                check_output_free(args.out, overwrite=args.overwrite, storage_options=options)
                held.enter_context(hold_output(args.out, options))
            if args.command in OWN_CLUSTER:
                return COMMANDS[args.command](args)
            with dask_client(args.scheduler, args.workers,
                             threads_per_worker=args.threads_per_worker,
                             memory_limit=args.memory_limit):
                return COMMANDS[args.command](args)
    except GenePertInputError as err:
        if args.debug:
            raise
        print(f"genepert-scale {args.command}: error: {err}", file=sys.stderr)
        return INPUT_ERROR_EXIT_CODE
