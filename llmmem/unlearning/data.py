"""Unlearning examples from task names or jsonl files.

An example is a prefix and a suffix: the suffix is what unlearning trains on (labels) and what extraction
checks (greedy decode from the prefix). Canary rows (``prefix`` + ``secret``) and QA task rows (prompt +
answer) split naturally; a plain ``text`` row is split into its first ``prefix_tokens`` tokens and the rest.

A QA task may ask for the layout open-unlearning trains on (``options`` of the task YAML): ``eos: true``
appends the tokenizer's EOS token to every answer; ``chat_template: true`` renders the prompt as one user turn
of the tokenizer's chat template (with ``system_prompt`` and ``date_string`` when given) and the answer as the
assistant's reply (what instruction-tuned TOFU models were fine-tuned on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmmem.config import ConfigError


@dataclass
class Example:
    id: str
    prefix: str
    suffix: str
    group: str | None = None
    dup: int | None = None
    secret: str | None = None  # canaries: exposure is measured on this
    chat: dict | None = None  # {"system_prompt", "date_string"}: the prefix is a user turn of the chat template
    eos: bool = False  # the suffix ends with the EOS token
    prefix_ids: list = field(default_factory=list)
    suffix_ids: list = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.prefix + self.suffix


def _rows(src: str, include_path: str | None):
    from llmmem.tasks import get_task, read_jsonl

    if src.endswith(".jsonl"):
        p = Path(src)
        rows = read_jsonl(p)
        for i, r in enumerate(rows):
            r.setdefault("_row", i)
        return rows, None
    task = get_task(src, include_path)
    return task.docs(), task


def load_examples(src: str, include_path: str | None = None, ids: list | None = None, filt: dict | None = None,
                  prefix_tokens: int = 16) -> list[Example]:
    rows, task = _rows(src, include_path)
    out = []
    for r in rows:
        rid = str(r.get("id", r["_row"])) if task is None else task.doc_id(r)
        group = r.get("group")
        dup = r.get("dup") if isinstance(r.get("dup"), int) else r.get("count") if isinstance(r.get("count"), int) else None
        if "prefix" in r and "secret" in r:
            ex = Example(rid, str(r["prefix"]), " " + str(r["secret"]), group, dup, secret=str(r["secret"]))
        elif task is not None and task.doc_to_text and task.doc_to_target:
            from llmmem.tasks import render

            opts = task.options or {}
            chat = {k: opts.get(k) for k in ("system_prompt", "date_string")} if opts.get("chat_template") else None
            lead = "" if chat else task.target_delimiter
            ex = Example(rid, render(task.doc_to_text, r, task.name), lead + task.target(r), group, dup, chat=chat,
                         eos=bool(opts.get("eos", False)))
        elif "text" in r:
            words = str(r["text"]).split(" ")
            cut = min(len(words) - 1, max(1, prefix_tokens // 2))
            ex = Example(rid, " ".join(words[:cut]), " " + " ".join(words[cut:]), group, dup)
        else:
            raise ConfigError(f"{src} row {r['_row'] + 1}: needs 'text', or 'prefix' and 'secret', or a QA task")
        if group is None and dup is not None:
            ex.group = f"count{dup:03d}"
        out.append((r, ex))
    if filt:
        for key, allowed in filt.items():
            allowed = allowed if isinstance(allowed, list) else [allowed]
            out = [(r, e) for r, e in out if r.get(key) in allowed]
    if ids is not None:
        wanted = [str(i) for i in ids]
        have = {e.id for _, e in out}
        missing = [i for i in wanted if i not in have]
        if missing:
            raise ConfigError(f"forget ids not found in {src}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        out = [(r, e) for r, e in out if e.id in set(wanted)]
    return [e for _, e in out]


def tokenize(examples: list[Example], backend) -> None:
    """Token ids of every example (``backend``: anything with ``encode(text, add_special_tokens)``, and ``tok``,
    the Hugging Face tokenizer, for chat-template or EOS examples)."""
    for e in examples:
        if e.chat is not None:
            tok = _tokenizer(backend, e)
            if not getattr(tok, "chat_template", None):
                raise ConfigError(f"example {e.id}: the task asks for the chat template but the tokenizer has none")
            msgs = ([{"role": "system", "content": e.chat["system_prompt"]}] if e.chat.get("system_prompt") else [])
            msgs.append({"role": "user", "content": e.prefix})
            kw = {"date_string": e.chat["date_string"]} if e.chat.get("date_string") else {}
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
            e.prefix_ids = backend.encode(text, add_special_tokens=False)
        else:
            e.prefix_ids = backend.encode(e.prefix)
        e.suffix_ids = backend.encode(e.suffix, add_special_tokens=False)
        if not e.suffix_ids:
            raise ConfigError(f"example {e.id}: empty suffix")
        if e.eos:
            eos = getattr(_tokenizer(backend, e), "eos_token_id", None)
            if eos is None:
                raise ConfigError(f"example {e.id}: the task asks for an EOS after the answer but the tokenizer has none")
            if e.suffix_ids[-1] != eos:
                e.suffix_ids = e.suffix_ids + [eos]


def _tokenizer(backend, e: Example):
    tok = getattr(backend, "tok", None)
    if tok is None:
        raise ConfigError(f"example {e.id}: chat_template / eos need the Hugging Face tokenizer (backend.tok)")
    return tok


def batch_of(examples: list[Example], pad_id: int, device):
    """Right-padded batch; labels only on suffix tokens."""
    import torch

    seqs = [e.prefix_ids + e.suffix_ids for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(e.prefix_ids): len(s)] = torch.tensor(e.suffix_ids)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def chunk_examples(examples: list[Example], max_tokens: int) -> list[Example]:
    """Long tokenized examples cut into pieces of at most ``max_tokens`` tokens (long forget/retain texts such as
    MUSE's news articles or the WMDP corpora; open-unlearning trains on 2048-token chunks of the corpus, 512 for
    WMDP). Each piece keeps its first token as the prefix and trains on the rest; ids get ``#k`` suffixes."""
    if max_tokens < 2:
        raise ConfigError(f"max_tokens={max_tokens} must be >= 2")
    out = []
    for e in examples:
        ids = e.prefix_ids + e.suffix_ids
        if len(ids) <= max_tokens:
            out.append(e)
            continue
        for k, start in enumerate(range(0, len(ids) - 1, max_tokens)):
            piece = ids[start:start + max_tokens]
            if len(piece) < 2:
                break
            out.append(Example(f"{e.id}#{k}", "", "", e.group, e.dup, prefix_ids=piece[:1], suffix_ids=piece[1:]))
    return out
