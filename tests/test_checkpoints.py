"""jg.load (issue 22 item 4): torch checkpoints with named keys, in their wrappers ({"model": sd},
Lightning's {"state_dict": {"model.…": …}}), in .pt/.ckpt, .safetensors and .npz, matched against the
torch module passed as model=; jacgrad's own files as MLP.load / Sequential.load read them; keys
that match nothing and misshapen keys named; hostile files run no code and allocate nothing
beyond their real storage. The reference is torch itself: the loaded network's forward equals the
source module's to 1e-12 in float64."""

from __future__ import annotations

import io
import json
import os
import re
import tracemalloc
from collections import OrderedDict

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
nn = torch.nn
from jacgrad.io.interop.torch_blocks import Residual  # noqa: E402  (needs torch)

rng = np.random.default_rng(0)


def named_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(5, 7), act1=nn.Tanh(), fc2=nn.Linear(7, 6, bias=False),
                                     act2=nn.GELU(), fc3=nn.Linear(6, 3))).double()


def named_blocks(seed):
    torch.manual_seed(seed)
    block = lambda: Residual(nn.Sequential(OrderedDict(ln=nn.LayerNorm(6), fc=nn.Linear(6, 6), act=nn.SiLU())), 0.5)
    model = nn.Sequential(OrderedDict(embed=nn.Linear(4, 6), blocks=nn.Sequential(block(), block()),
                                      norm=nn.RMSNorm(6), head=nn.Linear(6, 2))).double()
    with torch.no_grad():  # not the default ones and zeros: a wrong mapping must show
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def forward_error(net, model, n_in):
    x = rng.standard_normal((9, n_in))
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    return np.abs(jg.to_numpy(net(x)) - want).max() / np.abs(want).max()


def lightning(sd, prefix="model."):
    return {"epoch": 4, "global_step": 120, "pytorch-lightning_version": "2.4.0",
            "state_dict": OrderedDict((prefix + k, v) for k, v in sd.items()),
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}],
            "hyper_parameters": {"width": 6, "name": "run"}}


def save_st(sd, path):
    st = pytest.importorskip("safetensors.torch")
    st.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


WRITERS = {
    "plain.pt": lambda sd, p: torch.save(sd, p),
    "model.pth": lambda sd, p: torch.save({"model": sd, "optimizer": {"lr": 0.01}, "epoch": 7}, p),
    "lightning.ckpt": lambda sd, p: torch.save(lightning(sd), p),
    "ddp.pt": lambda sd, p: torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, p),
    "named.safetensors": save_st,
    "named.npz": lambda sd, p: np.savez(p, **{k: v.numpy() for k, v in sd.items()}),
}


@pytest.mark.parametrize("make, n_in", [(named_mlp, 5), (named_blocks, 4)], ids=["mlp", "blocks"])
@pytest.mark.parametrize("name", list(WRITERS))
def test_a_named_checkpoint_loads_into_the_modules_structure(tmp_path, make, n_in, name):
    source, fresh = make(0), make(1)  # the file holds source's weights; fresh only gives the names
    WRITERS[name](source.state_dict(), tmp_path / name)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    net = jg.load(tmp_path / name, model=fresh)
    assert forward_error(net, source, n_in) < 1e-12
    assert forward_error(net, fresh, n_in) > 1e-3  # not the module's own weights
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # the module is untouched
    # named_mlp's fc2 is Linear(bias=False): an MLP has a bias in every layer, so jg.load reads it as a
    # Sequential with a bias-free Dense (P is torch's)
    assert type(net) is jg.Sequential and net.n_params == sum(p.numel() for p in fresh.parameters())
    assert net.dtype == np.float64 and net.imported_from == "torch"


def test_a_module_in_training_mode_with_dropout_loads_and_keeps_its_modes(tmp_path):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(OrderedDict(fc1=nn.Linear(5, 7), act=nn.ReLU(), drop=nn.Dropout(0.5),
                                             fc2=nn.Linear(7, 3))).double()
    source, fresh = make().eval(), make()
    fresh.drop.eval()  # mixed modes: each is restored as it was
    torch.save(source.state_dict(), tmp_path / "d.pt")
    net = jg.load(tmp_path / "d.pt", model=fresh)
    assert forward_error(net, source, 5) < 1e-12
    assert [m.training for m in fresh.modules()] == [True, True, True, False, True]


def test_the_places_map_every_torch_name_to_its_jacgrad_parameter():
    from jacgrad.models.checkpoints import parameter_places

    model = named_blocks(0)
    net = jg.Sequential.from_torch(model, copy=False)
    places = {p.torch_name: (p.key, p.transposed) for p in parameter_places(model, net)}
    assert places == {"embed.weight": ("0.W", True), "embed.bias": ("0.b", False),
                      "blocks.0.inner.ln.weight": ("1.0.gamma", False), "blocks.0.inner.ln.bias": ("1.0.beta", False),
                      "blocks.0.inner.fc.weight": ("1.1.W", True), "blocks.0.inner.fc.bias": ("1.1.b", False),
                      "blocks.1.inner.ln.weight": ("2.0.gamma", False), "blocks.1.inner.ln.bias": ("2.0.beta", False),
                      "blocks.1.inner.fc.weight": ("2.1.W", True), "blocks.1.inner.fc.bias": ("2.1.b", False),
                      "norm.weight": ("3.gamma", False), "head.weight": ("4.W", True), "head.bias": ("4.b", False)}


def test_square_weights_are_transposed_by_their_strides_not_their_shapes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), t=nn.Tanh(), b=nn.Linear(4, 4))).double()
    torch.save(model.state_dict(), tmp_path / "sq.pt")
    torch.manual_seed(1)
    other = nn.Sequential(OrderedDict(a=nn.Linear(4, 4), t=nn.Tanh(), b=nn.Linear(4, 4))).double()
    assert forward_error(jg.load(tmp_path / "sq.pt", model=other), model, 4) < 1e-12


def test_the_files_dtype_is_kept_unless_dtype_is_given(tmp_path):
    source = named_mlp(0)
    torch.save(source.float().state_dict(), tmp_path / "f32.pt")
    assert jg.load(tmp_path / "f32.pt", model=named_mlp(1)).dtype == np.float32
    net = jg.load(tmp_path / "f32.pt", model=named_mlp(1), dtype="float64")
    assert net.dtype == np.float64 and forward_error(net, source.double(), 5) < 1e-12
    torch.save(named_mlp(0).half().state_dict(), tmp_path / "f16.pt")
    with pytest.raises(ValueError, match=r"f16\.pt.*fc1\.weight is float16.*dtype='float32'"):
        jg.load(tmp_path / "f16.pt", model=named_mlp(1))


# ---------------------------------------------------------------------- without a model: jacgrad's own layouts
def test_without_a_model_jacgrads_own_files_load_as_their_loaders_read_them(tmp_path):
    mlp = jg.MLP.init([3, 5, 2], activation="relu", seed=0, bias_std=0.2)
    mlp.save(tmp_path / "m.safetensors")
    net = jg.load(tmp_path / "m.safetensors")
    assert type(net) is jg.MLP and net.activations == mlp.activations
    x = rng.standard_normal((4, 3))
    np.testing.assert_array_equal(net(x), mlp(x))
    seq = jg.Sequential.from_torch(named_blocks(0))
    seq.save(tmp_path / "s.npz")
    got = jg.load(tmp_path / "s.npz")
    assert type(got) is jg.Sequential and repr(got) == repr(jg.Sequential.load(tmp_path / "s.npz"))
    x = rng.standard_normal((4, 4))
    np.testing.assert_array_equal(got(x), seq(x))
    assert jg.load(tmp_path / "s.npz", dtype="float32").dtype == np.float32


def test_without_a_model_a_lightning_checkpoint_of_an_nn_sequential_needs_only_activations(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    torch.save(lightning(model.state_dict()), tmp_path / "run.ckpt")
    net = jg.load(tmp_path / "run.ckpt", activations=["relu", "identity"])
    assert forward_error(net, model, 3) < 1e-12
    assert forward_error(jg.MLP.load(tmp_path / "run.ckpt", activations=["relu", "identity"]), model, 3) < 1e-12


def test_named_keys_without_a_model_say_to_pass_one(tmp_path):
    torch.save(named_mlp(0).state_dict(), tmp_path / "named.pt")
    with pytest.raises(ValueError, match=r"named\.pt.*'fc1\.(weight|bias)'.*jg\.load\(path, model=module\)"):
        jg.load(tmp_path / "named.pt", activations="tanh")


# ---------------------------------------------------------------------- keys and shapes that do not match
def test_keys_that_match_nothing_list_the_expected_and_the_found(tmp_path):
    torch.save({f"encoder.layers.{i}.w": torch.zeros(2) for i in range(9)}, tmp_path / "other.pt")
    with pytest.raises(KeyError) as info:
        jg.load(tmp_path / "other.pt", model=named_mlp(0))
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "other.pt" in msg
    assert "expected 5 keys ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc3.weight', 'fc3.bias')" in msg
    assert "found 9 keys ('encoder.layers.0.w', 'encoder.layers.1.w'" in msg and ", …)" in msg


def test_a_partial_match_names_the_missing_and_the_unexpected_keys(tmp_path):
    sd = named_mlp(0).state_dict()
    sd["fc4.weight"] = sd.pop("fc3.weight")
    torch.save(lightning(sd), tmp_path / "renamed.ckpt")
    with pytest.raises(ValueError, match=r"read past the prefix 'model\.'; missing 1 key \('fc3\.weight'\); "
                                         r"unexpected 1 key \('model\.fc4\.weight'\)"):
        jg.load(tmp_path / "renamed.ckpt", model=named_mlp(1))


def test_a_jacgrad_file_given_a_model_says_to_load_it_without(tmp_path):
    jg.MLP.init([5, 7, 6, 3], seed=0).save(tmp_path / "own.npz")
    with pytest.raises(ValueError, match="jacgrad's own layout: load it without model="):
        jg.load(tmp_path / "own.npz", model=named_mlp(0))


def test_a_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    sd = named_mlp(0).state_dict()
    sd["fc2.weight"] = torch.zeros(6, 8, dtype=torch.float64)
    torch.save({"model": sd}, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"wide\.pt.*key 'fc2\.weight' has shape \(6, 8\) in the file but the "
                                         r"model's fc2\.weight has shape \(6, 7\)"):
        jg.load(tmp_path / "wide.pt", model=named_mlp(1))


def test_a_checkpoint_with_two_state_dicts_is_ambiguous(tmp_path):
    sd = named_mlp(0).state_dict()
    torch.save({"model": sd, "state_dict": sd}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match=r"two\.pt.*under both 'state_dict' and 'model'"):
        jg.load(tmp_path / "two.pt", model=named_mlp(1))


def test_activations_with_a_model_is_refused():
    with pytest.raises(TypeError, match="with model= the module's activation modules give them"):
        jg.load("x.pt", model=named_mlp(0), activations="relu")


def test_a_module_the_importers_do_not_read_is_their_error(tmp_path):
    torch.save(nn.Conv3d(2, 2, 3).state_dict(), tmp_path / "conv.pt")
    with pytest.raises(TypeError, match="Conv3d.*not supported"):
        jg.load(tmp_path / "conv.pt", model=nn.Sequential(nn.Conv3d(2, 2, 3)))


# ---------------------------------------------------------------------- hostile files
class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # what unpickling would run: create a file


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    sd = named_mlp(0).state_dict()
    torch.save({"state_dict": sd, "callback": _Boom(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"evil\.ckpt.*weights_only"):
        jg.load(tmp_path / "evil.ckpt", model=named_mlp(1))
    assert not marker.exists()


def _peak(call):
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_tensors_claiming_more_than_their_storage_are_refused_before_any_allocation(tmp_path):
    big = nn.Sequential(OrderedDict(fc1=nn.Linear(3000, 3000, bias=False))).double()  # 72 MB as a model...
    expanded = torch.zeros(1, dtype=torch.float64).expand(3000, 3000)  # ...8 bytes in the file
    torch.save(lightning({"fc1.weight": expanded}), tmp_path / "stride0.ckpt")
    assert (tmp_path / "stride0.ckpt").stat().st_size < 40_000
    err = []

    def run():
        try:
            jg.load(tmp_path / "stride0.ckpt", model=big)
        except ValueError as exc:
            err.append(str(exc))

    assert _peak(run) < 8 << 20
    assert err and re.search(r"stride0\.ckpt.*'model\.fc1\.weight' claims shape \(3000, 3000\).*over a storage of "
                             r"8 bytes", err[0]), err


def test_safetensors_and_npz_sizes_are_checked_before_reading(tmp_path):
    model = named_mlp(0)
    header = {"fc1.weight": {"dtype": "F64", "shape": [4096, 4096], "data_offsets": [0, 4096 * 4096 * 8]}}
    text = json.dumps(header).encode()
    (tmp_path / "lie.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + bytes(64))
    import zipfile

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f8", "fortran_order": False, "shape": (4096, 2048)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("fc1.weight.npy", "w") as m:
            m.write(head.getvalue())
            for _ in range(64):
                m.write(bytes(1 << 20))
    for name, match in (("lie.safetensors", "its tensors need .* bytes, the file has"),
                        ("bomb.npz", "member 'fc1.weight' inflates .* to 64.00 MiB")):
        assert (tmp_path / name).stat().st_size < 1 << 20
        err = []

        def run():
            try:
                jg.load(tmp_path / name, model=model)
            except ValueError as exc:
                err.append(str(exc))

        assert _peak(run) < 8 << 20
        assert err and name in err[0] and re.search(match, err[0]), err


# ---------------------------------------------------------------------- the command: --weights FILE --model pkg.module:factory
MODELS = '''
from collections import OrderedDict
import torch
from torch import nn

def make_net():
    torch.manual_seed(1)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(6, 16), act=nn.Tanh(), fc2=nn.Linear(16, 3))).double()

def make_blocks():
    from jacgrad.io.interop.torch_blocks import Residual
    return nn.Sequential(OrderedDict(fc=nn.Linear(6, 8), res=Residual(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))),
                                     out=nn.Linear(8, 3))).double()

NOT_CALLABLE = 3

def not_a_module():
    return {"fc1.weight": 1}

def raises():
    raise RuntimeError("no GPU here")
'''


def _jacgrad(cwd, *args):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(__import__("pathlib").Path(__file__).resolve().parents[1]), OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", "import sys; from jacgrad.cli.main import main; sys.exit(main())", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def user_code(tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(MODELS)
    (tmp_path / "mypkg" / "broken.py").write_text("import not_installed_anywhere\n")
    return tmp_path


def test_cli_reads_a_lightning_checkpoint_through_the_users_own_module(user_code):
    torch.manual_seed(5)
    trained = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 16), act=nn.Tanh(), fc2=nn.Linear(16, 3))).double()
    torch.save(lightning(trained.state_dict()), user_code / "run.ckpt")
    r = _jacgrad(user_code, "report", "--weights", "run.ckpt", "--model", "mypkg.models:make_net", "--json", "out.json",
                 "--batch", "8")
    assert r.returncode == 0, r.stderr
    rep = json.loads((user_code / "out.json").read_text())["reports"][0]
    W = [trained.fc1.weight.detach().numpy().T, trained.fc2.weight.detach().numpy().T]  # the file's, not the factory's
    assert rep["activations"] == ["tanh", "identity"]
    assert [L["weight_spectral_norm"] for L in rep["layers"]] == pytest.approx([np.linalg.norm(w, 2) for w in W], rel=1e-10)
    r = _jacgrad(user_code, "check", "--weights", "run.ckpt", "--model", "mypkg.models:make_net", "--device", "cpu")
    assert r.returncode == 0 and "passed" in r.stdout, r.stderr


def test_cli_reports_a_module_with_blocks_and_without_weights(user_code):
    r = _jacgrad(user_code, "report", "--model", "mypkg.models:make_blocks", "--batch", "4", "--json", "b.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((user_code / "b.json").read_text())["reports"][0]
    assert [b["kind"] for b in rep["blocks"]] == ["dense", "residual", "dense"] and rep["norms"] == ["layernorm"]


@pytest.mark.parametrize("spec, message", [
    ("mypkg.models", "is not a module and a factory: give it as package.module:factory"),
    ("mypkg.nope:make_net", "no module named 'mypkg.nope' in the current directory"),
    ("mypkg.broken:make_net", "importing mypkg.broken failed (ModuleNotFoundError: No module named 'not_installed_anywhere')"),
    ("mypkg.models:nope", "mypkg.models has no attribute 'nope' (it has: "),
    ("mypkg.models:NOT_CALLABLE", "NOT_CALLABLE is an int, not callable"),
    ("mypkg.models:not_a_module", "not_a_module() returned a dict, not a torch.nn.Module"),
    ("mypkg.models:raises", "raises() raised RuntimeError: no GPU here"),
])
def test_cli_says_what_is_wrong_with_a_model_spec(user_code, spec, message):
    r = _jacgrad(user_code, "report", "--model", spec)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0] and lines[0].startswith("jacgrad report: error: --model"), lines[0]


def test_cli_names_the_keys_that_do_not_match_the_module(user_code):
    torch.save({"model": {"encoder.weight": torch.zeros(2, 2)}}, user_code / "other.pt")
    r = _jacgrad(user_code, "report", "--weights", "other.pt", "--model", "mypkg.models:make_net")
    assert r.returncode == 2, r.stderr
    assert "expected 4 keys ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'), found 1 key ('encoder.weight')" in r.stderr
    torch.save({"fc1.weight": torch.zeros(2, 2)}, user_code / "named.pt")
    r = _jacgrad(user_code, "report", "--weights", "named.pt", "--activation", "relu")
    assert r.returncode == 2 and "--model package.module:factory" in r.stderr, r.stderr
