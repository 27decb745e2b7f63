"""Plain-text reports for the CLI: the loss table and the server info.

Local and remote commands return the same result types (gramstyle.results), so they print
the same thing.
"""

from __future__ import annotations

import re

from gramstyle.options import StyleOptions, default_within
from gramstyle.results import Losses, ServerInfo


def _layer_order(name: str) -> tuple:
    # VGG order: block, then position (conv < relu < pool) -- not alphabetical.
    match = re.fullmatch(r"(conv|relu|pool)(\d+)(?:_(\d+))?", name)
    if not match:
        return (99, 99, 99, name)
    kind, block, index = match.groups()
    return (int(block), int(index or 99), {"conv": 0, "relu": 1, "pool": 2}[kind], name)


def format_losses(losses: Losses, options: StyleOptions) -> str:
    """The loss table: each term unweighted, its weight and weighted value, then per layer.

    Each term's weight is the option ``<term>_weight`` of ``options``.
    """
    rows = [("term", "loss", "weight", "weighted")]
    for term in ("content", "style", "tv"):
        value, weight = getattr(losses, term), getattr(options, f"{term}_weight")
        rows.append((term, f"{value:.6g}", f"{weight:g}", f"{value * weight:.6g}"))
    rows.append(("total", "", "", f"{losses.total:.6g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    for title, layers in (("content layers", losses.content_layers),
                          ("style layers", losses.style_layers)):
        if layers:
            lines.append(f"{title}:")
            width = max(len(n) for n in layers)
            lines += [f"  {name.ljust(width)}  {layers[name]:.6g}"
                      for name in sorted(layers, key=_layer_order)]
    return "\n".join(lines)


def format_server_info(info: ServerInfo, target: str) -> str:
    """GetServerInfo's answer as the `gramstyle info --server` text."""
    lines = [f"server    {target}", f"version   gramstyle {info.version}",
             f"device    {info.device}", f"kernel    {info.backend}"]
    if info.precision:
        lines.append(f"precision auto = {info.precision} on {info.device}")
    for model in info.models:
        default = " (default)" if model.is_default else ""
        lines.append(f"model     {model.arch}/{model.weights}, {model.pooling} pooling, "
                     f"{len(model.layer_names)} layers{default}")
        lines.append(f"layers    {', '.join(model.layer_names)}")
    limits = info.limits
    lines.append(f"limits    {limits['max_pixels']} pixels per input image, output long side "
                 f"<= {limits['max_size']} px, <= {limits['max_iterations']} iterations, "
                 f"{limits['max_message_bytes'] / 2**20:.0f} MiB messages")
    declared = default_within()
    if limits.get("default_size") and (limits["default_size"], limits["default_iterations"]) \
            != (declared["size"], declared["iterations"]):  # older servers send 0: omitted
        lines.append(f"defaults  unset size {limits['default_size']} px, unset iterations "
                     f"{limits['default_iterations']} (the server's limits are below "
                     f"{declared['size']} px / {declared['iterations']})")
    lines.append(f"workers   {info.busy_workers}/{limits['workers']} busy, "
                 f"{info.queued}/{limits['queue_size']} queued")
    if limits.get("memory_budget_bytes"):  # servers older than the memory limits omit them
        lines.append(f"memory    budget {limits['memory_budget_bytes'] / 2**30:.1f} GiB, "
                     f"{limits['max_request_memory_bytes'] / 2**30:.1f} GiB per request, "
                     f"{limits['max_images']} images per request")
    return "\n".join(lines)
