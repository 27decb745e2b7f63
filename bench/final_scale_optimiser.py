"""The final scale of a big output: L-BFGS with a shorter history, or Adam?

    python bench/final_scale_optimiser.py --size 384 --iterations 19

At 4096 x 3072 px L-BFGS's default history of 20 pairs would take 5.6 GiB
(docs/tiling.md, "Optimiser state"); the automatic schedule runs ``iterations / 16`` steps
there (19 for the default 300). This runs that final scale in miniature: a coarse result
(``--iterations`` x 4 steps at half the size, as the schedule's scale before), upsampled,
then ``--iterations`` steps of L-BFGS with histories 20, 7 and 5 (what
:func:`gramstyle.engine.optimise.lbfgs_history` keeps at 2048 x 2048, 4096 x 3072 and
4096 x 4096 px) and of Adam (lr 0.02, the default), on the same start; prints the final
losses as a markdown table with the CPU model and the date.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from machine import cpu_model, load1
from PIL import Image

from gramstyle.engine import StyleTransfer, optimise
from gramstyle.options import StyleOptions

IMAGES = Path("/work/shared/images")
HED = Path("/work/shared/models/vgg16-hed-bsds500.pth")


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--iterations", type=int, default=19)
    args = parser.parse_args(argv)
    engine = StyleTransfer(arch="vgg16", weights=str(HED) if HED.exists() else "random",
                           device="cpu")
    content = Image.open(IMAGES / "content" / "chelsea.png").convert("RGB")
    style = Image.open(IMAGES / "style" / "starry_night.jpg").convert("RGB")
    coarse = engine.stylize([content], [style], StyleOptions(
        size=args.size // 2, iterations=4 * args.iterations, tolerance=0.0)).image
    rows = []
    history = optimise.LBFGS_HISTORY
    try:
        for label, optimizer, pairs in [("L-BFGS, history 20", "lbfgs", 20),
                                        ("L-BFGS, history 7", "lbfgs", 7),
                                        ("L-BFGS, history 5", "lbfgs", 5),
                                        ("Adam", "adam", history)]:
            optimise.LBFGS_HISTORY = pairs  # lbfgs_history() reads it at each run
            started = time.perf_counter()
            result = engine.stylize([content], [style], StyleOptions(
                size=args.size, iterations=args.iterations, tolerance=0.0,
                optimizer=optimizer, init="image"), init_image=coarse)
            rows.append((label, result.losses.total, time.perf_counter() - started))
    finally:
        optimise.LBFGS_HISTORY = history
    print(f"CPU: {cpu_model()} (load {load1():.1f}), {time.strftime('%Y-%m-%d')}; "
          f"{args.size} px, {args.iterations} steps from a {args.size // 2} px result "
          f"upsampled\n\n| optimiser | final total loss | seconds |\n|---|---|---|")
    for label, loss, seconds in rows:
        print(f"| {label} | {loss:.4g} | {seconds:.0f} |")
    return rows


if __name__ == "__main__":
    main()
