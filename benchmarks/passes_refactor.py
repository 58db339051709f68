"""Interleaved: MLP.loss_and_grads with main's _passes vs this checkout's (8x1024, B=256, float32).
Run from the repository root: `python benchmarks/passes_refactor.py [rounds]` (needs git and a `main` branch)."""
import subprocess, sys, time, types, importlib.util
import numpy as np, jacgrad as jg
from jacgrad import mlp as M
src = subprocess.run(["git", "show", "main:jacgrad/_passes.py"], capture_output=True, text=True, check=True).stdout
old = types.ModuleType("jacgrad._passes_old"); old.__package__ = "jacgrad"; sys.modules[old.__name__] = old
exec(compile(src, "main:_passes.py", "exec"), old.__dict__)
new = (M.forward_into, M.backward_into)
net = jg.MLP.init([1024] * 9, activation="tanh", seed=0, dtype="float32")
rng = np.random.default_rng(0)
x = rng.standard_normal((256, 1024)).astype(np.float32); t = rng.standard_normal((256, 1024)).astype(np.float32)
def run(fns, reps=5):
    M.forward_into, M.backward_into = fns
    net.loss_and_grads(x, t)
    best = 1e9
    for _ in range(reps):
        s = time.perf_counter(); net.loss_and_grads(x, t); best = min(best, time.perf_counter() - s)
    return best
res = {"main": [], "branch": []}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 6):
    for name, fns in (("main", (old.forward_into, old.backward_into)), ("branch", new)) if r % 2 == 0 else (("branch", new), ("main", (old.forward_into, old.backward_into))):
        res[name].append(run(fns))
for k, v in res.items():
    print(f"{k:7s} best {min(v)*1e3:7.2f} ms  median {np.median(v)*1e3:7.2f} ms  rounds {len(v)}")
print(f"branch/main (best): {min(res['branch'])/min(res['main']):.3f}  (median): {np.median(res['branch'])/np.median(res['main']):.3f}")
