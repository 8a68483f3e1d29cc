"""MoReg with its window opened at step 0 (the code default opens it at step 4 of 30), against plain
AdaCache, on the bench prompts. python benchmarks/experiments/moreg_window.py (about 1 minute)."""
from adacache_lab.reference.bench import Point, run_bench, claims
from adacache_lab.reference.demo import REFERENCE_MOREG_SCALE
from adacache_fx.policies.adacache import AdaCache, MoReg
from adacache_fx.policies.static import NoCache
m = MoReg(scale=REFERENCE_MOREG_SCALE, window=(0.0, 0.9))
pts = [Point("no cache", "no cache", lambda n: NoCache())]
pts += [Point("AdaCache", f"AdaCache x{s:g}", lambda n, s=s: AdaCache.fast(n).with_threshold_scale(s)) for s in (0.15, 0.2, 0.3, 0.5)]
pts += [Point("AdaCache+MoReg", f"MoReg-w0 x{s:g}", lambda n, s=s: AdaCache.fast(n, moreg=m).with_threshold_scale(s)) for s in (1, 10, 100, 1000)]
rec = run_bench("/tmp/moreg_window", points=pts, progress=False)
for r in rec["rows"]:
    print(r["label"], round(r["compute_fraction"], 3), round(r["psnr"], 2))
import json; print(json.dumps(rec["claims"]["c"], indent=0))
