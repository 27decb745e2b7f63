"""The memory estimate (gramstyle.server.memory) against the peak RSS measured in a fresh
process, for Stylize and ComputeLosses shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import can_reset_peak_rss

ESTIMATE_SCRIPT = r"""
import io, json, re, sys
import numpy as np
from PIL import Image
from gramstyle.images import probe_image
from gramstyle.options import StyleOptions
from gramstyle.engine.transfer import StyleTransfer
from gramstyle.server.memory import estimate_losses, estimate_stylize

def status(key):
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+)", text).group(1)) * 1024

def png(width, height, seed):
    a = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO(); Image.fromarray(a).save(buf, "PNG"); return buf.getvalue()

engine = StyleTransfer(arch="vgg19", weights="random", device="cpu")
warm = png(32, 24, 0)
engine.stylize([warm], [warm], StyleOptions(size=32, iterations=2))
results = []
for case in json.loads(sys.argv[1]):
    contents = [png(*case["content"], 1)]
    styles = [png(*size, 2 + i) for i, size in enumerate(case["styles"])]
    options = engine.validate(StyleOptions(**case["options"]))
    encoded = sum(map(len, contents + styles))
    heads = lambda images: [probe_image(i) for i in images]
    if "candidate" in case:
        candidate = png(*case["candidate"], 9)
        estimate = estimate_losses(engine.extractor, options, probe_image(candidate),
                                   heads(contents), heads(styles), True,
                                   encoded + len(candidate))
    else:
        estimate = estimate_stylize(engine.extractor, options, heads(contents),
                                    heads(styles), None, encoded)
    engine.target_cache.clear()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    before = status("VmRSS")
    if "candidate" in case:
        engine.compute_losses(candidate, contents, styles, options, gradient=True)
    else:
        engine.stylize(contents, styles, options)
    results.append({"case": case, "estimate": estimate.total,
                    "peak": status("VmHWM") - before})
print(json.dumps(results))
"""


@pytest.mark.skipif(not can_reset_peak_rss(), reason="needs Linux /proc peak-RSS reset")
def test_memory_estimate_is_not_below_measured_peak_rss():
    cases = [
        {"content": [128, 96], "styles": [[96, 96]],
         "options": {"size": 128, "iterations": 8, "tolerance": 0.0, "precision": "fp32"}},
        {"content": [256, 192], "styles": [[128, 128], [160, 120]],
         "options": {"size": 160, "iterations": 3, "tolerance": 0.0, "scales": 2}},
        {"content": [64, 48], "styles": [[384, 384]] * 2,
         "options": {"size": 48, "style_scale": 8.0, "iterations": 2,
                     "style_layers": ["relu1_1", "relu2_1"]}},
        {"content": [96, 96], "styles": [[96, 96]], "candidate": [256, 160],
         "options": {"precision": "fp32"}},
    ]
    proc = subprocess.run([sys.executable, "-c", ESTIMATE_SCRIPT, json.dumps(cases)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in json.loads(proc.stdout.splitlines()[-1]):
        estimate, peak = row["estimate"], row["peak"]
        print(f"{row['case']}: estimate {estimate / 2**20:.0f} MiB, "
              f"peak {peak / 2**20:.0f} MiB")
        assert estimate >= peak, row
        # ... and not so far above it that admission would be needlessly strict.
        assert estimate <= 4 * peak + 128 * 2**20, row
