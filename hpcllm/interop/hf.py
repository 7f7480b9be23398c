"""Hugging Face ``transformers`` checkpoints: export (``hpcllm export --format hf``) and
import (``hpcllm train --init-from DIR``), with no ``transformers`` needed by either.

Which HF class an hpcllm model becomes:

================================  =====================  =====================================
hpcllm model                      HF class               what the mapping does
================================  =====================  =====================================
gpt2, learned positions           ``GPT2LMHeadModel``    Conv1D weights are (in, out): transposed;
                                                         ``activation_function`` "gelu" (exact
                                                         erf; GPT-2's own is "gelu_new", tanh)
gpt2, rotary positions            ``GPTNeoXForCausalLM`` sequential residual, full rotary; the
                                                         fused q/k/v rows regrouped per head, and
                                                         q/k rows permuted within each head
                                                         (hpcllm rotates pairs (2i, 2i+1), NeoX
                                                         rotates halves (i, i + hd/2))
llama                             ``LlamaForCausalLM``   q/k/v and gate/up split out of the fused
                                                         matrices (rotary halves, as Llama)
================================  =====================  =====================================

The padded vocabulary is kept (its rows are suppressed by ``generation_config.json``). A
model without biases exports zero biases where the HF class always has them (GPT-2,
NeoX's MLP and norms): the same function. Import is the inverse for any checkpoint of these
three classes whose shape hpcllm expresses; anything else is a one-line error naming the field.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hpcllm.errors import HpcllmError
from hpcllm.interop import safetensors_io as st

#: a single model.safetensors up to this size, else shards of at most this size plus an index
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
IMPORTABLE = ("gpt2", "gpt_neox", "llama")
GELU_NAMES = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": None}


def hf_class(cfg) -> str:
    if cfg.arch == "llama":
        return "LlamaForCausalLM"
    return "GPT2LMHeadModel" if cfg.pos_emb == "learned" else "GPTNeoXForCausalLM"


def _rope_pairs_to_halves(hd: int) -> torch.Tensor:
    """Row order that turns hpcllm's interleaved rotary pairs into NeoX's halves."""
    return torch.cat((torch.arange(0, hd, 2), torch.arange(1, hd, 2)))


def _act_name(cfg) -> str:
    return "gelu" if cfg.gelu_approx == "none" else "gelu_new"


# --------------------------------------------------------------------------- hpcllm -> HF


def to_hf(cfg, state: dict, eod_id: int | None) -> tuple[dict, dict]:
    """(config.json dict, tensors by HF name) for an hpcllm ``cfg`` and its full state dict."""
    d, L, V = cfg.d_model, cfg.n_layer, cfg.padded_vocab

    def bias(name, n):
        return state[name] if name in state else torch.zeros(n)

    out = {}
    common = {"vocab_size": V, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eod_id,
              "eos_token_id": eod_id, "use_cache": True}
    if cfg.arch == "llama":
        kvd, h = cfg.kv_dim, cfg.hidden_dim
        out["model.embed_tokens.weight"] = state["wte.weight"]
        for i in range(L):
            p, q = f"blocks.{i}.", f"model.layers.{i}."
            qkv = state[p + "attn.qkv.weight"]
            fc = state[p + "mlp.fc.weight"]
            out.update({q + "input_layernorm.weight": state[p + "ln_1.weight"],
                        q + "self_attn.q_proj.weight": qkv[:d], q + "self_attn.k_proj.weight": qkv[d:d + kvd],
                        q + "self_attn.v_proj.weight": qkv[d + kvd:],
                        q + "self_attn.o_proj.weight": state[p + "attn.proj.weight"],
                        q + "post_attention_layernorm.weight": state[p + "ln_2.weight"],
                        q + "mlp.gate_proj.weight": fc[:h], q + "mlp.up_proj.weight": fc[h:],
                        q + "mlp.down_proj.weight": state[p + "mlp.proj.weight"]})
        out["model.norm.weight"] = state["ln_f.weight"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = state["lm_head.weight"]
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
                  "intermediate_size": h, "num_hidden_layers": L, "num_attention_heads": cfg.n_head,
                  "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
                  "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.ln_eps,
                  "rope_theta": cfg.rope_base,
                  "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
                  "attention_bias": False, "mlp_bias": False, **common}
    elif cfg.pos_emb == "learned":
        out["transformer.wte.weight"] = state["wte.weight"]
        out["transformer.wpe.weight"] = state["wpe.weight"]
        for i in range(L):
            p, q = f"blocks.{i}.", f"transformer.h.{i}."
            out.update({q + "ln_1.weight": state[p + "ln_1.weight"], q + "ln_1.bias": bias(p + "ln_1.bias", d),
                        q + "attn.c_attn.weight": state[p + "attn.qkv.weight"].t(),
                        q + "attn.c_attn.bias": bias(p + "attn.qkv.bias", 3 * d),
                        q + "attn.c_proj.weight": state[p + "attn.proj.weight"].t(),
                        q + "attn.c_proj.bias": bias(p + "attn.proj.bias", d),
                        q + "ln_2.weight": state[p + "ln_2.weight"], q + "ln_2.bias": bias(p + "ln_2.bias", d),
                        q + "mlp.c_fc.weight": state[p + "mlp.fc.weight"].t(),
                        q + "mlp.c_fc.bias": bias(p + "mlp.fc.bias", cfg.hidden_dim),
                        q + "mlp.c_proj.weight": state[p + "mlp.proj.weight"].t(),
                        q + "mlp.c_proj.bias": bias(p + "mlp.proj.bias", d)})
        out["transformer.ln_f.weight"] = state["ln_f.weight"]
        out["transformer.ln_f.bias"] = bias("ln_f.bias", d)
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = state["lm_head.weight"]
        config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": cfg.seq_len,
                  "n_ctx": cfg.seq_len, "n_embd": d, "n_layer": L, "n_head": cfg.n_head, "n_inner": cfg.hidden_dim,
                  "activation_function": _act_name(cfg), "layer_norm_epsilon": cfg.ln_eps,
                  "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
                  "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, **common}
    else:  # gpt2 blocks with rotary positions: GPT-NeoX with a sequential residual
        n, hd = cfg.n_head, cfg.head_dim
        perm = _rope_pairs_to_halves(hd)
        out["gpt_neox.embed_in.weight"] = state["wte.weight"]
        for i in range(L):
            p, q = f"blocks.{i}.", f"gpt_neox.layers.{i}."
            w = state[p + "attn.qkv.weight"].reshape(3, n, hd, d).clone()
            b = bias(p + "attn.qkv.bias", 3 * d).reshape(3, n, hd).clone()
            w[:2], b[:2] = w[:2][:, :, perm], b[:2][:, :, perm]
            out.update({q + "input_layernorm.weight": state[p + "ln_1.weight"],
                        q + "input_layernorm.bias": bias(p + "ln_1.bias", d),
                        q + "attention.query_key_value.weight": w.permute(1, 0, 2, 3).reshape(3 * d, d),
                        q + "attention.query_key_value.bias": b.permute(1, 0, 2).reshape(3 * d),
                        q + "attention.dense.weight": state[p + "attn.proj.weight"],
                        q + "attention.dense.bias": bias(p + "attn.proj.bias", d),
                        q + "post_attention_layernorm.weight": state[p + "ln_2.weight"],
                        q + "post_attention_layernorm.bias": bias(p + "ln_2.bias", d),
                        q + "mlp.dense_h_to_4h.weight": state[p + "mlp.fc.weight"],
                        q + "mlp.dense_h_to_4h.bias": bias(p + "mlp.fc.bias", cfg.hidden_dim),
                        q + "mlp.dense_4h_to_h.weight": state[p + "mlp.proj.weight"],
                        q + "mlp.dense_4h_to_h.bias": bias(p + "mlp.proj.bias", d)})
        out["gpt_neox.final_layer_norm.weight"] = state["ln_f.weight"]
        out["gpt_neox.final_layer_norm.bias"] = bias("ln_f.bias", d)
        if not cfg.tie_embeddings:
            out["embed_out.weight"] = state["lm_head.weight"]
        config = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": d,
                  "num_hidden_layers": L, "num_attention_heads": n, "intermediate_size": cfg.hidden_dim,
                  "hidden_act": _act_name(cfg), "max_position_embeddings": cfg.seq_len,
                  "layer_norm_eps": cfg.ln_eps, "use_parallel_residual": False, "attention_bias": True,
                  "rotary_pct": 1.0, "rotary_emb_base": cfg.rope_base,
                  "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base,
                                      "partial_rotary_factor": 1.0},
                  "hidden_dropout": 0.0, "attention_dropout": 0.0, **common}
    return config, out


# --------------------------------------------------------------------------- HF -> hpcllm


def _need(config: dict, where: str, key: str, ok, what: str, default=None):
    v = config.get(key, default)
    if not ok(v):
        raise HpcllmError(f"{where}: {key} {json.dumps(v)} is not supported by hpcllm ({what})")
    return v


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _rope_theta(config: dict, where: str, default: float) -> float:
    rp = config.get("rope_parameters") or config.get("rope_scaling")
    if isinstance(rp, dict):
        kind = rp.get("rope_type", rp.get("type", "default"))
        if kind not in ("default", None):
            raise HpcllmError(f"{where}: rope_parameters.rope_type {json.dumps(kind)} is not supported by hpcllm "
                              "(plain rotary positions only)")
        if "rope_theta" in rp:
            return float(rp["rope_theta"])
    return float(config.get("rope_theta", config.get("rotary_emb_base", default)))


def config_from_hf_dict(config: dict, where: str, seq_len: int | None = None, name: str = "hf"):
    """The GPTConfig an HF config.json describes; one-line error for what hpcllm cannot express."""
    from hpcllm.model.gpt import GPTConfig

    mt = config.get("model_type")
    if mt not in IMPORTABLE:
        raise HpcllmError(f"{where}: model_type {json.dumps(mt)} is not one hpcllm imports ({', '.join(IMPORTABLE)})")
    common = {"vocab_multiple": 1, "name": name}
    if mt == "gpt2":
        act = _need(config, where, "activation_function", lambda v: GELU_NAMES.get(v) is not None,
                    "gelu or gelu_new", "gelu_new")
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            _need(config, where, key, lambda v: not v, "must be false", False)
        _need(config, where, "scale_attn_weights", lambda v: v is True, "must be true", True)
        d = config.get("n_embd")
        kw = dict(n_layer=config.get("n_layer"), n_head=config.get("n_head"), d_model=d,
                  seq_len=config.get("n_positions"), vocab_size=config.get("vocab_size"), pos_emb="learned",
                  ffn_dim=config.get("n_inner") or (4 * d if _int(d) else None), bias=True,
                  ln_eps=float(config.get("layer_norm_epsilon", 1e-5)), gelu_approx=GELU_NAMES[act],
                  tie_embeddings=bool(config.get("tie_word_embeddings", True)))
    elif mt == "gpt_neox":
        _need(config, where, "use_parallel_residual", lambda v: v is False, "hpcllm blocks are sequential", True)
        act = _need(config, where, "hidden_act", lambda v: GELU_NAMES.get(v) is not None, "gelu or gelu_new", "gelu")
        rp = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
        pct = rp.get("partial_rotary_factor", config.get("rotary_pct", 0.25))
        if pct != 1.0:
            raise HpcllmError(f"{where}: rotary_pct {pct} is not supported by hpcllm (rotary over the whole head only)")
        kw = dict(n_layer=config.get("num_hidden_layers"), n_head=config.get("num_attention_heads"),
                  d_model=config.get("hidden_size"), seq_len=config.get("max_position_embeddings"),
                  vocab_size=config.get("vocab_size"), pos_emb="rope", ffn_dim=config.get("intermediate_size"),
                  bias=True, ln_eps=float(config.get("layer_norm_eps", 1e-5)), gelu_approx=GELU_NAMES[act],
                  rope_base=_rope_theta(config, where, 10000.0),
                  tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    else:
        _need(config, where, "hidden_act", lambda v: v == "silu", "SwiGLU with silu only", "silu")
        for key in ("attention_bias", "mlp_bias"):
            _need(config, where, key, lambda v: not v, "no biases", False)
        d, n = config.get("hidden_size"), config.get("num_attention_heads")
        if _int(d) and _int(n) and config.get("head_dim") not in (None, d // n):
            raise HpcllmError(f"{where}: head_dim {config['head_dim']} is not supported by hpcllm "
                              f"(must be hidden_size / num_attention_heads = {d // n})")
        kw = dict(n_layer=config.get("num_hidden_layers"), n_head=n, d_model=d,
                  n_kv_head=config.get("num_key_value_heads") or n, seq_len=config.get("max_position_embeddings"),
                  vocab_size=config.get("vocab_size"), arch="llama", pos_emb="rope", bias=False,
                  ffn_dim=config.get("intermediate_size"), ln_eps=float(config.get("rms_norm_eps", 1e-6)),
                  rope_base=_rope_theta(config, where, 10000.0),
                  tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    for key in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size", "ffn_dim"):
        if not _int(kw.get(key)):
            raise HpcllmError(f"{where}: missing or invalid {key.replace('_', ' ')} ({kw.get(key)!r})")
    if seq_len is not None:
        if kw["pos_emb"] == "learned" and seq_len > kw["seq_len"]:
            raise HpcllmError(f"--seq-len {seq_len}: the model's learned positions stop at {kw['seq_len']}")
        kw["seq_len"] = seq_len
    try:
        return GPTConfig(**kw, **common)
    except ValueError as e:
        raise HpcllmError(f"{where}: {e}") from None


def hf_source(cfg, name: str, t, has) -> torch.Tensor:
    """hpcllm tensor ``name`` (fp32) built from HF tensors: ``t(hf_name)`` reads one, ``has(hf_name)``
    tells whether it exists. One tensor at a time, so a rank reads only what it holds."""
    d = cfg.d_model
    if name == "lm_head.weight":
        # NeoX's head: embed_out in transformers 4 (and in exports), lm_head since 5
        neox = cfg.arch == "gpt2" and cfg.pos_emb == "rope"
        return t("embed_out.weight" if neox and has("embed_out.weight") else "lm_head.weight")
    if cfg.arch == "llama":
        top = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight"}
        if name in top:
            return t(top[name])
        i, rest = _block(name)
        q = f"model.layers.{i}."
        if rest == "attn.qkv.weight":
            return torch.cat([t(q + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if rest == "mlp.fc.weight":
            return torch.cat([t(q + "mlp.gate_proj.weight"), t(q + "mlp.up_proj.weight")])
        return t(q + {"ln_1.weight": "input_layernorm.weight", "attn.proj.weight": "self_attn.o_proj.weight",
                      "ln_2.weight": "post_attention_layernorm.weight", "mlp.proj.weight": "mlp.down_proj.weight"}[rest])
    if cfg.pos_emb == "learned":
        pre = "transformer." if has("transformer.wte.weight") else ""
        if name == "wpe.weight":
            return t(pre + "wpe.weight")[:cfg.seq_len]
        if not name.startswith("blocks."):
            return t(pre + name)  # wte, ln_f: the same names
        i, rest = _block(name)
        mod, kind = rest.rsplit(".", 1)
        hf = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc",
              "mlp.proj": "mlp.c_proj"}.get(mod, mod)
        v = t(f"{pre}h.{i}.{hf}.{kind}")
        return v.t().contiguous() if (kind == "weight" and mod not in ("ln_1", "ln_2")) else v
    # GPT-NeoX
    top = {"wte.weight": "gpt_neox.embed_in.weight", "ln_f.weight": "gpt_neox.final_layer_norm.weight",
           "ln_f.bias": "gpt_neox.final_layer_norm.bias"}
    if name in top:
        return t(top[name])
    i, rest = _block(name)
    q = f"gpt_neox.layers.{i}."
    n, hd = cfg.n_head, cfg.head_dim
    if rest.startswith("attn.qkv."):
        kind = rest.rsplit(".", 1)[1]
        src = q + "attention.query_key_value." + kind
        if kind == "bias" and not has(src):  # attention_bias false
            return torch.zeros(3 * d)
        back = torch.argsort(_rope_pairs_to_halves(hd))
        v = t(src).reshape(n, 3, hd, -1).permute(1, 0, 2, 3).clone()  # (3, n, hd, d or 1)
        v[:2] = v[:2][:, :, back]
        return v.reshape(3 * d, d) if kind == "weight" else v.reshape(3 * d)
    mod, kind = rest.rsplit(".", 1)
    hf = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.proj": "attention.dense",
          "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}[mod]
    if kind == "bias" and mod == "attn.proj" and not has(q + hf + ".bias"):
        return torch.zeros(d)
    return t(q + hf + "." + kind)


def _block(name: str) -> tuple[int, str]:
    _, i, rest = name.split(".", 2)
    return int(i), rest


# --------------------------------------------------------------------------- the byte tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer maps to)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_json() -> str:
    """hpcllm's byte tokenizer as a ``tokenizers`` tokenizer.json: byte b is id b, EOD 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from hpcllm.data.tokenizer import EOD_TOKEN

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOD_TOKEN])
    return tok.to_str()


# --------------------------------------------------------------------------- directories


def _tensor_files(d: Path) -> tuple[list[Path], dict | None]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HpcllmError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({d / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HpcllmError(f"{index}: names {', '.join(missing[:3])}, which do not exist")
        return files, weight_map
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"], None
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"], None
    raise HpcllmError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


class HFWeights:
    """An HF model directory opened for import: its GPTConfig, tokenizer and tensors.

    Also the reader interface restore() and ZeroSync.load use (``model_state(names)``,
    ``optim_state(names)`` -> nothing), so ``--init-from`` loads through the same paths as a
    checkpoint, for every layout."""

    def __init__(self, path, seq_len: int | None = None):
        self.dir = Path(path)
        if not self.dir.is_dir():
            raise HpcllmError(f"--init-from {path}: no such directory")
        cfg_file = self.dir / "config.json"
        try:
            self.hf_config = json.loads(cfg_file.read_text())
        except FileNotFoundError:
            raise HpcllmError(f"{cfg_file}: missing (not a Hugging Face model directory)") from None
        except (OSError, ValueError) as e:
            raise HpcllmError(f"{cfg_file}: not JSON ({e})") from None
        if not isinstance(self.hf_config, dict):
            raise HpcllmError(f"{cfg_file}: not a JSON object")
        self.cfg = config_from_hf_dict(self.hf_config, str(cfg_file), seq_len, name=f"hf:{self.dir.name}")
        self.files, _ = _tensor_files(self.dir)
        self._owner, self._readers, self._ref = None, [], None

    def tokenizer(self):
        """The directory's tokenizer (hpcllm's byte tokenizer when an hpcllm export says so),
        or None when it has none."""
        from hpcllm.data.tokenizer import ByteTokenizer, HFTokenizer

        tc = _read_json_or_empty(self.dir / "tokenizer_config.json")
        if tc.get("hpcllm_tokenizer") == "byte":
            return ByteTokenizer()
        if (self.dir / "tokenizer.json").is_file():
            return HFTokenizer(str(self.dir / "tokenizer.json"), eod_token=_token_text(tc.get("eos_token")))
        return None

    def _open(self):
        if self._owner is None:
            owner = {}
            for f in self.files:
                if f.suffix == ".bin":
                    from hpcllm.train.checkpoint import load_torch

                    sd = load_torch(f)
                    self._readers.append(sd)
                    owner.update({k: sd for k in sd})
                else:
                    r = st.SafetensorsFile(f)
                    self._readers.append(r)
                    owner.update({k: r for k in r.keys()})
            self._owner = owner
        return self._owner

    def names(self) -> list[str]:
        """hpcllm's parameter names of the whole model."""
        from hpcllm.model.gpt import GPT

        with torch.device("meta"):
            self._ref = GPT(self.cfg, init_seed=None).state_dict()
        return list(self._ref)

    # the checkpoint-reader interface
    def model_state(self, names=None, map_location=None) -> dict:
        """hpcllm tensors (fp32) by name, converted one at a time from the HF files."""
        owner = self._open()
        if self._ref is None:
            self.names()
        names = list(self._ref) if names is None else list(names)

        def t(hf_name):
            src = owner.get(hf_name)
            if src is None:
                raise HpcllmError(f"{self.dir}: no tensor {hf_name} (not a complete {hf_class(self.cfg)} checkpoint)")
            return (src[hf_name] if isinstance(src, dict) else src.get(hf_name)).float()

        out = {}
        for n in names:
            if n not in self._ref:
                raise HpcllmError(f"{self.dir}: hpcllm's model has no parameter {n}")
            v = hf_source(self.cfg, n, t, owner.__contains__)
            if tuple(v.shape) != tuple(self._ref[n].shape):
                raise HpcllmError(f"{self.dir}: {n} has shape {tuple(v.shape)} from the HF tensors, config.json's "
                                  f"shape needs {tuple(self._ref[n].shape)}")
            out[n] = v
        return out

    def state(self) -> dict:
        return self.model_state()

    def optim_state(self, names=None) -> dict:
        return {}

    def close(self) -> None:
        for r in self._readers:
            if hasattr(r, "close"):
                r.close()
        self._owner, self._readers = None, []


def _read_json_or_empty(p: Path) -> dict:
    try:
        v = json.loads(p.read_text())
        return v if isinstance(v, dict) else {}
    except (OSError, ValueError):
        return {}


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) else None


def config_from_hf(path, mcfg=None):
    """resolve_model's answer for ``--init-from``: the directory's shape (only --seq-len may
    change it; the other shape flags are refused, they would not fit the weights)."""
    if mcfg is not None:
        given = [f"--{k.replace('_', '-')}" for k in ("n_layer", "n_head", "d_model", "pos_emb", "arch", "n_kv_head",
                                                      "tie_embeddings", "ffn_dim", "moe_experts")
                 if getattr(mcfg, k, None) is not None]
        if given:
            raise HpcllmError(f"{', '.join(given)}: the model's shape comes from --init-from {path}; "
                              "drop the shape flags (only --seq-len may change)")
    return HFWeights(path, getattr(mcfg, "seq_len", None)).cfg
