"""tools/regroup.py, the script that regroups jacgrad into subpackages: its table places every
module of this tree, it refuses a module it does not know before changing anything, it recomputes
relative imports for the new locations (checked by importing the rewritten fake package), it
rewrites dotted names and paths, and a second run changes nothing."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("regroup", ROOT / "tools" / "regroup.py")
regroup = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regroup)


def test_the_table_places_every_module_of_this_tree():
    kind, unknown = regroup.state(ROOT)
    assert kind in ("flat", "regrouped")
    assert not unknown, f"add rows to MOVES in tools/regroup.py for: {unknown}"


def test_no_subpackage_is_over_twelve_modules_and_ranks_are_ordered():
    count: dict[str, int] = {}
    for old, new in regroup.MOVES.items():
        if "." in new:
            count[new.split(".")[0]] = count.get(new.split(".")[0], 0) + 1
    assert max(count.values()) <= 12, count
    assert set(count) <= {s for s, _ in regroup.SUBPACKAGES}
    assert len(set(regroup.MOVES.values())) == len(regroup.MOVES), "two modules moved onto one name"


def test_relative_imports_are_recomputed_for_the_new_locations():
    modules = {"backend", "_gemm", "interop", "interop.torch", "cli", "distributed", "distributed.budget"}
    src = "from . import backend, __version__\nfrom ._gemm import matmul  # noqa: F401\nfrom .interop import torch as t\n"
    out = regroup.rewrite_imports(src, (["cli"], False), (["cli", "main"], False), modules)
    assert out == ("from ..core import backend\nfrom .. import __version__\n"
                   "from ..cuda.gemm import matmul  # noqa: F401\nfrom ..io.interop import torch as t\n")
    inner = regroup.rewrite_imports("from .. import backend as b\n", (["distributed", "budget"], False),
                                    (["distributed", "budget"], False), modules)
    assert inner == "from ..core import backend as b\n"
    outside = regroup.rewrite_imports("from jacgrad import _gemm, MLP\n", None, None, modules)
    assert outside == "from jacgrad.cuda import gemm as _gemm\nfrom jacgrad import MLP\n"


def test_dotted_names_paths_and_jg_attributes_are_rewritten():
    text = ('monkeypatch.setattr("jacgrad.backend.cupy", None)\n::: jacgrad.interop.torch\n'
            'see jacgrad/_gemm.py and jacgrad/interop/ ; jacgrad/_kernels stays\n'
            'jg._gemm.matmul; jg.layers.Dense; jacgrad.bench.runner; jacgrad.__version__\n'
            'jacgrad = "jacgrad.cli:main"\njacgrad.ntk(net, x) calls the function of jacgrad.ntk\n')
    out = regroup.rewrite_text(text, root_bound={"layers"})
    assert out == ('monkeypatch.setattr("jacgrad.core.backend.cupy", None)\n::: jacgrad.io.interop.torch\n'
                   'see jacgrad/cuda/gemm.py and jacgrad/io/interop/ ; jacgrad/_kernels stays\n'
                   'jg.cuda.gemm.matmul; jg.layers.Dense; jacgrad.bench.runner; jacgrad.__version__\n'
                   'jacgrad = "jacgrad.cli.main:main"\njacgrad.ntk(net, x) calls the function of jacgrad.params.ntk\n')


def test_private_file_names_in_comments_are_rewritten_and_ambiguous_ones_left():
    text = "# see _gemm.py and ``_cuda_graph.py``; torch.py is torch's own; a_gemm.py, x/_gemm.py stay\n"
    assert regroup.rewrite_bare_files(text) == (
        "# see cuda/gemm.py and ``cuda/graphs.py``; torch.py is torch's own; a_gemm.py, x/_gemm.py stay\n")


def _fake_repo(tmp_path: pathlib.Path, extra: str | None = None) -> pathlib.Path:
    """A git repository with a tiny flat jacgrad whose modules all carry names of the table."""
    repo = tmp_path / "repo"
    pkg = repo / "jacgrad"
    (pkg / "interop").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "tools").mkdir()
    (pkg / "__init__.py").write_text("from . import backend, layers\nfrom .mlp import MLP\n__version__ = '0'\n")
    (pkg / "backend.py").write_text("def get_xp():\n    return 'numpy'\n")
    (pkg / "_gemm.py").write_text("from .backend import get_xp\n")
    (pkg / "layers.py").write_text("from . import _gemm\nfrom .interop import NAME\n")
    (pkg / "mlp.py").write_text("from .layers import _gemm\nclass MLP:\n    pass\n")
    (pkg / "cli.py").write_text("from . import __version__, backend\nfrom .mlp import MLP\n")
    (pkg / "interop" / "__init__.py").write_text("NAME = 'interop'\n")
    (pkg / "interop" / "torch.py").write_text("from .. import backend\nfrom . import NAME\n")
    if extra:
        (pkg / extra).write_text("")
    (repo / "tests" / "test_x.py").write_text("import jacgrad.layers\nfrom jacgrad import _gemm\nfrom jacgrad.cli import MLP\n")
    (repo / "tests" / "test_import_layers.py").write_text(
        f"{regroup.LAYERS_BEGIN}\nRANK = {{}}\n{regroup.LAYERS_END}\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "flat"], cwd=repo, check=True)
    return repo


def _snapshot(repo: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in repo.rglob("*") if ".git" not in p.parts and p.is_file()}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("spoil, says", [("unknown module", "brand_new"), ("no markers", "markers"),
                                          ("broken file", "not parseable")])
def test_what_would_stop_it_half_way_stops_it_before_any_change(tmp_path, capsys, spoil, says):
    repo = _fake_repo(tmp_path, extra="brand_new.py" if spoil == "unknown module" else None)
    if spoil == "no markers":
        (repo / "tests" / "test_import_layers.py").write_text("RANK = {}\n")
    if spoil == "broken file":
        (repo / "tests" / "test_x.py").write_text("from jacgrad import (\n")
    before = _snapshot(repo)
    assert regroup.main(["--root", str(repo)]) == 1
    assert says in capsys.readouterr().err
    assert _snapshot(repo) == before


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_regrouped_fake_package_imports_and_a_second_run_changes_nothing(tmp_path, monkeypatch):
    repo = _fake_repo(tmp_path)
    monkeypatch.setattr(regroup, "PUBLIC_PATHS", ["backend", "layers"])
    assert regroup.main(["--root", str(repo)]) == 0
    assert (repo / "jacgrad" / "cuda" / "gemm.py").is_file() and not (repo / "jacgrad" / "_gemm.py").exists()
    assert (repo / "jacgrad" / "cli" / "main.py").is_file()
    assert (repo / "jacgrad" / "io" / "interop" / "torch.py").is_file()
    assert "RANK" in (repo / "tests" / "test_import_layers.py").read_text() and '"core": 0' in (
        repo / "tests" / "test_import_layers.py").read_text()
    code = ("import jacgrad, jacgrad.layers, jacgrad.cli.main as m, jacgrad.io.interop.torch as t;"
            "import jacgrad.nn.layers as L; assert jacgrad.layers is L and m.MLP is jacgrad.MLP;"
            "assert t.NAME == 'interop' and jacgrad.backend.get_xp() == 'numpy'")
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True)
    test_text = (repo / "tests" / "test_x.py").read_text()
    assert test_text == "import jacgrad.nn.layers\nfrom jacgrad.cuda import gemm as _gemm\nfrom jacgrad.cli.main import MLP\n"
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    assert regroup.main(["--root", str(repo)]) == 0
    diff = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    changed = [line for line in diff.splitlines() if not line.startswith(("R ", "A ", "M ", "D "))]
    assert changed == [], changed
