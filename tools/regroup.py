"""Regroup jacgrad's flat package into subpackages by concept (issue 19 item 4).

    python tools/regroup.py            # regroup the tree it sits in, then print the report
    python tools/regroup.py --check    # change nothing: say what would move, and refuse unknown modules
    python tools/regroup.py --report   # change nothing: the report of the tree as it is

Table-driven: ``MOVES`` maps every flat module (or package) to its new dotted name, ``SUBPACKAGES``
gives each subpackage its rank and its docstring, ``PUBLIC_PATHS`` the module paths of the flat
layout that keep importing (as the very same module objects). A module found in ``jacgrad/`` that
is not in ``MOVES`` stops the script before it changes anything (add a row). Idempotent: on a
tree already regrouped it moves nothing and rewrites nothing; a half-regrouped tree is refused.

What it does, in this order:
1. ``git mv`` every module to its subpackage, writing each subpackage's ``__init__.py``;
2. rewrites every reference in ``jacgrad/``, ``tests/``, ``benchmarks/``, ``tools/``, ``docs/``,
   ``README.md``, ``mkdocs.yml``, ``pyproject.toml`` and ``.ci/run``: dotted names
   (``jacgrad.backend.cupy`` in a monkeypatch string, ``::: jacgrad.layers`` in ``docs/api.md``,
   the ``jacgrad.cli:main`` entry point), paths (``jacgrad/_gemm.py``), ``jg.<module>`` for modules
   the package root does not bind, and, through ``ast``, every ``from . import x`` / ``from .x import
   y`` / ``from jacgrad import x`` (relative imports recomputed for the new locations);
3. adds the public-path aliases to ``jacgrad/__init__.py`` and rewrites the layer table of
   ``tests/test_import_layers.py`` (between its ``# ---- layers:`` markers) to rank subpackages;
4. prints the report and writes it to ``tools/regroup_layout.md`` (the section for
   ``docs/architecture.md``).
Measured records (``benchmarks/results/``) are history and are not rewritten.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "jacgrad"

# ----------------------------------------------------------------------------- the tables
# (name, what lives there and what it may import). Order = rank, from the ground up: a module may
# import from its own subpackage or one listed before it, never one listed after.
SUBPACKAGES: list[tuple[str, str]] = [
    ("core", "The ground floor: array backends (NumPy, CuPy) and foreign arrays, input validation, lazy "
             "optional imports, the sample RNG, renamed-name warnings, the registry of calls into higher "
             "subpackages' functions, and the CUDA build step that compiles source text on first use. "
             "Imports nothing else of jacgrad."),
    ("elementwise", "The elementwise tables, one row per op: the activations (forward, derivative, "
                    "derivative from the output, bound, CUDA device function) and the gates with their "
                    "VJPs. May import core."),
    ("cuda", "The GPU plumbing: the elementwise and norm kernels (built from kernels/*.cu, reading the "
             "activation table), GEMMs, CUDA graphs and the reused host blocks. May import core, elementwise."),
    ("algebra", "The factor algebra: LayerJacobian diag(d)·Wᵀ and the other structured factors (norms, "
                "residual, per token, diagonal), chains, their bracketing and evaluation, spectra and "
                "Lanczos, the per-sample (a, δ) sweeps and their curvature, finite-difference checks. Knows "
                "no network. May import core … cuda."),
    ("protocol", "What a layer implements and what every layer shares: the layer protocol and its "
                 "registry, the dense passes, the parameter leaves ((a, δ) pairs with a token axis) and "
                 "the per-token rows. May import core … algebra."),
    ("conv", "The convolutional family: Conv1d/Conv2d, pools, Flatten, eval BatchNorm, their im2col "
             "operators, factors and leaves. May import core … protocol."),
    ("tokens", "Token layers: MultiHeadAttention and Embedding, their factors and leaves (their torch "
               "mapping is in io.interop). May import core … protocol."),
    ("nn", "The dense family of layers (Dense, LayerNorm, RMSNorm, Residual, Activation), the façade "
           "jacgrad.layers that exports every layer, the passes through a stack of layers, losses and "
           "their Hessians, initialisers. May import core … tokens."),
    ("io", "Files and other frameworks: the network file format, its readers, layouts and safety "
           "checks, checkpoint keys, and interop/ (torch module walks, sklearn, flax). May import core … nn."),
    ("params", "Parameter-space products from a network's (a, δ) pairs: per-sample gradients and "
               "norms, the NTK, Gauss–Newton products, private (clipped, noised) gradients, and the "
               "free functions jg.ntk, jg.per_sample_grad_norms, …. May import core … io."),
    ("steps", "Compiled steps: buffers once, parameters by reference, one CUDA graph on CuPy — the "
              "training step, the compiled Jacobian, the private step. May import core … params."),
    ("network", "The network: Sequential, and MLP (a Sequential of Dense layers), with their "
                "methods; and jg.torch (DP-SGD for a torch model through a Sequential). "
                "May import core … steps."),
    ("models", "Any torch model in: graph capture (jg.from_torch), jg.explain, the op table, named "
               "checkpoints (jg.load). May import core … network."),
    ("distributed", "The same computations over Dask arrays chunked along the batch. "
                    "May import core … models."),
    ("flow", "The gradient-flow report: statistics, per-layer and per-block rows, verdict, plot, JSON, "
             "and jg.Monitor for training loops. May import core … distributed."),
    ("cli", "The jacgrad command (report, check, info, bench). May import everything below."),
    ("bench", "The benchmark runner behind `jacgrad bench`. May import everything below."),
]
GROUND = {"examples": "core"}  # packages that stay where they are, ranked with a subpackage
# Subpackages that share the rank of an earlier one: the command and its benchmark runner call
# each other's modules (``jacgrad bench`` runs bench; bench reads the command's options).
PEERS = {"bench": "cli"}


def ranks() -> dict[str, int]:
    """subpackage -> rank (peers share one)."""
    out: dict[str, int] = {}
    for name, _ in SUBPACKAGES:
        out[name] = out[PEERS[name]] if name in PEERS else len(set(out.values()))
    return out

# Flat dotted name (under jacgrad/) -> new dotted name. A package row moves the whole package.
MOVES: dict[str, str] = {
    # core
    "backend": "core.backend", "_foreign_arrays": "core.foreign_arrays", "_validate": "core.validation",
    "_lazy": "core.lazy", "_sample_rng": "core.sample_rng", "_cuda_build": "core.cuda_build",
    "_renamed": "core.renamed", "_layer_list": "core.layer_list", "_above": "core.above",
    # elementwise
    "activations": "elementwise.activations", "_activation_row": "elementwise.activation_row",
    "_activation_params": "elementwise.activation_params", "_activation_more": "elementwise.activation_more",
    "_erf": "elementwise.erf", "gates": "elementwise.gates",
    # cuda
    "kernels": "cuda.kernels", "norm_kernels": "cuda.norm_kernels", "_cuda_graph": "cuda.graphs",
    "_gemm": "cuda.gemm", "hostpool": "cuda.hostpool",
    # algebra
    "jacobian": "algebra.jacobian", "chain": "algebra.chain", "factors": "algebra.factors",
    "token_factor": "algebra.token_factor", "diag_factor": "algebra.diag_factor",  # (merged into algebra.factors since)
    "bracketing": "algebra.bracketing", "_bracket_evaluate": "algebra.bracket_evaluate",
    "spectra": "algebra.spectra", "_lanczos": "algebra.lanczos", "check": "algebra.check",
    "per_sample": "algebra.per_sample", "curvature": "params.curvature",
    # protocol
    "layer_protocol": "protocol.layer", "_passes": "protocol.passes", "param_leaves": "protocol.leaves",
    "_token_rows": "protocol.token_rows",
    # nn
    "layers": "nn.layers", "dense_layer": "nn.dense", "norm_layers": "nn.norms", "residual_layer": "nn.residual",
    "activation_layer": "nn.activation", "_block_passes": "nn.stack",
    "losses": "nn.losses", "_loss_workspace": "nn.loss_workspace", "loss_hessians": "nn.loss_hessians",
    "initializers": "nn.initializers",
    # conv
    "_im2col": "conv.im2col", "conv_factors": "conv.factors", "conv_leaves": "conv.leaves", "conv_layers": "conv.layers",
    "pool_layers": "conv.pools", "batchnorm_layers": "conv.batchnorm",
    # tokens
    "attention": "tokens.attention", "attention_factor": "tokens.attention_factor", "embedding": "tokens.embedding",
    "embedding_leaf": "tokens.embedding_leaf",
    # models (before the interop row: these leave the interop package first)
    "interop.torch_graph": "models.graph", "interop.torch_chain": "models.chain",
    "interop.torch_explain": "models.explain", "interop.torch_ops": "models.ops", "checkpoints": "models.checkpoints",
    # io
    "netfile": "io.netfile", "_file_readers": "io.file_readers", "_file_layouts": "io.file_layouts",
    "_file_safety": "io.file_safety", "_state_keys": "io.state_keys", "_mlp_interop": "io.mlp_interop",
    "interop": "io.interop",
    # params
    "ntk": "params.ntk", "private": "params.private", "_sequential_param_space": "params.param_space",
    "products": "params.products",
    # steps
    "compiled": "steps.compiled", "_compiled_sequential": "steps.compiled_sequential",
    "_compiled_jacobian": "steps.compiled_jacobian", "_step_io": "steps.step_io",
    "_private_step": "steps.private_step",
    # network
    "mlp": "network.mlp", "sequential": "network.sequential", "_sequential_cache": "network.cache", "torch": "network.torch_dp",
    # flow
    "diagnostics": "flow.diagnostics", "_flow": "flow.statistics", "report": "flow.report",
    "_report_plot": "flow.report_plot", "_report_blocks": "flow.report_blocks", "_leaf_flow": "flow.layer_rows",
    "block_flow": "flow.block_flow", "_verdict": "flow.verdict", "_io_spectrum": "flow.io_spectrum",
    "_layer_norms": "flow.layer_norms", "monitor": "flow.monitor", "_monitor_history": "flow.monitor_history",
    # cli
    "cli": "cli.main", "_cli_common": "cli.common", "_cli_report": "cli.report",
    "_cli_check": "cli.check", "_cli_threads": "cli.threads", "_cli_model": "cli.model",
    "_cli_history": "cli.history",
    # packages that stay
    "distributed": "distributed", "bench": "bench", "examples": "examples",
}

# The flat layout's public module paths that keep importing: ``import jacgrad.layers`` gives the
# very module ``jacgrad.nn.layers`` (a sys.modules alias, so monkeypatching either is one thing).
PUBLIC_PATHS = ["activations", "backend", "check", "compiled", "diagnostics", "gates", "hostpool",
                "layers", "losses", "torch"]

TEXT_DIRS = ["jacgrad", "tests", "benchmarks", "tools", "docs", "kernels"]
TEXT_FILES = ["README.md", "mkdocs.yml", "pyproject.toml", ".ci/run"]
TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".toml", ".cfg", ".ini", ".txt", ".sh", ".cu", ".cuh", ""}
SKIP = ["benchmarks/results/", "tools/regroup.py", "tools/regroup_layout.md", "tests/test_regroup.py"]
LAYERS_BEGIN, LAYERS_END = "# ---- layers: begin", "# ---- layers: end"
ALIAS_MARK = "# ---- public module paths (tools/regroup.py)"


# ----------------------------------------------------------------------------- names
def _path_of(dotted: str, root: Path = ROOT) -> Path:
    """The module file or package folder of a dotted name under jacgrad/ (the .py when both exist:
    ``cli.py`` beside the new ``cli/``)."""
    base = root / PKG / Path(*dotted.split("."))
    return base if base.is_dir() and not base.with_suffix(".py").is_file() else base.with_suffix(".py")


def new_name(old: str) -> str | None:
    """The new dotted name of a flat dotted name (``interop.torch`` -> ``io.interop.torch``), or None."""
    parts = old.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in MOVES:
            return ".".join([MOVES[head]] + parts[i:])
    return None


def flat_modules(root: Path = ROOT) -> list[str]:
    """The top-level modules and packages of jacgrad/ (``__init__`` left out)."""
    out = []
    for p in sorted((root / PKG).iterdir()):
        if p.suffix == ".py" and p.name != "__init__.py":
            out.append(p.stem)
        elif p.is_dir() and (p / "__init__.py").is_file():
            out.append(p.name)
    return out


def state(root: Path = ROOT) -> tuple[str, list[str]]:
    """("flat" | "regrouped" | "mixed", unknown top-level names)."""
    present = flat_modules(root)
    subs = {s for s, _ in SUBPACKAGES}
    moving = {k for k, v in MOVES.items() if k != v}
    old_here = [m for m in present if m in moving and m not in subs]
    new_here = [s for s in subs if (root / PKG / s / "__init__.py").is_file() and s not in MOVES.values()]
    stays = {k for k, v in MOVES.items() if k == v}
    if not old_here:
        unknown = [m for m in present if m not in subs and m not in stays]
        return "regrouped", unknown
    unknown = [m for m in present if m not in MOVES and m not in subs]
    return ("mixed" if new_here else "flat"), unknown


# ----------------------------------------------------------------------------- python imports
def _module_of(path: Path, root: Path) -> tuple[list[str], bool] | None:
    """(package parts under jacgrad of the module in ``path``, is_package), or None outside jacgrad/."""
    rel = path.relative_to(root)
    if rel.parts[0] != PKG:
        return None
    parts = list(rel.with_suffix("").parts[1:])
    if parts[-1] == "__init__":
        return parts[:-1], True
    return parts, False


def rewrite_imports(source: str, old_module: tuple[list[str], bool] | None, new_module: tuple[list[str], bool] | None,
                    modules: set[str]) -> str:
    """Rewrite ``from .x import y`` / ``from . import x`` / ``from jacgrad import x`` in ``source``.

    ``old_module``/``new_module``: where the file's module sat and sits (parts under jacgrad,
    is_package); None for files outside jacgrad/. ``modules``: every flat dotted module name."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if node.module != PKG:
                continue
            base: list[str] = []
        else:
            if old_module is None:
                continue
            parts, is_pkg = old_module
            package = parts if is_pkg else parts[:-1]
            up = node.level - 1
            if up > len(package):
                continue
            base = package[: len(package) - up] + (node.module.split(".") if node.module else [])
        groups: dict[str, list[str]] = {}
        for alias in node.names:
            bound = alias.asname or alias.name
            full = ".".join(base + [alias.name])
            if alias.name != "*" and full in modules and new_name(full):
                target = new_name(full).split(".")
                frm, name = target[:-1], target[-1]
            else:
                frm = (new_name(".".join(base)) or ".".join(base)).split(".") if base else []
                frm, name = [p for p in frm if p], alias.name
            spelled = name if bound == name else f"{name} as {bound}"
            groups.setdefault(_spell_from(frm, node.level == 0, new_module), []).append(spelled)
        new = [f"from {frm} import {', '.join(names)}" for frm, names in groups.items()]
        head = lines[node.lineno - 1][: node.col_offset]
        tail = lines[node.end_lineno - 1][node.end_col_offset:]
        comment = tail.strip() if tail.strip().startswith("#") else ""
        if head.strip() or (tail.strip() and not comment):  # "x = 1; from . import y": leave it, say so
            print(f"  (left as is, line {node.lineno}: an import sharing its line with other code)", file=sys.stderr)
            continue
        indent = head
        text = ("\n" + indent).join(_wrap(s, indent) for s in new) + (f"  {comment}" if comment else "")
        original = "".join(lines[node.lineno - 1: node.end_lineno])
        if _normal(original) != _normal(text.replace(comment, "") if comment else text):
            edits.append((node.lineno, node.end_lineno, indent + text + "\n"))
    for start, end, text in sorted(edits, reverse=True):
        lines[start - 1: end] = [text]
    return "".join(lines)


def _normal(s: str) -> str:
    return re.sub(r"[\s()]+", " ", re.sub(r"#.*", "", s)).replace(", ", ",").replace(" ,", ",").strip().rstrip(",")


def _wrap(stmt: str, indent: str, width: int = 110) -> str:
    if len(indent) + len(stmt) <= width:
        return stmt
    head, names = stmt.split(" import ", 1)
    return f"{head} import (\n" + "".join(f"{indent}    {n.strip()},\n" for n in names.split(",")) + f"{indent})"


def _spell_from(target: list[str], absolute: bool, new_module: tuple[list[str], bool] | None) -> str:
    """``from`` clause for the jacgrad module ``target`` (parts under jacgrad), relative when the
    importing file is inside jacgrad and was written relative."""
    if absolute or new_module is None:
        return ".".join([PKG] + target)
    parts, is_pkg = new_module
    here = parts if is_pkg else parts[:-1]
    common = 0
    while common < min(len(here), len(target)) and here[common] == target[common]:
        common += 1
    return "." * (len(here) - common + 1) + ".".join(target[common:])


# ----------------------------------------------------------------------------- text references
def rewrite_text(text: str, root_bound: set[str]) -> str:
    """Dotted names ``jacgrad.x.y``, paths ``jacgrad/x.py`` and ``jg.<module>`` attribute chains."""
    def dotted(m):
        parts = m.group(1).split(".")
        called = m.string[m.end(): m.end() + 1] == "("  # jacgrad.ntk(net, x): the function, not the module
        for i in range(len(parts), 0, -1):
            head = ".".join(parts[:i])
            if head in MOVES and MOVES[head] != head and not (called and i == len(parts)):
                return f"{PKG}." + ".".join([MOVES[head]] + parts[i:])
        return m.group(0)

    def path(m):
        parts, suffix = m.group(1).split("/"), m.group(2)
        for i in range(len(parts), 0, -1):
            head = ".".join(parts[:i])
            if head in MOVES and MOVES[head] != head and (i < len(parts) or suffix):
                return f"{PKG}/" + "/".join(MOVES[head].split(".") + parts[i:]) + suffix
        return m.group(0)

    def jg(m):
        name = m.group(2)
        if name in MOVES and MOVES[name] != name and name not in root_bound:
            return f"{m.group(1)}.{MOVES[name]}"
        return m.group(0)

    text = re.sub(r"(?<![\w.])jacgrad\.(\w+(?:\.\w+)*)", dotted, text)
    text = re.sub(r"(?<![\w/.])jacgrad/(\w+(?:/\w+)*)(\.py|/)?", path, text)
    return re.sub(r"(?<![\w.])(jg)\.(\w+)\b", jg, text)


def rewrite_bare_files(text: str) -> str:
    """``see _gemm.py`` in jacgrad's own comments -> ``see cuda/gemm.py``: only private (underscored)
    names, which are unambiguous; a bare ``torch.py`` may mean another package's file."""
    def bare(m):
        name = m.group(1)
        if name in MOVES and MOVES[name] != name:
            return "/".join(MOVES[name].split(".")) + ".py"
        return m.group(0)

    return re.sub(r"(?<![\w/.])(_[a-z]\w*)\.py\b", bare, text)


def _root_bound(init: Path) -> set[str]:
    """The names the package root binds (``from . import a, b``; ``from .x import y``)."""
    bound = set()
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            bound |= {a.asname or a.name for a in node.names}
    return bound


# ----------------------------------------------------------------------------- the steps
def _git(*args: str, root: Path = ROOT) -> None:
    subprocess.run(["git", *args], cwd=root, check=True)


def _text_files(root: Path) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", *TEXT_DIRS, *TEXT_FILES], cwd=root, check=True,
                         capture_output=True).stdout.decode().split("\0")
    files = []
    for rel in filter(None, out):
        if any(rel.startswith(s) for s in SKIP) or Path(rel).suffix not in TEXT_SUFFIXES:
            continue
        p = root / rel
        if p.is_file():
            files.append(p)
    return files


def preflight(root: Path = ROOT) -> list[str]:
    """What would stop the regrouping half way, found before anything changes."""
    problems = []
    for old, new in MOVES.items():
        src, dst = _path_of(old, root), _path_of(new, root)
        if old != new and src.exists() and (dst.exists() or (root / PKG / Path(*new.split("."))).is_dir()):
            problems.append(f"{src.relative_to(root).as_posix()} would move onto {dst.relative_to(root).as_posix()}, which exists")
    test = root / "tests" / "test_import_layers.py"
    if test.is_file() and not (LAYERS_BEGIN in (t := test.read_text(encoding="utf-8")) and LAYERS_END in t):
        problems.append(f"{test.relative_to(root)}: the markers {LAYERS_BEGIN!r} … {LAYERS_END!r} around RANK are missing")
    for f in _text_files(root):
        if f.suffix == ".py":
            try:
                ast.parse(f.read_text(encoding="utf-8"))
            except SyntaxError as exc:
                problems.append(f"{f.relative_to(root)}: not parseable ({exc.msg}, line {exc.lineno})")
    return problems


def regroup(root: Path = ROOT) -> None:
    modules = set()
    for top in flat_modules(root):
        p = root / PKG / top
        modules.add(top)
        if p.is_dir():
            for f in p.rglob("*.py"):
                rel = f.relative_to(root / PKG).with_suffix("").parts
                modules.add(".".join(rel[:-1] if rel[-1] == "__init__" else rel))
    bound = _root_bound(root / PKG / "__init__.py")
    old_of_file: dict[Path, tuple[list[str], bool]] = {}
    for f in (root / PKG).rglob("*.py"):
        old_of_file[f] = _module_of(f, root)
    # 1. moves
    for sub, doc in SUBPACKAGES:
        d = root / PKG / sub
        if sub in MOVES.values() and MOVES.get(sub) == sub:
            continue  # a package that stays (distributed, bench): its __init__ is its own
        d.mkdir(exist_ok=True)
        init = d / "__init__.py"
        if not init.exists():
            init.write_text(f'"""{_docstring(sub, doc)}"""\n', encoding="utf-8")
            _git("add", str(init.relative_to(root)), root=root)
    renamed: dict[Path, Path] = {}
    for old, new in MOVES.items():
        if old == new:
            continue
        src, dst = _path_of(old, root), _path_of(new, root)
        if not src.exists():  # a row for a module this tree does not have (merged away): nothing to move
            print(f"  (no {src.relative_to(root).as_posix()} here: its row is skipped)", file=sys.stderr)
            continue
        if src.is_dir():
            dst = root / PKG / Path(*new.split("."))
        for f in ([src] if src.is_file() else sorted(src.rglob("*.py"))):
            renamed[f] = dst / f.relative_to(src) if src.is_dir() else dst
        _git("mv", str(src.relative_to(root)), str(dst.relative_to(root)), root=root)
    new_of_file = {renamed.get(f, f): m for f, m in old_of_file.items()}
    # 2. references
    for f in _text_files(root):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a data file
        out = rewrite_text(text, bound)
        if f.suffix == ".py" and f.is_relative_to(root / PKG):
            out = rewrite_bare_files(out)
        if f.suffix == ".py":
            old_mod = new_of_file.get(f)
            new_mod = _module_of(f, root) if old_mod is not None else None
            out = rewrite_imports(out, old_mod, new_mod, modules)
        if out != text:
            f.write_text(out, encoding="utf-8")
    # 3. aliases and the layer test
    _add_aliases(root / PKG / "__init__.py")
    _rewrite_layer_test(root / "tests" / "test_import_layers.py")


def _docstring(sub: str, doc: str) -> str:
    words, line, out = [f"jacgrad.{sub}:"] + doc.split(), "", []
    for w in words:
        if len(line) + len(w) + 1 > 96:
            out.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    out.append(line)
    return "\n".join(out) + "\n"


def _add_aliases(init: Path) -> None:
    text = init.read_text(encoding="utf-8")
    if ALIAS_MARK in text:
        return
    rows = "".join(f'    "{name}": "{MOVES[name]}",\n' for name in PUBLIC_PATHS)
    text += (f"\n\n{ALIAS_MARK}: ``import jacgrad.layers`` still gives jacgrad.nn.layers,\n"
             "# the very module (not a copy), so imports written for the flat layout keep working.\n"
             "import importlib as _importlib  # noqa: E402\n"
             "import sys as _sys  # noqa: E402\n\n"
             "_PUBLIC_PATHS = {\n" + rows + "}\n"
             "for _name, _path in _PUBLIC_PATHS.items():\n"
             "    _module = _importlib.import_module(f\"{__name__}.{_path}\")\n"
             "    _sys.modules.setdefault(f\"{__name__}.{_name}\", _module)\n"
             "    globals().setdefault(_name, _module)\n"
             "del _name, _path, _module\n")
    init.write_text(text, encoding="utf-8")


def _rewrite_layer_test(test: Path) -> None:
    if not test.is_file():
        return
    text = test.read_text(encoding="utf-8")
    a, b = text.find(LAYERS_BEGIN), text.find(LAYERS_END)
    a = text.index("\n", a) + 1
    rank = ranks()
    names = [s for s, _ in SUBPACKAGES if s not in PEERS]
    table = "".join(f'    "{s}": {r},\n' for s, r in rank.items())
    table += "".join(f'    "{k}": {rank[v]},  # stays in place\n' for k, v in GROUND.items())
    cli = [MOVES[m] for m in ("cli", "_cli_report", "_cli_check", "_cli_common")]
    block = ("# The rank of every subpackage (written by tools/regroup.py from its SUBPACKAGES table): a\n"
             "# module may import from its own subpackage or a lower one, never a higher one. A module's\n"
             "# rank is its subpackage's.\n"
             "RANK: dict[str, int] = {\n" + table + "}\n"
             f"LAYER_NAMES = {names!r}\n"
             f"COMMAND_MODULES = {cli!r}\n")
    test.write_text(text[:a] + block + text[b:], encoding="utf-8")


# ----------------------------------------------------------------------------- the report
def _imports_of(path: Path, root: Path) -> set[str]:
    """The subpackages a module imports (first component of every jacgrad module it names)."""
    me = _module_of(path, root)
    out = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith(PKG + ".")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                mod = (node.module or "").split(".")
                if mod[0] == PKG:
                    out |= {mod[1]} if len(mod) > 1 else {a.name for a in node.names}
            elif me is not None:
                parts, is_pkg = me
                package = parts if is_pkg else parts[:-1]
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
                out |= {base[0]} if base else {a.name for a in node.names}
    return out


def report(root: Path = ROOT) -> str:
    kind, _ = state(root)
    if kind != "regrouped":
        lines = ["# Layout (flat: run tools/regroup.py for the subpackage report)", ""]
        big = sorted((len(p.read_text(encoding="utf-8").splitlines()), p.relative_to(root).as_posix())
                     for p in (root / PKG).rglob("*.py"))
        lines += [f"- `{n}` {c} lines" for c, n in big if c > 350]
        return "\n".join(lines) + "\n"
    names = [s for s, _ in SUBPACKAGES]
    rows, over, deps = [], [], {s: set() for s in names}
    for s in names:
        d = root / PKG / s
        files = sorted(d.rglob("*.py"))
        mods = [f for f in files if f.name != "__init__.py" or f.parent != d]
        n_lines = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in files)
        rows.append(f"| `{s}/` | {len(mods)} | {n_lines} | {dict(SUBPACKAGES)[s].split('. ')[0]} |")
        for f in files:
            c = len(f.read_text(encoding="utf-8").splitlines())
            if c > 350:
                over.append(f"- `{f.relative_to(root).as_posix()}`: {c} lines")
            deps[s] |= {t for t in _imports_of(f, root) if t in deps and t != s}
    diagram = []
    rank = ranks()
    for s in reversed(names):
        below = sorted(deps[s], key=names.index, reverse=True)
        peer = [p for p in below if rank[p] == rank[s]]
        below = [p for p in below if rank[p] < rank[s]]
        note = f"   (one rank with {', '.join(peer)})" if peer else ""
        diagram.append(f"{s:<12} -> {', '.join(below) if below else '(nothing of jacgrad)'}{note}")
    text = ["## The subpackages", "",
            "Imports point one way: a subpackage imports only those listed below it "
            "(`tests/test_import_layers.py` checks every module, lazy imports included).", "",
            "| subpackage | modules | lines | what lives there |", "|---|---|---|---|", *rows, "",
            "Who imports whom, top to bottom (the actual imports, read with `ast`):", "", "```",
            *diagram, "```", "",
            "Public module paths of the flat layout that still import (the same module objects): "
            + ", ".join(f"`jacgrad.{n}` → `jacgrad.{MOVES[n]}`" for n in PUBLIC_PATHS) + ".", "",
            "Modules over 350 lines:", "", *(over or ["- none"]), ""]
    return "\n".join(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; say what would happen")
    ap.add_argument("--report", action="store_true", help="change nothing; print the report")
    ap.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    kind, unknown = state(root)
    if unknown:
        print(f"tools/regroup.py: jacgrad/ holds modules the table does not place: {', '.join(unknown)}.\n"
              "Add a row for each to MOVES (and, for a new subpackage, to SUBPACKAGES); nothing was changed.",
              file=sys.stderr)
        return 1
    if kind == "mixed":
        print("tools/regroup.py: jacgrad/ is half regrouped (old modules beside new subpackages); "
              "nothing was changed. Start again from the flat tree.", file=sys.stderr)
        return 1
    if args.report:
        print(report(root))
        return 0
    if args.check:
        print(f"{kind}: " + ("nothing to do" if kind == "regrouped" else
                             f"{sum(k != v for k, v in MOVES.items())} modules and packages would move"))
        return 0
    if kind == "regrouped":
        print("already regrouped: nothing changed")
    else:
        problems = preflight(root)
        if problems:
            print("tools/regroup.py: nothing was changed:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        regroup(root)
    text = report(root)
    (root / "tools" / "regroup_layout.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
