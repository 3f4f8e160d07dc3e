"""Replay stopping rules on the seed-1 plain/paired 400-row tapes (independent of the seed-0 reference)."""

import json
import sys
from pathlib import Path

import numpy as np
from cxr.bench.lime_fidelity import compare_weights
from cxr.runtime.explain import lime_fit
from cxr.runtime.settle import Settling

from research.lime.settle_sweep import read_tape, tape_name, tape_reference

tapes = Path(sys.argv[1])
folder = Path(sys.argv[4])
images = Path(sys.argv[2]).read_text().split()
rules = [
    (0.15, 3, 0.0, 150, 50),
    (0.25, 3, 0.0, 150, 50),
    (0.15, 2, 0.0, 150, 50),
    (0.25, 2, 0.0, 150, 50),
    (0.15, 3, 0.9, 150, 50),
    (0.3, 2, 0.0, 150, 50),
    (0.5, 2, 0.0, 150, 50),
    (0.15, 3, 0.0, 128, 32),
    (0.15, 2, 0.0, 128, 32),
    (0.15, 2, 0.0, 100, 50),
    (0.15, 4, 0.0, 128, 32),
]


def stop_at(rows, probs, label, rule, paired, cap):
    s = Settling(
        top_k=8, seed=0, spread_bound=rule[0], stable_fits=rule[1], min_agreement=rule[2], paired=paired
    )
    done, next_check = 0, rule[3]
    while done < cap:
        done = min(done + 32, cap)
        if done >= next_check:
            if s.check(lime_fit(rows[:done], probs[:done], label, 0)[0], rows[:done], probs[:done], label):
                return done
            next_check += rule[4]
    return cap


out = {}
for sampler in ("plain", "paired"):
    for rule in rules:
        res = []
        for image in images:
            t = np.load(folder / f"{sampler}-{tape_name(image)}")
            ref = tape_reference(read_tape(tapes / tape_name(image)))
            rows, probs, label = t["rows"], t["probs"], int(t["label"])
            n = stop_at(rows, probs, label, rule, sampler == "paired", len(rows))
            res.append((n, compare_weights(ref, lime_fit(rows[:n], probs[:n], label, 0)[0])["top5_overlap"]))
        a = np.array(res)
        out[f"{sampler} {rule}"] = {
            "samples": float(a[:, 0].mean()),
            "overlap": float(a[:, 1].mean()),
            "capped": int((a[:, 0] == 400).sum()),
        }
        print(sampler, rule, out[f"{sampler} {rule}"], flush=True)
Path(sys.argv[3]).write_text(json.dumps(out, indent=1))
