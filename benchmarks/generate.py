"""Generation benchmark: tokens/s and peak memory of hpcllm's decoding paths against Hugging Face
``transformers`` on the same weights, in one run.

    .venv/bin/python benchmarks/generate.py [--quick] [--model 124M] [--batches 1,8]
                                            [--new-tokens 256] [--prompt-tokens 128] [--repeats 2]
                                            [--full-no-cache]

The model is a preset with random weights (default ``124M``: 12 x 768, GPT-2's vocabulary
50257 padded to 50304, tied head; ``--quick``: ``small``, 4 x 256, with a 128-token prompt
in a 384-token window), written once as a checkpoint and exported through the library
(``hpcllm export``'s fp32 and ``--int8`` files, ``export --format hf`` for the peer). The
tokenizer is the byte tokenizer, so greedy decoding picks among ids 0-256 in every
implementation (``transformers`` reads ``suppress_tokens`` from the exported
generation_config.json) while every step computes the whole 50304-row head. Each row: greedy,
``--new-tokens`` new tokens after a ``--prompt-tokens`` prompt (random ids, batch 1 or all
prompts of a batch the same length, so no padding), on the CPU with all its cores (one
process at a time), end-of-document not stopping anything.

- **(a) no cache**: ``hpcllm generate --no-kv-cache``: every token re-encodes its whole
  context. Its time over 256 tokens is the sum of one forward pass per context length
  128..383; by default that sum is integrated (trapezoid) from passes measured at 5 lengths
  (the full run takes minutes at 124M; ``--full-no-cache`` runs it, ``--quick`` always does
  and also prints the estimate beside it). At batch > 1 the library decodes uncached prompts
  one by one, so the batch's time is the batch-1 time times the batch size.
- **(b) KV cache fp32**: ``generate_ids`` (batch 1) / ``generate_batch`` (batch 8), the model
  and cache in fp32.
- **(c) KV cache bf16**: the same with the model (and so the cache) in bf16, only if a short
  matmul probe (the MLP's matrix at the batch's row count) shows bf16 faster than fp32 on
  this CPU; else the row says "skipped: bf16 matmul x.x of fp32".
- **(d) KV cache + INT8**: the ``export --int8`` file (loaded without building the fp32
  model): int8 weights, fp32 activations (:mod:`hpcllm.infer.quantize`).
- **transformers**: ``AutoModelForCausalLM.from_pretrained`` of the ``export --format hf``
  directory (GPT2LMHeadModel, fp32), ``generate(do_sample=False, use_cache=True,
  min_new_tokens=max_new_tokens)``: the peer every ratio is against, with (b).

tokens/s = new tokens of the whole batch / wall time of the generate call (prompt encoding
included). Memory: each configuration runs in a fresh process; ``peak MiB`` = the process's
peak resident set during the generate call (Linux ``VmHWM`` after resetting it with
``/proc/self/clear_refs`` once the model is loaded; no tracemalloc), i.e. weights + runtime +
cache + activations; ``gen MiB`` = that peak minus the resident size just before the call
(what decoding itself needs: cache, logits, activations). Each configuration runs
``--repeats`` times (rounds interleaved) and keeps its fastest round.

Prints a table, writes benchmarks/results/generate.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "generate.json"
MiB = 1024 ** 2
CONFIGS = ["nocache", "kv_fp32", "kv_bf16", "kv_int8", "transformers"]
LABELS = {"nocache": "(a) no cache", "kv_fp32": "(b) KV cache fp32", "kv_bf16": "(c) KV cache bf16",
          "kv_int8": "(d) KV cache + INT8", "transformers": "transformers (cache)"}


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    import ctypes
    import gc

    gc.collect()
    # hand the heap's free pages back first (glibc keeps what the warm-up freed), so the peak
    # counts what the measured call allocates
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


# --------------------------------------------------------------------------- worker


def _prompts(batch: int, n: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    # printable bytes: a plausible byte-level prompt; the same ids for every implementation
    return torch.randint(32, 127, (batch, n), generator=g).tolist()


def _bf16_probe(d_model: int, rows: int) -> float:
    """bf16 speed over fp32 for (rows x d) @ (d x 4d), the MLP's matmul at decode time."""
    import torch
    import torch.nn.functional as F

    x, w = torch.randn(rows, d_model), torch.randn(4 * d_model, d_model)
    xb, wb = x.bfloat16(), w.bfloat16()

    def best(f):
        f()
        out = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(20):
                f()
            out.append(time.perf_counter() - t)
        return min(out)

    best(lambda: F.linear(xb, wb))  # first bf16 call: oneDNN picks its kernel
    return best(lambda: F.linear(x, w)) / best(lambda: F.linear(xb, wb))


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    kind, batch, new, plen = spec["config"], spec["batch"], spec["new_tokens"], spec["prompt_tokens"]
    prompts = _prompts(batch, plen)
    out = {"config": kind, "batch": batch}
    if kind == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32).eval()
        ids = torch.tensor(prompts)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                  attention_mask=torch.ones_like(ids), pad_token_id=256)

        def run(n=new):
            with torch.no_grad():
                return model.generate(ids, **{**kw, "max_new_tokens": n, "min_new_tokens": n})[:, plen:].tolist()
        out["transformers"] = transformers.__version__
    else:
        from hpcllm.infer.generate import SampleConfig, generate_batch, generate_ids, load_model

        lm = load_model(spec["int8_file"] if kind == "kv_int8" else spec["file"])
        model, seq_len = lm.model, lm.seq_len
        if kind == "kv_bf16":
            model.to(torch.bfloat16)
        vocab = lm.tokenizer.vocab_size

        def run(n=new):
            s = SampleConfig(max_new_tokens=n, temperature=0, stop_at_eod=False, kv_cache=kind != "nocache")
            if batch == 1:
                return [generate_ids(model, prompts[0], s, seq_len=seq_len, vocab_size=vocab, eod_id=256)]
            return generate_batch(model, prompts, s, seq_len=seq_len, vocab_size=vocab, eod_id=256, batch_size=batch)

        if kind == "nocache" and not spec["full_nocache"]:
            return {**out, **_nocache_estimate(model, prompts[0], new, spec)}
    run(4)  # warm-up: first-call allocations and kernel selection are not decoding
    _reset_peak()
    rss0 = _status_kib("VmRSS")
    t0 = time.perf_counter()
    tokens = run()
    dt = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    out.update(seconds=dt, tokens=sum(len(t) for t in tokens), peak_mib=peak / 1024, gen_mib=(peak - rss0) / 1024,
               first_row=tokens[0][:64])
    if kind == "nocache" and batch > 1:
        raise RuntimeError("the no-cache path runs batch 1 only (batches are decoded prompt by prompt)")
    if kind == "nocache" and spec["quick"]:
        out["estimate_seconds"] = _nocache_estimate(model, prompts[0], new, spec)["seconds"]
    return out


def _nocache_estimate(model, prompt, new, spec) -> dict:
    """Seconds for ``new`` uncached tokens: one forward pass per context length, integrated
    from passes timed at 5 lengths (each the fastest of 2)."""
    import numpy as np
    import torch

    from hpcllm.infer.generate import last_logits

    lo, hi = len(prompt), len(prompt) + new - 1
    lengths = sorted({int(x) for x in np.linspace(lo, hi, 5)})
    base = torch.tensor([(prompt * (hi // len(prompt) + 1))[:hi]])
    times = []
    with torch.no_grad():
        last_logits(model, base[:, :lo])  # warm-up
        _reset_peak()
        rss0 = _status_kib("VmRSS")
        for L in lengths:
            best = float("inf")
            for _ in range(2):
                t = time.perf_counter()
                int(last_logits(model, base[:, :L])[0].argmax())  # what the no-cache path does per token
                best = min(best, time.perf_counter() - t)
            times.append(best)
        peak = _status_kib("VmHWM")
    per_len = np.interp(np.arange(lo, hi + 1), lengths, times)
    return {"seconds": float(per_len.sum()), "tokens": new, "estimated": True, "forward_s": dict(zip(lengths, times)),
            "peak_mib": peak / 1024, "gen_mib": (peak - rss0) / 1024}


def run_worker(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(spec["threads"]))
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"worker {spec['config']} batch {spec['batch']} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- setup


def make_model_files(where: Path, name: str, seq_len: int) -> dict:
    """A random-weight checkpoint of preset ``name`` and its fp32, INT8 and HF exports."""
    import torch

    from hpcllm.data.tokenizer import ByteTokenizer
    from hpcllm.infer.generate import save_export
    from hpcllm.interop.hf_export import export_hf
    from hpcllm.model.gpt import GPT, preset

    cfg = preset(name, seq_len=seq_len, vocab_size=50257)
    ck = where / "run" / "checkpoints" / "step-00000000"
    ck.mkdir(parents=True)
    torch.save(GPT(cfg, init_seed=0).state_dict(), ck / "model.pt")
    (ck / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    (ck / "trainer.json").write_text(json.dumps({"step": 0, "tokenizer_sha256": ByteTokenizer.sha256}))
    files = {"file": str(save_export(ck, where / "model.pt")),
             "int8_file": str(save_export(ck, where / "model-int8.pt", int8=True)),
             "hf_dir": str(where / "hf")}
    export_hf(ck, files["hf_dir"], dtype="fp32")
    files["bytes"] = {k: os.path.getsize(files[k]) for k in ("file", "int8_file")}
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the small preset (4 x 256), full no-cache runs")
    p.add_argument("--model", default=None, help="preset [default: 124M; --quick: small]")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--full-no-cache", action="store_true", help="run (a) in full instead of integrating 5 passes")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    name = args.model or ("small" if args.quick else "124M")
    batches = [int(b) for b in args.batches.split(",")]
    seq_len = args.prompt_tokens + args.new_tokens
    import torch

    from hpcllm.model.gpt import preset

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    d_model = preset(name).d_model
    probe = {b: _bf16_probe(d_model, b) for b in batches}
    print(f"bf16 matmul speed vs fp32 (rows x {d_model} @ {d_model} x {4 * d_model}): "
          + ", ".join(f"{b} rows: {v:.2f}x" for b, v in probe.items()), flush=True)
    t_start = time.time()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="hpcllm-genbench-") as tmp:
        files = make_model_files(Path(tmp), name, seq_len)
        print(f"model {name} (seq_len {seq_len}): fp32 export {files['bytes']['file'] / MiB:.1f} MiB, "
              f"INT8 export {files['bytes']['int8_file'] / MiB:.1f} MiB", flush=True)
        for rnd in range(args.repeats):
            for b in batches:
                for kind in CONFIGS:
                    if kind == "kv_bf16" and probe[b] <= 1.0:
                        results[(kind, b)] = {"skipped": f"bf16 matmul {probe[b]:.2f}x of fp32"}
                        continue
                    if kind == "nocache" and rnd > 0 and not (args.quick or args.full_no_cache):
                        continue  # the estimate already keeps the fastest of 2 passes per length
                    spec = {"config": kind, "batch": 1 if kind == "nocache" else b, "new_tokens": args.new_tokens,
                            "prompt_tokens": args.prompt_tokens, "threads": args.threads, "quick": args.quick,
                            "full_nocache": args.full_no_cache or args.quick, **files}
                    if kind == "nocache" and b > 1:
                        one = results.get((kind, 1))
                        if one is None or "seconds" not in one:
                            continue
                        # uncached prompts are decoded one after another: b times batch 1
                        results[(kind, b)] = {**one, "seconds": one["seconds"] * b, "tokens": one["tokens"] * b,
                                              "batch": b, "from_batch_1": True}
                        if "estimate_seconds" in one:
                            results[(kind, b)]["estimate_seconds"] = one["estimate_seconds"] * b
                        continue
                    r = run_worker(spec)
                    r["tokens_per_s"] = r["tokens"] / r["seconds"]
                    old = results.get((kind, b))
                    if old is None or "seconds" not in old or r["seconds"] < old["seconds"]:
                        results[(kind, b)] = r
                    print(f"  round {rnd + 1} batch {b} {LABELS[kind]}: {r['tokens_per_s']:.1f} tokens/s "
                          f"({r['seconds']:.1f} s{', estimated' if r.get('estimated') else ''}), "
                          f"peak {r['peak_mib']:.0f} MiB", flush=True)
    for (kind, b), r in results.items():
        if "seconds" in r:
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
    table = []
    for b in batches:
        ref, fp32 = results.get(("transformers", b), {}), results.get(("kv_fp32", b), {})
        for kind in CONFIGS:
            r = results.get((kind, b), {})
            row = {"batch": b, "config": LABELS[kind]}
            if "skipped" in r:
                row["skipped"] = r["skipped"]
            elif "tokens_per_s" in r:
                row.update(tokens_per_s=r["tokens_per_s"], peak_mib=r["peak_mib"], gen_mib=r["gen_mib"],
                           estimated=bool(r.get("estimated")),
                           vs_transformers=r["tokens_per_s"] / ref["tokens_per_s"] if "tokens_per_s" in ref else None,
                           vs_kv_fp32=r["tokens_per_s"] / fp32["tokens_per_s"] if "tokens_per_s" in fp32 else None)
                if "estimate_seconds" in r:
                    row["estimate_vs_measured"] = r["estimate_seconds"] / r["seconds"]
            table.append(row)
    def common(x, y, b):  # how many leading tokens of row 0 two configurations share
        rx, ry = results.get((x, b), {}).get("first_row"), results.get((y, b), {}).get("first_row")
        if rx is None or ry is None:
            return None
        n = 0
        while n < min(len(rx), len(ry)) and rx[n] == ry[n]:
            n += 1
        return n

    same = {b: common("kv_fp32", "transformers", b) for b in batches}
    int8_same = {b: common("kv_fp32", "kv_int8", b) for b in batches}
    print()
    print(f"{'batch':>5}  {'configuration':<22} {'tokens/s':>9} {'vs (b)':>7} {'vs HF':>7} {'peak MiB':>9} {'gen MiB':>8}")
    for row in table:
        if "skipped" in row:
            print(f"{row['batch']:>5}  {row['config']:<22} skipped: {row['skipped']}")
            continue
        if "tokens_per_s" not in row:
            continue
        est = "*" if row["estimated"] else " "
        print(f"{row['batch']:>5}  {row['config']:<22} {row['tokens_per_s']:>8.1f}{est} {row['vs_kv_fp32']:>6.2f}x "
              f"{row['vs_transformers']:>6.2f}x {row['peak_mib']:>9.0f} {row['gen_mib']:>8.0f}")
    print("* estimated: one forward pass per context length, integrated from 5 measured lengths")
    for row in table:
        if "estimate_vs_measured" in row:
            print(f"  (batch {row['batch']}: the estimate over the measured no-cache time: "
                  f"{row['estimate_vs_measured']:.2f})")
    print("leading greedy tokens (of the first 64, row 0) that (b) shares with transformers: "
          + ", ".join(f"batch {b}: {v}" for b, v in same.items())
          + "; (d) with (b): " + ", ".join(f"batch {b}: {v}" for b, v in int8_same.items()))
    out = {"machine": {**_machine(), "load_avg_1m_start": load_start}, "model": name, "seq_len": seq_len, "new_tokens": args.new_tokens,
           "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "threads": args.threads,
           "bf16_probe": probe, "export_bytes": files["bytes"], "greedy_prefix_shared_with_transformers": same,
           "int8_greedy_prefix_shared_with_fp32": int8_same,
           "table": table, "runs": [{**r, "key": list(k)} for k, r in results.items()],
           "wall_s": time.time() - t_start, "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


def _machine() -> dict:
    import platform

    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return info


if __name__ == "__main__":
    sys.exit(main())
