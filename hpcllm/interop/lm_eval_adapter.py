"""hpcllm's model behind lm-evaluation-harness's ``LM`` interface, registered as ``hpcllm``.

``loglikelihood`` comes from lm-eval's ``TemplateLM`` (the context/continuation split its
``hf`` backend uses); ``_loglikelihood_tokens`` and ``loglikelihood_rolling`` cut the token
windows as the ``hf`` backend does (the last ``seq_len`` tokens of context + continuation;
rolling windows from ``lm_eval.utils``, the EOD token as prefix) and take the log-softmax
over the model's whole (padded) head, so both backends score the same numbers for an
exported model. ``generate_until`` samples through :func:`hpcllm.infer.generate.generate_ids`
(KV cache) and cuts at the first stop string.

From the command line: ``hpcllm eval RUN --tasks hpcllm_ppl,hpcllm_mc`` (the tasks shipped in
``hpcllm/eval_tasks/`` are always included; ``--include-path DIR`` adds more), or
``lm_eval --model hpcllm --model_args pretrained=RUN`` after ``import hpcllm.interop.lm_eval_adapter``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from hpcllm.errors import HpcllmError

#: the tasks shipped with hpcllm (a perplexity task and a multiple-choice task)
TASKS_DIR = Path(__file__).resolve().parents[1] / "eval_tasks"


def offline_env() -> None:
    """lm-eval and datasets try the Hub for every task unless told not to: seconds per run,
    and on a firewalled compute node a hang."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _lm_eval():
    offline_env()
    try:
        import lm_eval  # noqa: F401
        # the built-in backends' lazy placeholders first: lm-eval fills its registry on first
        # lookup only while it is empty, so registering hpcllm alone would hide "hf" & co.
        import lm_eval.models  # noqa: F401
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import register_model
    except ImportError as e:
        raise HpcllmError(f"lm-evaluation-harness is not installed ({e}); pip install 'hpcllm[eval]' "
                          "or pip install lm-eval") from None
    return TemplateLM, register_model


TemplateLM, register_model = _lm_eval()


class HpcllmLM(TemplateLM):
    """``pretrained``: a run directory, checkpoint directory or exported file (or ``loaded``:
    an already loaded :class:`~hpcllm.infer.generate.LoadedModel`)."""

    backend = "causal"

    def __init__(self, pretrained=None, device: str = "cpu", batch_size=8, max_gen_toks: int = 256,
                 loaded=None, **_ignored):
        super().__init__()
        if loaded is None:
            if pretrained is None:
                raise HpcllmError("the hpcllm lm-eval model needs pretrained=RUN_OR_CHECKPOINT")
            from hpcllm.infer.generate import load_model

            loaded = load_model(pretrained, device=device)
        self.loaded, self.model, self.tok = loaded, loaded.model, loaded.tokenizer
        self.model.eval()
        self.max_length = loaded.seq_len
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(self.model.parameters()).device

    # ---- tokenizer
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eod_id

    @property
    def tokenizer_name(self) -> str:
        return f"hpcllm-{self.tok.type}-{self.tok.sha256[:12]}"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # ---- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields the
        continuation) per ``(key, context_ids, continuation_ids)``, in batches of similar
        length, right-padded (causal attention: padding after a row changes nothing before it)."""
        L = self.max_length
        items = []
        for i, (_key, ctx, cont) in enumerate(requests):
            if not cont:
                raise HpcllmError("lm-eval asked for the likelihood of an empty continuation")
            inp = (list(ctx) + list(cont))[-(L + 1):][:-1]
            items.append((i, inp, list(cont)))
        out: list = [None] * len(items)
        items.sort(key=lambda t: -len(t[1]))
        for b in range(0, len(items), self.batch_size):
            chunk = items[b:b + self.batch_size]
            width = max(len(inp) for _, inp, _ in chunk)
            x = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, (_, inp, _) in enumerate(chunk):
                x[r, :len(inp)] = torch.tensor(inp)
            logp = torch.log_softmax(self.model(x.to(self._device)).float(), dim=-1).cpu()
            for r, (i, inp, cont) in enumerate(chunk):
                n = len(cont)
                rows = logp[r, len(inp) - n:len(inp)]
                target = torch.tensor(cont)
                ll = float(rows.gather(1, target[:, None]).sum())
                greedy = bool((rows.argmax(-1) == target).all())
                out[i] = (ll, greedy)
                key = requests[i][0]
                if key is not None and getattr(self, "cache_hook", None) is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (ll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils as lm_utils

        results = []
        for req in requests:
            (text,) = req.args
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            ll = sum(x[0] for x in self._loglikelihood_tokens([(None, c, t) for c, t in windows]))
            if getattr(self, "cache_hook", None) is not None:
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
            results.append(ll)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from hpcllm.infer.generate import SampleConfig, cut_at_stop, generate_ids

        results = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            sample = SampleConfig(max_new_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                                  temperature=temperature, top_k=None, top_p=kwargs.pop("top_p", None),
                                  seed=int(kwargs.pop("seed", 0)), stop_at_eod=True)
            ids = generate_ids(self.model, self.tok_encode(context), sample, seq_len=self.max_length,
                               vocab_size=self.tok.vocab_size, eod_id=self.tok.eod_id)
            text = self.tok_decode([i for i in ids if i != self.tok.eod_id])
            for stop in until:
                text = cut_at_stop(text, stop)
            if getattr(self, "cache_hook", None) is not None:
                self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            results.append(text)
        return results


register_model("hpcllm")(HpcllmLM)


def run_tasks(source, tasks: list[str], include_path=None, device: str = "cpu", batch_size: int = 8,
              limit: float | None = None, num_fewshot: int | None = None, loaded=None, log_samples: bool = False):
    """lm-eval's simple_evaluate on ``source`` for ``tasks`` (the shipped ones plus
    ``include_path``'s); returns lm-eval's results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([str(p) for p in include_path] if include_path else [])
    for p in paths[1:]:
        if not Path(p).is_dir():
            raise HpcllmError(f"--include-path {p}: no such directory")
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise HpcllmError(f"--tasks: unknown task {', '.join(unknown)} (shipped: hpcllm_ppl, hpcllm_mc; "
                          "add a directory of task YAML files with --include-path)")
    lm = HpcllmLM(pretrained=source, device=device, batch_size=batch_size, loaded=loaded)
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           log_samples=log_samples, bootstrap_iters=0, verbosity="ERROR")
