"""``deploy/``: every manifest parses, every run config in it is valid, and every
``genepert-scale`` (and ``dask scheduler`` / ``dask worker``) command in it uses
real flags — parsed with the real parsers, nothing is started."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from genepert_scale.cli.commands import build_parser
from genepert_scale.cli.config import load_config

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SHELL_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\(\([^)]*\)\)|\$[A-Za-z_]\w*")
LAUNCHERS = {"srun", "exec", "time", "mpirun"}
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1"}


def manifests() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))


def documents() -> Iterator[tuple[Path, object]]:
    for path in manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            yield path, doc


def _walk(node: object) -> Iterator[object]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def _commands_in_text(text: str) -> Iterator[list[str]]:
    """Commands in shell text: backslash continuations joined, comments dropped,
    shell variables replaced by a placeholder value."""
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        # a shell variable stands for some value: "1" parses as any option's value
        yield [SHELL_VARIABLE.sub("1", token) for token in tokens]


def _command_starts(tokens: list[str]) -> Iterator[int]:
    """Where commands start: first, after a shell operator, after ``srun [-options]``."""
    expect = True
    for i, token in enumerate(tokens):
        if expect and not token.startswith("-"):
            yield i
            expect = token in LAUNCHERS
        elif token in SHELL_OPERATORS:
            expect = True


def _after(tokens: list[str], program: tuple[str, ...]) -> Iterator[list[str]]:
    """The arguments of every call of ``program`` in ``tokens``."""
    n = len(program)
    for i in _command_starts(tokens):
        if tuple(tokens[i : i + n]) == program:
            args = []
            for token in tokens[i + n :]:
                if token in SHELL_OPERATORS:
                    break
                args.append(token)
            yield args


def invocations(program: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """(where, arguments) of every call of ``program`` in deploy/."""
    found = []
    for path, doc in documents():
        for node in _walk(doc):
            if isinstance(node, list) and all(isinstance(x, str) for x in node):
                found += [(str(path), args) for args in _after(node, program)]
            elif isinstance(node, str) and " ".join(program) + " " in node:
                for tokens in _commands_in_text(node):
                    found += [(str(path), args) for args in _after(tokens, program)]
    shell_files = [p for p in DEPLOY.rglob("*") if p.suffix in (".sbatch", ".sh", ".md")]
    for path in [*shell_files, DEPLOY / "Dockerfile"]:
        text = path.read_text()
        for json_list in re.findall(r"^CMD (\[.*\])$", text, flags=re.M):
            found += [(str(path), args) for args in _after(yaml.safe_load(json_list), program)]
        for tokens in _commands_in_text(text):
            found += [(str(path), args) for args in _after(tokens, program)]
    return found


def test_every_manifest_parses():
    kinds = {}
    for path, doc in documents():
        assert isinstance(doc, dict), path
        if "apiVersion" in doc:
            assert doc["metadata"]["name"], path
            kinds[doc["kind"]] = doc
    assert {"DaskJob", "DaskCluster", "ConfigMap", "Secret"} <= set(kinds)
    job = kinds["DaskJob"]["spec"]
    assert job["job"]["spec"]["containers"][0]["args"][0] == "genepert-scale"
    assert job["cluster"]["spec"]["worker"]["replicas"] >= 1
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert {"minio", "scheduler", "worker", "job"} <= set(compose["services"])
    assert compose["services"]["job"]["command"][:2] == ["genepert-scale", "run"]


def test_genepert_scale_invocations_use_real_flags():
    found = invocations(("genepert-scale",))
    where = {Path(w).name for w, _ in found}
    assert {"docker-compose.yml", "daskjob.yaml", "cluster.sbatch", "jobqueue.sbatch",
            "Dockerfile", "README.md"} <= where
    parser = build_parser()
    for place, args in found:
        try:
            parser.parse_args(args)
        except SystemExit as exit:
            if exit.code == 0:  # --version, --help
                continue
            pytest.fail(f"{place}: 'genepert-scale {' '.join(args)}' does not parse")


@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_dask_invocations_use_real_flags(role):
    module = __import__(f"distributed.cli.dask_{role}", fromlist=["main"])
    found = invocations(("dask", role))
    assert found
    for place, args in found:
        try:
            module.main.make_context(f"dask {role}", list(args))
        except Exception as err:  # click's usage errors
            pytest.fail(f"{place}: 'dask {role} {' '.join(args)}' does not parse: {err}")


def run_configs(tmp_path: Path) -> list[Path]:
    configs = sorted(DEPLOY.rglob("*.toml"))
    for path, doc in documents():
        for name, text in ((doc.get("data") or {}) if isinstance(doc, dict) else {}).items():
            if name.endswith(".toml"):
                configs.append(tmp_path / f"{path.stem}-{name}")
                configs[-1].write_text(text)
    return configs


def test_run_configs_are_valid(tmp_path):
    configs = run_configs(tmp_path)
    assert len(configs) >= 3
    for path in configs:
        load_config(str(path))


def test_slurm_config_makes_a_job_script():
    pytest.importorskip("dask_jobqueue")
    from genepert_scale.cluster import slurm_cluster

    config = load_config(str(DEPLOY / "slurm" / "run.toml"))
    with slurm_cluster({**config.cluster.slurm, "scheduler_options": {"host": "127.0.0.1"},
                        "log_directory": None}) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -p normal" in script and "--exclusive" in script
