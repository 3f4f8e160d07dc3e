"""``cxr-bench report``: one markdown table from several latency result files, with ratios to PyTorch and,
on CPU hosts, the share of the host's fp32 matrix rate each backend uses."""

from __future__ import annotations

import json
from pathlib import Path

from cxr.runtime.errors import CxrError


def markdown_report(paths: list[Path]) -> str:
    rows = [
        "| machine | backend | b1 p50 ms | b1 p99 ms | vs PyTorch (b1 p50) | best img/s "
        "| of host fp32 rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            backends = data["backends"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CxrError(f"{path}: not a cxr-bench latency result ({exc})") from None
        machine = data["environment"].get("gpu") or data["environment"].get("cpu")
        base = backends.get("pytorch-fp32", {}).get("b1_ms", {}).get("p50")
        for name, r in backends.items():
            ratio = f"{base / r['b1_ms']['p50']:.2f}x" if base else "n/a"
            best = max(r["throughput_img_s"].values())
            share = r.get("share_of_host_fp32_rate")
            rows.append(
                f"| {machine} | {name} | {r['b1_ms']['p50']:.2f} | {r['b1_ms']['p99']:.2f} | {ratio} | "
                f"{best:.1f} | {'n/a' if share is None else f'{share:.0%}'} |"
            )
    return "\n".join(rows)
