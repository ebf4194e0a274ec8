"""The run config: every key read, every mistake a clear error naming the key."""

from __future__ import annotations

import pytest

from genepert_scale.cli.config import load_config
from genepert_scale.errors import ParameterError
from genepert_scale.tl.ridge import DEFAULT_ALPHAS

FULL = """
[input]
url = "s3://bucket/screen.zarr"
storage_options = { anon = true }
perturbation_key = "gene"
control = "ctrl"

[pseudobulk]
n_top_genes = "all"
flavor = "cell_ranger"
target_sum = 10000
input = "counts"
min_cells = 5
group_variance = true
block_rows = 2048

[embeddings]
paths = ["genept.pickle", "/abs/esm2.csv"]
missing = "error"
gene_map = "map.tsv"

[evaluate]
folds = 10
seed = 3
alphas = [1, 10.0]
select_by = "mse"
exclude_targets = true

[predict]
perturbations = ["A", "A+B"]

[output]
dir = "results"

[cluster]
kind = "slurm"
workers = 4
slurm = { cores = 8, memory = "32GB", queue = "normal", walltime = "04:00:00" }
"""


def _load(tmp_path, text, **options):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return load_config(str(path), **options)


def test_every_key(tmp_path):
    config = _load(tmp_path, FULL, storage_options={"key": "k"})
    assert config.input.url == "s3://bucket/screen.zarr"
    assert config.input.storage_options == {"anon": True}
    assert (config.input.perturbation_key, config.input.control) == ("gene", "ctrl")
    assert config.pseudobulk.n_top_genes == "all" and config.pseudobulk.flavor == "cell_ranger"
    assert config.pseudobulk.block_rows == 2048 and config.pseudobulk.group_variance
    assert config.embeddings.paths == (str(tmp_path / "genept.pickle"), "/abs/esm2.csv")
    assert config.embeddings.gene_map == str(tmp_path / "map.tsv")
    assert config.embeddings.storage_options == {"key": "k"}  # from the command line
    assert config.evaluate.alphas == (1.0, 10.0) and config.evaluate.folds == 10
    assert config.evaluate.select_by == "mse" and config.evaluate.exclude_targets is True
    assert config.predict.perturbations == ("A", "A+B")
    assert config.output.dir == str(tmp_path / "results")
    assert config.cluster.client_options() == {
        "scheduler": None, "workers": 4, "threads_per_worker": None, "memory_limit": "auto",
        "slurm": {"cores": 8, "memory": "32GB", "queue": "normal", "walltime": "04:00:00"},
    }


def test_defaults(tmp_path):
    config = _load(tmp_path, '[input]\nurl = "s.zarr"\n[output]\ndir = "s3://b/out"\n')
    assert config.pseudobulk.n_top_genes == "default" and config.input.control == "non-targeting"
    assert config.output.dir == "s3://b/out" and config.output.storage_options == {}
    assert config.cluster.client_options()["scheduler"] is None
    assert config.cluster.client_options()["slurm"] is None
    assert config.evaluate.alphas == DEFAULT_ALPHAS and config.evaluate.select_by == "pearson_delta"
    assert config.evaluate.exclude_targets is False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('[input]\nurl = "s.zarr"\ncontrl = "x"\n', r"unknown key\(s\) contrl in \[input\]"),
        ("[inputs]\n", r"unknown table\(s\) inputs"),
        ('[input]\nurl = 3\n', r"\[input\] url = 3 must be of type str"),
        ("[pseudobulk]\nflavor = \"seurat_v9\"\n", "flavor = 'seurat_v9' must be one of"),
        ("[pseudobulk]\nmin_cells = true\n", "min_cells = True must be of type int"),
        ("[pseudobulk]\nn_top_genes = \"many\"\n", "n_top_genes must be a positive integer"),
        ("[evaluate]\nfolds = 1\n", "folds must be at least 2"),
        ("[evaluate]\nalphas = [1, -2]\n", "alphas must be positive"),
        ('[evaluate]\nselect_by = "r2"\n', "select_by = 'r2' must be one of pearson_delta, mse"),
        ("[evaluate]\nexclude_targets = 1\n", "exclude_targets = 1 must be of type bool"),
        ('[evaluate]\nexclude_targets = "yes"\n', "exclude_targets = 'yes' must be of type bool"),
        ('[cluster]\nkind = "local"\n', "kind = 'local' needs workers"),
        ('[cluster]\nkind = "yarn"\n', "kind = 'yarn' must be one of"),
        ("[output\n", "not valid TOML"),
    ],
)
def test_mistakes_are_clear(tmp_path, change, message):
    base = '[output]\ndir = "out"\n'
    text = change if change.startswith("[input]") else '[input]\nurl = "s.zarr"\n' + change
    with pytest.raises(ParameterError, match=message) as info:
        _load(tmp_path, text + ("" if "[output" in change else base))
    assert str(tmp_path / "run.toml") in str(info.value)


def test_required_keys(tmp_path):
    with pytest.raises(ParameterError, match=r"\[input\] url is required"):
        _load(tmp_path, '[output]\ndir = "out"\n')
    with pytest.raises(ParameterError, match=r"\[output\] dir is required"):
        _load(tmp_path, '[input]\nurl = "s.zarr"\n')


def test_slurm_cluster_from_config(tmp_path):
    pytest.importorskip("dask_jobqueue")
    from genepert_scale.cluster import slurm_cluster

    config = _load(tmp_path, FULL)
    options = {**config.cluster.slurm, "scheduler_options": {"host": "127.0.0.1"}}
    with slurm_cluster(options) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -p normal" in script and "#SBATCH -t 04:00:00" in script
    assert "--cpus-per-task=8" in script


def test_slurm_options_rejected(tmp_path):
    pytest.importorskip("dask_jobqueue")
    from genepert_scale.cluster import slurm_cluster

    with pytest.raises(ParameterError, match=r"\[cluster.slurm\] options .* rejected"):
        slurm_cluster({"cores": 2, "memory": "1GB", "no_such_option": 1})
