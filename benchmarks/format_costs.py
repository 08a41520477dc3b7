"""Load time, scoring time and peak memory per format, each variant in a fresh process.

    python benchmarks/format_costs.py [VARIANT ...]   (profile fast, corpus code; variants built first)

Peak memory is the process's maximum resident set (ru_maxrss), imports included; the line
"imports only" gives that floor.
"""

import subprocess
import sys

DEFAULT = ["fp16", "gptq-w4g128", "gptq-w8g128", "awq-w4g128", "autogptq-w4g128", "gguf-q4_k_m",
           "gguf-q4_k_m-llamacpp", "bnb-int8", "bnb-nf4", "ct-w4a16-g128", "ct-w8a8-int8", "ct-fp8-dynamic"]

CHILD = """
import json, resource, sys, time
from quantgate.manifest import load_manifest
from quantgate.evaluation import Evaluator
ev = Evaluator(manifest=load_manifest("quantgate.toml"), profile="fast", device="cpu")
ev.tokenized("demo", "code", ev.settings("demo"))
variant = sys.argv[1]
floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if variant != "-":
    m = ev.measure("demo", variant, "code")
    out = {"variant": variant, "load_s": m.description.get("load_seconds"), "score_s": round(m.seconds, 2),
           "tokens": int(m.scores.n), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "backend": m.description.get("backend"), "kernels": m.description.get("kernels")}
else:
    out = {"variant": "imports only", "peak_rss_mb": round(floor / 1024)}
print("RESULT " + json.dumps(out))
"""

for variant in ["-", *(sys.argv[1:] or DEFAULT)]:
    run = subprocess.run([sys.executable, "-c", CHILD, variant], capture_output=True, text=True)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    print(line[7:] if line else f"{variant}: failed\n{run.stderr[-2000:]}", flush=True)
