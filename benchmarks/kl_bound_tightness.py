"""How much of the full KL divergence the gate's top-k + rest bound captures, on the demo zoo.

    python benchmarks/kl_bound_tightness.py [--tokens 2048] [--k 1 4 8 16 32 64] [VARIANT ...]

Both models resident (the exact, opt-in mode), the first --tokens scored tokens of each corpus
(profile fast). Prints the exact mean KL, the bound for each k, and their ratio.
"""

import argparse

from quantgate.checkpoints.loading import load_checkpoint, release
from quantgate.divergence import exact_kl, windows_for
from quantgate.evaluation import Evaluator
from quantgate.manifest import load_manifest
from quantgate.zoo import variant_path

parser = argparse.ArgumentParser()
parser.add_argument("variants", nargs="*", default=["gguf-q4_k_m", "gguf-q2_k"])
parser.add_argument("--tokens", type=int, default=2048)
parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
args = parser.parse_args()

ev = Evaluator(manifest=load_manifest("quantgate.toml"), profile="fast", device="cpu")
settings, ref = ev.settings("demo"), ev.model("demo")
reference = load_checkpoint(ref.path, fmt=ref.format, dtype=settings.dtype, device="cpu", what="reference")
for corpus in ref.corpora:
    tokens = ev.tokenized("demo", corpus, settings)
    windows = windows_for(len(tokens.ids), settings.max_length, settings.stride, args.tokens)
    for name in args.variants:
        v = ev.variant("demo", name)
        loaded = load_checkpoint(variant_path(ev.manifest, ref, v), fmt=v.format, dtype=settings.dtype, device="cpu",
                                 what=name, tokenizer_path=ref.path)
        for k in args.k:
            out = exact_kl(reference.backend, loaded.backend, tokens.ids, windows, settings.batch_size, k)
            exact, bound = out["exact"].mean(), out["bound"].mean()
            print(f"{corpus:6s} {name:16s} k={k:3d} exact {exact:.5f} bound {bound:.5f} bound/exact {bound / exact:.3f}",
                  flush=True)
        release(loaded)
