"""Terminal tables for a plan (the dict of :func:`hpcllm.plan.planner.make_plan`)."""
from __future__ import annotations

import shlex


def si(x: float | None, unit: str = "") -> str:
    """70e9 -> '70.0B', 1.4e12 -> '1.40T' (counts), with an optional unit."""
    if x is None:
        return "-"
    for div, suf in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            v = x / div
            return f"{v:.3g}{suf}{unit}"
    return f"{x:.3g}{unit}"


def gib(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    return f"{n / 1024**2:.1f} MiB"


def seconds(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 3600 * 48:
        return f"{t / 86400:.1f} d"
    if t >= 3600:
        return f"{t / 3600:.1f} h"
    if t >= 1:
        return f"{t:.2f} s"
    return f"{t * 1e3:.1f} ms"


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    cells = [[str(c) for c in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)
    fmt = lambda r: "  ".join(c.ljust(w[i]) if align[i] == "l" else c.rjust(w[i]) for i, c in enumerate(r))  # noqa
    return "\n".join([fmt(headers), "  ".join("-" * x for x in w)] + [fmt(r) for r in cells])


def layout_rows(layouts: list[dict]) -> list[list]:
    rows = []
    for L in layouts:
        m, t = L["memory"], L["time"]
        rows.append([L.get("tensor_parallel", 1), L["pipeline_stages"], L["data_parallel"], L.get("zero_stage", 0),
                     L["micro_batch"], L["microbatches"],
                     "yes" if L["recompute"] else "no", gib(m["total"]), "yes" if L["fits"] else "NO",
                     seconds(t["total"]), f"{100 * t['bubble'] / t['total']:.0f}%",
                     seconds(t["allreduce"]), seconds(t.get("tensor_parallel", 0.0)), si(L["tokens_per_s"]),
                     f"{100 * L['mfu']:.0f}%"])
    return rows


def format_plan(p: dict) -> str:
    out = []
    b = p["budget"]
    if b:
        out.append(f"budget: {b['gpu_hours']:g} {b['device']} hours at {100 * b['mfu']:.0f}% of "
                   f"{si(b['peak_flops'], 'FLOP/s')} = {p['compute']:.3g} FLOPs")
    out.append("scaling (Hoffmann et al. 2022; C = 6ND, L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28)")
    rows = []
    for m, q in p["methods"].items():
        label = m + (" *" if m == p["method"] else "")
        rows.append([label, si(q["params"]), si(q["tokens"]), f"{q['tokens'] / q['params']:.1f}",
                     f"{q['compute']:.3g}", f"{q['loss']:.3f}"])
    out.append(table(["method", "params", "tokens", "tokens/param", "FLOPs", "loss"], rows))
    out.append("  * used below; chinchilla = approaches 1-2 (~%g tokens/param), parametric = closed-form "
               "minimum of the fitted L(N, D)" % p["tokens_per_param"])
    pr = p["preset"]
    c = pr["config"]
    out.append("")
    budget = f"; the whole budget would train it on {si(pr['budget_tokens'])}" if pr["budget_tokens"] else ""
    out.append(f"model: preset {pr['name']} ({c['n_layer']} layers, {c['n_head']} heads, d_model {c['d_model']}, "
               f"seq {c['seq_len']}, vocab {c['vocab_size']}"
               + (f"; {c['moe_experts']} experts top-{c['moe_top_k']} every {c['moe_every']} blocks, "
                  f"{si(pr['total_params'])} params in all" if c.get("moe_experts") else "")
               + f"): {si(pr['params'])} {'active ' if c.get('moe_experts') else ''}params on {si(pr['tokens'])} "
               f"tokens ({pr['compute']:.3g} FLOPs, predicted loss {pr['loss']:.3f}{budget})")
    d = p["data"]
    if d:
        verdict = "enough" if d["enough"] else f"SHORT: {d['epochs']:.2f} epochs over it"
        out.append(f"data: {d['path']} holds {si(d['train_tokens'])} train tokens; needs {si(d['needed_tokens'])}: "
                   f"{verdict}")
    dev, cl = p["device"], p["cluster"]
    out.append("")
    out.append(f"layouts on {cl['nodes']} node(s) x {cl['devices_per_node']} {dev['name']} "
               f"({gib(dev['capacity_bytes'])} each), {p['precision']}, global batch {p['global_batch']} sequences "
               f"({si(p['global_batch_tokens'])} tokens), MFU {100 * p['mfu']:.0f}%: "
               f"{p['layouts_fitting']} of {p['layouts_considered']} fit")
    out.append(table(["T", "P", "D", "ZeRO", "micro", "accum", "recomp", "memory", "fits", "step", "bubble",
                      "dp comm", "tp comm", "tokens/s", "MFU"], layout_rows(p["layouts"]),
                     "r" * 6 + "l" + "r" + "l" + "r" * 6))
    best = p["recommended"]
    out.append("")
    if best is None:
        need = min(L["memory"]["total"] for L in p["layouts"])
        out.append(f"no layout fits: the smallest needs {gib(need)} per device; add nodes, use recomputation "
                   "or a smaller model")
        return "\n".join(out)
    m = best["memory"]
    zs = best.get("zero_stage", 0)
    tp = best.get("tensor_parallel", 1)
    out.append(f"recommended: {f'T={tp} ' if tp > 1 else ''}P={best['pipeline_stages']} D={best['data_parallel']}"
               f"{f' ZeRO-{zs}' if zs else ''} "
               f"micro-batch {best['micro_batch']} "
               f"x {best['microbatches']}{' with recomputation' if best['recompute'] else ''}: "
               f"{seconds(best['time']['total'])}/step, {si(best['tokens_per_s'])} tokens/s, "
               f"{p['steps']} steps = {seconds(p['train_hours'] * 3600)}")
    out.append(f"memory of stage {m['stage']} ({m['layers']} layers, {si(m['params_count'])} params), peak in "
               f"the {m['phase']} phase:")
    rows = [[k, gib(v)] for k, v in [("parameters", m["params"]), ("gradients", m["grads"]),
                                     ("optimizer states", m["optimizer"]),
                                     ("16-bit weight copies", m["weight_copies"]),
                                     (f"activations x{m['inflight']}", m["activations"]),
                                     ("temporaries", m["working"]), ("ZeRO buffers", m.get("zero_buffers", 0)),
                                     ("communication buffers", m["comm_buffers"]),
                                     ("framework overhead", m["overhead"]),
                                     ("allocator slack", m["allocator_slack"]), ("total", m["total"])]]
    out.append(table(["", "bytes"], rows))
    if p["slurm_command"]:
        out.append("")
        out.append("run it: " + shlex.join(p["slurm_command"]))
    return "\n".join(out)
