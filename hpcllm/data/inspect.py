"""`hpcllm inspect`: a dataset's totals, shards, tokenizer, splits and dropped counts."""
from __future__ import annotations

import os

from hpcllm.data.shards import SPLITS, read_manifest, read_shard, verify_shard


def inspect_dataset(data_dir: str, verify: bool = False, show: int = 0, split: str = "train") -> dict:
    """A JSON-able report; ``report["text"]`` is the human-readable form."""
    m = read_manifest(data_dir)
    tok = m["tokenizer"]
    lines = [f"dataset   {os.path.abspath(data_dir)}  (format {m['format']} v{m['version']}, created {m.get('created', '?')})",
             f"tokenizer {tok['type']}, vocab {tok['vocab_size']}, eod {tok['eod_id']}, sha256 {tok['sha256'][:16]}"
             + (f", file {tok['file']}" if tok.get("file") else ""),
             "corpora   " + ", ".join(f"{c['name']} (weight {c['weight']:g})" for c in m["corpora"])]
    total_tokens = sum(m["splits"][s]["tokens"] for s in SPLITS)
    for s in SPLITS:
        sp = m["splits"][s]
        lines.append(f"{s:<9} {sp['tokens']:>14,} tokens {sp['documents']:>10,} docs {len(sp['shards']):>5} shards")
    lines.append(f"total     {total_tokens:>14,} tokens")
    dropped = m.get("dropped", {})
    lines.append("dropped   " + (", ".join(f"{k} {v:,}" for k, v in dropped.items()) if dropped else "none"))
    lines.append("shards")
    for s in SPLITS:
        for e in m["splits"][s]["shards"]:
            lines.append(f"  {e['path']:<24} {e['tokens']:>12,} tokens {e['documents']:>8,} docs  "
                         f"{e.get('corpus', '')}  {e['sha256'][:12]}")
    problems = []
    if verify:
        for s in SPLITS:
            for e in m["splits"][s]["shards"]:
                problems += verify_shard(data_dir, e, tok["vocab_size"], tok["eod_id"])
        lines.append(f"verify    {'OK' if not problems else f'{len(problems)} problem(s)'}")
        lines += [f"  {p}" for p in problems]
    docs = []
    if show:
        from hpcllm.data.tokenizer import tokenizer_from_dataset

        t = tokenizer_from_dataset(data_dir)
        for e in m["splits"][split]["shards"]:
            tokens, index = read_shard(os.path.join(data_dir, e["path"]))
            ends = list(index[1:]) + [len(tokens)]
            for a, b in zip(index, ends):
                docs.append(t.decode(tokens[a:b - 1]))
                if len(docs) >= show:
                    break
            if len(docs) >= show:
                break
        for i, d in enumerate(docs):
            lines.append(f"--- {split} document {i} ({len(d)} chars)")
            lines.append(d)
    report = {"data_dir": data_dir, "manifest": m, "tokens": total_tokens, "problems": problems,
              "documents": docs, "verified": bool(verify)}
    report["text"] = "\n".join(lines)
    return report
