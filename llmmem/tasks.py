"""Tasks are data: one YAML per task (lm-evaluation-harness vocabulary where it fits) + jsonl beside it.

Keys:

``task`` (name), ``suite`` (a registered suite: recall | icl | extraction | mia | ...), ``description``
(what the task is, for people), ``data`` (jsonl path relative to the YAML, ``hf:PATH[:CONFIG[:SPLIT]]``,
or for extraction ``{prefix_npy:, suffix_npy:}``), ``doc_to_text`` and ``doc_to_target`` (templates over
the row's fields: ``{{field}}``, dotted paths allowed; a target that is one field holding a list is
lm-eval's multiple targets: the first is the shot answer, any may match), ``aliases`` (a field holding
more accepted answers: a list, a JSON list string, or a dict with ``value``/``aliases``), ``num_fewshot``,
``fewshot_data`` (``same``, a jsonl file, or ``hf:...``), ``fewshot_config`` ({sampler: default |
first_n}), ``prompt_description`` (lm-eval's ``description``: text before the shots),
``target_delimiter``, ``fewshot_delimiter``, ``generation_kwargs`` (``max_gen_toks``, ``until``),
``filter_list`` (lm-eval's response filters: remove_whitespace, take_first, regex, lowercase,
uppercase), ``metric_list`` (names of llmmem metrics, or lm-eval's ``{metric: exact_match,
ignore_case:, ignore_punctuation:, ignore_numbers:, regexes_to_ignore:}``), ``bucket_by``, ``filter``
({field: [values]}), ``metadata.version``, and suite options under ``options``.

Few-shot prompts follow lm-evaluation-harness exactly (``lm_eval/api/task.py`` ``fewshot_context``,
``lm_eval/api/samplers.py`` ``ContextSampler``): one ``random.Random(fewshot_seed)`` per task run,
and for each doc in data order ``sample(pool, num_fewshot + 1)``, the doc itself dropped, the first
``num_fewshot`` kept (``first_n``: the first rows of the pool). The pool is the whole data set (or
``fewshot_data``), never the ``--limit`` slice, so a doc's prompt depends only on the task, its
position in the data, ``num_fewshot`` and the seed, and equals lm-eval's for the exported task.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from llmmem.config import ConfigError

_FIELD = re.compile(r"{{\s*([\w.]+)\s*}}")
KNOWN_KEYS = {"task", "suite", "description", "data", "doc_to_text", "doc_to_target", "aliases", "num_fewshot",
              "fewshot_data", "fewshot_config", "prompt_description", "target_delimiter", "fewshot_delimiter",
              "generation_kwargs", "filter_list", "metric_list", "bucket_by", "bucket_bins", "filter", "metadata",
              "options", "id_field", "tag", "source", "chance"}
SAMPLERS = ("default", "first_n")
# lm-eval's default fewshot_random_seed (lm_eval/evaluator.py simple_evaluate): llmmem's --seed S samples shots
# with seed 1234 + S, so the default run of an exported task under `lm_eval` draws the same shots.
FEWSHOT_SEED_OFFSET = 1234
FILTERS = ("remove_whitespace", "take_first", "regex", "lowercase", "uppercase")
LM_EVAL_EM_KEYS = {"metric", "aggregation", "higher_is_better", "ignore_case", "ignore_punctuation", "ignore_numbers",
                   "regexes_to_ignore"}


def fewshot_seed(seed: int) -> int:
    """The few-shot sampler's seed for llmmem's ``--seed`` (lm-eval's ``fewshot_random_seed``)."""
    return FEWSHOT_SEED_OFFSET + int(seed)


def template_fields(template: str) -> list[str]:
    return _FIELD.findall(template or "")


def lookup(row: dict, path: str):
    cur = row
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise KeyError(path)
    return cur


def render(template: str, row: dict, where: str = "") -> str:
    def sub(m):
        try:
            v = lookup(row, m.group(1))
        except KeyError:
            raise ConfigError(f"{where}: row has no field {m.group(1)!r} used by the template") from None
        return str(v)

    return _FIELD.sub(sub, template)


@dataclass
class Task:
    name: str
    suite: str
    path: Path  # the YAML
    description: str = ""
    data: object = None
    doc_to_text: str = ""
    doc_to_target: str = ""
    aliases: str | None = None
    num_fewshot: int = 0
    fewshot_data: str = "same"
    fewshot_sampler: str = "default"  # lm-eval's fewshot_config.sampler: default | first_n
    prompt_description: str = ""  # lm-eval's `description`: put before the shots
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    generation_kwargs: dict = field(default_factory=dict)
    filter_list: list = field(default_factory=list)  # [(function, kwargs)], lm-eval's one filter pipeline
    metric_list: list = field(default_factory=list)  # metric names (the first is the primary metric)
    metric_options: dict = field(default_factory=dict)  # {name: lm-eval metric kwargs} for lm-eval-form metrics
    bucket_by: str | None = None
    bucket_bins: list | None = None  # numeric edges: values are reported as "[lo, hi)" buckets
    filter: dict = field(default_factory=dict)
    version: object = 0
    options: dict = field(default_factory=dict)
    id_field: str | None = None
    chance: dict = field(default_factory=dict)  # {metric: chance-level value}; reports correct retention for it
    raw: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ data
    def _resolve(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.path.parent / p

    def load_rows(self, data=None) -> list[dict]:
        """Rows of the task's data (``data`` overrides the YAML's source, e.g. a fixture file)."""
        src = data if data is not None else self.data
        if isinstance(src, dict):
            from llmmem.suites.extraction import rows_from_token_arrays

            rows = rows_from_token_arrays(self._resolve(src["prefix_npy"]), self._resolve(src["suffix_npy"]))
        elif isinstance(src, str) and src.startswith("hf:"):
            rows = _hf_rows(src)
        elif isinstance(src, (str, Path)):
            rows = read_jsonl(self._resolve(str(src)))
        else:
            raise ConfigError(f"task {self.name}: 'data' must be a jsonl path, hf:PATH[:CONFIG[:SPLIT]] or "
                              f"{{prefix_npy, suffix_npy}}")
        for i, r in enumerate(rows):
            r.setdefault("_row", i)
        return rows

    def with_data(self, data=None, fewshot_data=None) -> Task:
        """A copy of the task reading other data (e.g. fixture files in the upstream format)."""
        return replace(self, data=self.data if data is None else data,
                       fewshot_data=self.fewshot_data if fewshot_data is None else str(fewshot_data))

    def docs(self, data=None, limit: int | None = None) -> list[dict]:
        """The evaluation docs in data order (``filter`` applied), the first ``limit`` of them.

        Each row gets ``_index``, its position among all the docs; the whole list is kept for
        :meth:`prompts`, whose shots never depend on ``limit``."""
        rows = self.load_rows(data)
        for key, allowed in (self.filter or {}).items():
            allowed = allowed if isinstance(allowed, list) else [allowed]
            rows = [r for r in rows if _safe_lookup(r, key) in allowed]
        if not rows:
            raise ConfigError(f"task {self.name}: dataset is empty after filtering ({self.filter or 'no filter'})")
        self.check_rows(rows)
        for i, r in enumerate(rows):
            r["_index"] = i
        self._all_docs = rows
        if limit is not None:
            rows = rows[:limit]
        return rows

    def check_rows(self, rows: list[dict]) -> None:
        where = self._where()
        needed = template_fields(self.doc_to_text) + template_fields(self.doc_to_target)
        for f in needed:
            if not any(_safe_lookup(r, f) is not None for r in rows):
                fields = sorted(k for k in rows[0] if not k.startswith("_"))
                raise ConfigError(f"task {self.name}: template field {f!r} does not exist in {where} "
                                  f"(fields: {', '.join(fields)})")
        for r in rows:
            for f in needed:
                try:
                    lookup(r, f)
                except KeyError:
                    raise ConfigError(f"{where} row {r['_row'] + 1}: missing field {f!r} used by the template") from None

    def _where(self) -> str:
        src = self.data if isinstance(self.data, str) else self.path.name
        return str(self._resolve(src)) if isinstance(src, str) and not src.startswith("hf:") else f"task {self.name}"

    def doc_id(self, row: dict) -> str:
        if self.id_field:
            return str(lookup(row, self.id_field))
        return str(row.get("id", row["_row"]))

    def bucket_value(self, row: dict):
        """The row's bucket label for ``bucket_by`` (binned when ``bucket_bins`` is given)."""
        if not self.bucket_by:
            return None
        v = _safe_lookup(row, self.bucket_by)
        if not self.bucket_bins or v is None:
            return v
        edges = sorted(float(e) for e in self.bucket_bins)
        x = float(v)
        lo = None
        for e in edges:
            if x < e:
                return f"[{lo:g}, {e:g})" if lo is not None else f"<{e:g}"
            lo = e
        return f">={lo:g}"

    # ------------------------------------------------------------------ prompts
    def targets(self, row: dict) -> list[str]:
        """The row's targets as lm-eval reads ``doc_to_target``: a template that is one field holding a list
        gives that list (lm-eval's multiple targets), anything else one rendered string."""
        fields = template_fields(self.doc_to_target)
        if len(fields) == 1 and self.doc_to_target.strip() == "{{" + fields[0] + "}}":
            value = _safe_lookup(row, fields[0])
            if isinstance(value, list):
                if not value:
                    raise ConfigError(f"{self._where()} row {row.get('_row', 0) + 1}: target field "
                                      f"{fields[0]!r} is an empty list")
                return [str(v) for v in value]
        return [render(self.doc_to_target, row, self._where())]

    def shot_target(self, row: dict) -> str:
        """The answer written after a shot (lm-eval: the first target, as rendered)."""
        return self.targets(row)[0]

    def target(self, row: dict) -> str:
        return self.shot_target(row).strip()

    def answers(self, row: dict) -> list[str]:
        out = []
        if self.doc_to_target:
            for t in self.targets(row):
                if t.strip() not in out:
                    out.append(t.strip())
        if self.aliases:
            extra = _safe_lookup(row, self.aliases)
            if isinstance(extra, str):
                try:
                    extra = json.loads(extra)
                except ValueError:
                    extra = [extra]
            if isinstance(extra, dict):
                extra = [extra.get("value", "")] + list(extra.get("aliases", []))
            for a in extra or []:
                if str(a) and str(a) not in out:
                    out.append(str(a))
        return out

    def fewshot_pool(self, rows: list[dict]) -> list[dict]:
        """Where shots come from: ``rows`` (all the docs) for ``same``, else the ``fewshot_data`` rows."""
        if self.fewshot_data in (None, "", "same"):
            return rows
        src = str(self.fewshot_data)
        cached = getattr(self, "_pool_cache", None)
        if cached is not None and cached[0] == src:
            return cached[1]
        pool = _hf_rows(src) if src.startswith("hf:") else read_jsonl(self._resolve(src))
        if not pool:
            raise ConfigError(f"task {self.name}: fewshot_data {src} has no rows")
        for i, r in enumerate(pool):
            r.setdefault("_row", i)
        self._pool_cache = (src, pool)
        return pool

    def messages(self, row: dict, shots: list[dict], system_instruction: str | None = None) -> list[Message]:
        """lm-eval's turns for a doc (``lm_eval/api/task.py`` ``ConfigurableTask.fewshot_context`` and
        ``build_qa_turn``): a system message holding the system instruction and the description (joined by the
        few-shot delimiter, ``maybe_delimit``), per shot a user turn (its text, target delimiter after it) and
        an assistant turn (its first target, few-shot delimiter after it), then the doc's user turn."""
        where = self._where()
        out = []
        description = render(self.prompt_description, row, where)  # lm-eval renders it as a template too
        system = maybe_delimit(system_instruction, description, self.fewshot_delimiter)
        if system:
            out.append(Message("system", system))
        for s in shots:
            answer = self.shot_target(s)
            has_answer = answer is not None and answer != ""
            out.append(Message("user", render(self.doc_to_text, s, where), self.target_delimiter if has_answer else ""))
            if has_answer:
                out.append(Message("assistant", answer, self.fewshot_delimiter))
        out.append(Message("user", render(self.doc_to_text, row, where)))
        return out

    def render_prompt(self, row: dict, shots: list[dict], fmt: PromptFormat | None = None) -> str:
        """The doc's prompt. Plain text (lm-eval without a chat template): the turns' texts each followed by
        its delimiter - system text, then per shot text + target delimiter + target + few-shot delimiter, then
        the doc's text. With a chat template (``fmt.chat``): the turns as chat messages, the shots as
        user/assistant turns (``fewshot_as_multiturn``) or folded into one user message (lm-eval's
        ``multiturn_to_singleturn``), rendered with the template's generation prompt."""
        fmt = fmt or PromptFormat()
        msgs = self.messages(row, shots, fmt.system_instruction)
        if fmt.chat is None:
            return "".join(m.to_text() for m in msgs)
        chat = [m.to_dict() for m in msgs] if fmt.fewshot_as_multiturn else multiturn_to_singleturn(msgs)
        return fmt.chat(chat)

    def prompts(self, docs: list[dict], num_fewshot: int, seed: int, fmt: PromptFormat | None = None) -> list[str]:
        """Each doc's prompt with ``num_fewshot`` shots drawn as lm-eval draws them (seed ``fewshot_seed(seed)``,
        or ``fmt.fewshot_seed``), laid out by ``fmt`` (plain text by default; see :meth:`render_prompt`).

        The sampler is replayed over all the docs in data order up to the last one asked for, so the
        prompt of a doc is the same whatever ``--limit`` cut the list."""
        fmt = fmt or PromptFormat()
        if num_fewshot <= 0:
            return [self.render_prompt(d, [], fmt) for d in docs]
        full = getattr(self, "_all_docs", None) or []

        def known(d):
            i = d.get("_index")
            return isinstance(i, int) and i < len(full) and (full[i] is d or _content(full[i]) == _content(d))

        if docs and all(known(d) for d in docs):
            positions = [d["_index"] for d in docs]
        else:  # not rows of docs(): the given list is taken as the whole evaluation set
            full, positions = docs, list(range(len(docs)))
        pool = self.fewshot_pool(full)
        rng_seed = fmt.fewshot_seed if fmt.fewshot_seed is not None else fewshot_seed(seed)
        sampler = FewshotSampler(pool, rng_seed, self.fewshot_sampler, self.name)
        sampler.check(num_fewshot)
        wanted = set(positions)
        shots_at = {}
        for j in range(max(positions) + 1):
            shots = sampler.sample(num_fewshot, full[j])
            if j in wanted:
                shots_at[j] = shots
        return [self.render_prompt(d, shots_at[j], fmt) for d, j in zip(docs, positions)]

    def with_generation_kwargs(self, overrides: dict | None) -> Task:
        """A copy whose ``generation_kwargs`` are updated by ``overrides`` (lm-eval's ``--gen_kwargs``:
        ``set_config("generation_kwargs", gen_kwargs, update=True)``); the task itself when there are none."""
        if not overrides:
            return self
        return replace(self, generation_kwargs={**self.generation_kwargs, **overrides})

    def prompt(self, row: dict, pool=None, num_fewshot: int = 0, seed: int = 0) -> str:
        """One doc's prompt (see :meth:`prompts`; ``pool`` is ignored: the pool comes from the task)."""
        return self.prompts([row], num_fewshot, seed)[0]

    def content_hash(self) -> str:
        """Hash of the YAML and its local data files (for results)."""
        h = hashlib.sha256(self.path.read_bytes())
        for rel in _local_files(self.data) + ([self.fewshot_data] if self.fewshot_data not in (None, "", "same") else []):
            p = self._resolve(rel)
            if p.is_file():
                h.update(p.read_bytes())
        return h.hexdigest()[:16]


def _content(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


@dataclass
class Message:
    """One turn of a prompt, as lm-eval's ``lm_eval/api/utils.py`` ``Message``: ``delimiter`` follows the
    content in plain text and is dropped in chat form."""

    role: str
    content: str
    delimiter: str = ""

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}

    def to_text(self) -> str:
        return self.content + self.delimiter


def maybe_delimit(prefix: str | None, suffix: str | None, delimiter: str = " ") -> str:
    """lm-eval's ``maybe_delimit``: join with ``delimiter`` unless one side has whitespace at the join."""
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix or ""
    return prefix + suffix if prefix[-1].isspace() or suffix[0].isspace() else prefix + delimiter + suffix


def multiturn_to_singleturn(messages: list[Message]) -> list[dict]:
    """lm-eval's ``multiturn_to_singleturn``: the system message kept, every other turn's text (with its
    delimiter; none after the last) joined into one user message."""
    system, rest = (messages[0], messages[1:]) if messages and messages[0].role == "system" else (None, messages)
    rest = [Message(m.role, m.content, m.delimiter) for m in rest]
    if rest[-1].role == "assistant":
        user, last = rest[:-1], [rest[-1].to_dict()]
    else:
        user, last = rest, []
    user[-1].delimiter = ""
    out = [Message("user", "".join(m.to_text() for m in user)).to_dict()] + last
    return ([system.to_dict()] if system else []) + out


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are laid out (lm-eval's ``fewshot_context`` arguments): ``chat`` renders a list of
    ``{role, content}`` messages with a chat template and its generation prompt (``llmmem.chat.chat_renderer``),
    None for plain text; ``fewshot_seed`` overrides the sampler's seed (else ``fewshot_seed(seed)``)."""

    system_instruction: str | None = None
    chat: object = None
    fewshot_as_multiturn: bool = False
    fewshot_seed: int | None = None


class FewshotSampler:
    """lm-eval's few-shot samplers (``lm_eval/api/samplers.py``), re-implemented.

    ``default`` (``ContextSampler.sample`` with the eval doc): ``rnd.sample(pool, n + 1)``, drop every
    row equal to the doc, keep the first ``n``; if fewer than ``n`` remain (the doc was drawn twice),
    ``rnd.sample(pool without the doc, n)``. ``first_n`` (``FirstNSampler``): the first ``n`` rows of the
    pool without the doc. One ``random.Random(seed)`` serves every doc of a run, in data order
    (``Task.set_fewshot_seed`` then ``build_all_requests``). lm-eval passes the eval doc whenever the
    few-shot split is the evaluation split, or neither is declared (its hub tasks): llmmem always does.
    Rows are compared by content (llmmem's own ``_`` bookkeeping keys left out), as lm-eval's ``!=``.
    """

    def __init__(self, pool: list[dict], seed: int, kind: str = "default", task: str = ""):
        self.pool = pool
        self.rnd = random.Random(seed)
        self.kind = kind
        self.task = task

    def check(self, n: int) -> None:
        need = n + 1 if self.kind == "default" else n
        if need > len(self.pool):
            raise ConfigError(f"task {self.task}: --num_fewshot {n} is larger than the shot pool allows "
                              f"({len(self.pool)} rows; the {self.kind} sampler needs {need})")

    def sample(self, n: int, doc: dict) -> list[dict]:
        if n <= 0:
            return []
        me = _content(doc)
        if self.kind == "first_n":
            res = []
            for x in self.pool:
                if _content(x) != me:
                    res.append(x)
                    if len(res) == n:
                        break
        else:
            res = [x for x in self.rnd.sample(self.pool, n + 1) if _content(x) != me][:n]
            if len(res) < n:
                rest = [x for x in self.pool if _content(x) != me]
                if len(rest) < n:
                    raise ConfigError(f"task {self.task}: --num_fewshot {n} is larger than the shot pool without "
                                      f"the doc ({len(rest)} rows)")
                res = self.rnd.sample(rest, n)
        if len(res) < n:
            raise ConfigError(f"task {self.task}: --num_fewshot {n} is larger than the shot pool without the doc "
                              f"({len(res)} rows)")
        return res


def _local_files(data) -> list[str]:
    if isinstance(data, str) and not data.startswith("hf:"):
        return [data]
    if isinstance(data, dict):
        return [v for v in data.values() if isinstance(v, str)]
    return []


def _safe_lookup(row, key):
    try:
        return lookup(row, key)
    except KeyError:
        return None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{lineno}: a row must be a JSON object")
            rows.append(row)
    return rows


def _hf_parts(src: str) -> tuple[str, str | None, str]:
    """``hf:PATH[:CONFIG[:SPLIT]]`` -> (path, config or None, split; default ``validation``)."""
    parts = src[3:].split(":")
    path, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    return path, config, parts[2] if len(parts) > 2 and parts[2] else "validation"


def data_dir() -> Path:
    """Local copies of hub datasets: ``$LLMMEM_DATA`` or ``$LLMMEM_HOME/data`` (tasks/unlearning/fetch_data.py
    writes them)."""
    from llmmem.config import llmmem_home

    return Path(os.environ.get("LLMMEM_DATA") or llmmem_home() / "data").expanduser()


def local_copy(src: str) -> Path | None:
    """``hf:PATH:CONFIG:SPLIT`` -> ``<data_dir>/PATH/CONFIG/SPLIT.jsonl`` (CONFIG ``default`` when none) when that
    file exists: hub data sets are read from there first, so benchmarks run offline from a copy."""
    path, config, split = _hf_parts(src)
    p = data_dir() / path / (config or "default") / f"{split}.jsonl"
    return p if p.is_file() else None


def _hf_rows(src: str) -> list[dict]:
    from llmmem.presets import hub_reachable

    local = local_copy(src)
    if local is not None:
        return read_jsonl(local)
    path, config, split = _hf_parts(src)
    if not hub_reachable() and not Path(path).exists():
        raise ConfigError(f"dataset {src!r} needs the Hugging Face hub, which is unreachable")
    import datasets

    try:
        ds = datasets.load_dataset(path, config, split=split)
    except Exception as e:
        raise ConfigError(f"cannot load dataset {src!r}: {str(e).splitlines()[0]}") from None
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------- discovery
def builtin_tasks_dir() -> Path | None:
    """``tasks/`` of a source checkout, or the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "tasks", here / "_tasks"):
        if cand.is_dir() and any(cand.rglob("*.yaml")):
            return cand
    try:
        from importlib.resources import files

        p = Path(str(files("llmmem._tasks")))
        if p.is_dir():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return None


def model_task_dir(model: str) -> Path | None:
    """A model directory may ship its own tasks (the testbed does) in ``<model>/tasks``."""
    p = Path(str(model)).expanduser()
    if (p / "tasks").is_dir():
        return p / "tasks"
    from llmmem.presets import PRESETS, preset_task_dir

    if str(model) in PRESETS:
        return preset_task_dir(str(model))  # a preset not built yet: the same tasks, written without building
    return None


def with_model_tasks(include_path: str | None, models: list[str]) -> str | None:
    """``include_path`` extended with the task directories the models ship."""
    parts = [include_path] if include_path else []
    for m in models:
        d = model_task_dir(m)
        if d is not None and str(d) not in parts:
            parts.append(str(d))
    return os.pathsep.join(parts) if parts else None


def task_dirs(include_path: str | None = None) -> list[Path]:
    dirs = []
    for key, extra in (("--include_path", include_path), ("LLMMEM_TASKS_PATH", os.environ.get("LLMMEM_TASKS_PATH"))):
        for p in str(extra or "").split(os.pathsep):
            if p:
                d = Path(p).expanduser()
                if not d.is_dir():
                    raise ConfigError(f"{key}: {p} " + ("is not a directory" if d.exists() else "does not exist"))
                dirs.append(d)
    b = builtin_tasks_dir()
    if b is not None:
        dirs.append(b)
    return dirs


@lru_cache(maxsize=8)
def _index(dirs: tuple[str, ...]) -> dict[str, Path]:
    import yaml

    index: dict[str, Path] = {}
    for d in dirs:
        for y in sorted(Path(d).rglob("*.yaml")):
            try:
                doc = yaml.safe_load(y.read_text())
            except yaml.YAMLError:
                index.setdefault(y.stem, y)  # reported when loaded
                continue
            if isinstance(doc, dict) and "task" in doc and "suite" in doc:
                index.setdefault(str(doc["task"]), y)
    return index


def task_index(include_path: str | None = None) -> dict[str, Path]:
    return _index(tuple(str(d) for d in task_dirs(include_path)))


# the per-sample metrics a metric_list may name, for the suites whose rows are fixed (llmmem/suites/recall.py
# score_response, icl.py); None (another suite): not checked here
SUITE_METRICS = {"recall": {"exact_match", "f1", "contains"},
                 "icl": {"exact_match", "f1", "contains", "follows_context", "parametric"}}


def load_task_file(path: Path) -> Task:
    from llmmem.config import yaml_load_file

    doc = yaml_load_file(path, "task YAML")
    unknown = sorted(set(doc) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}")
    for key in ("task", "suite", "data"):
        if key not in doc:
            raise ConfigError(f"{path}: missing required key {key!r}")
    from llmmem.suites import SUITES  # the registry (lazy entries: no suite module, no torch, is imported)

    try:
        SUITES.check(str(doc["suite"]))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    from llmmem.config import parse_int

    gen = doc.get("generation_kwargs") or {}
    if not isinstance(gen, dict):
        raise ConfigError(f"{path}: generation_kwargs must be a mapping (e.g. {{until: ['\\n'], max_gen_toks: 16}}), "
                          f"got {gen!r}")
    gen = dict(gen)
    if "max_gen_toks" in gen:
        gen["max_gen_toks"] = parse_int(f"{path}: generation_kwargs.max_gen_toks", gen["max_gen_toks"], minimum=1)
    meta = doc.get("metadata") or {}
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: metadata must be a mapping, got {meta!r}")
    num_fewshot = parse_int(f"{path}: num_fewshot", doc.get("num_fewshot", 0), minimum=0)
    metrics, metric_options = _metric_list(doc.get("metric_list"), path)
    known = SUITE_METRICS.get(str(doc["suite"]))
    bad = [m for m in metrics if known is not None and m not in known]
    if bad:
        raise ConfigError(f"{path}: metric_list: {bad[0]!r} is not a metric of suite {doc['suite']}; "
                          f"choose from: {', '.join(sorted(known))}")
    return Task(
        name=str(doc["task"]), suite=doc["suite"], path=path, description=str(doc.get("description", "")).strip(),
        data=doc["data"], doc_to_text=doc.get("doc_to_text", ""), doc_to_target=doc.get("doc_to_target", ""),
        aliases=doc.get("aliases"), num_fewshot=num_fewshot,
        fewshot_data=doc.get("fewshot_data", "same"), fewshot_sampler=_sampler(doc.get("fewshot_config"), path),
        prompt_description=str(doc.get("prompt_description") or ""),
        target_delimiter=doc.get("target_delimiter", " "),
        fewshot_delimiter=doc.get("fewshot_delimiter", "\n\n"), generation_kwargs=gen,
        filter_list=_filter_list(doc.get("filter_list"), path),
        metric_list=metrics, metric_options=metric_options, bucket_by=doc.get("bucket_by"),
        bucket_bins=doc.get("bucket_bins"),
        filter=dict(doc.get("filter") or {}), version=meta.get("version", 0), options=dict(doc.get("options") or {}),
        id_field=doc.get("id_field"), chance=_chance(doc.get("chance"), path), raw=doc,
    )


def _sampler(cfg, path) -> str:
    if cfg is None:
        return "default"
    if not isinstance(cfg, dict) or set(cfg) - {"sampler"}:
        raise ConfigError(f"{path}: fewshot_config must be a mapping with the key sampler (one of: {', '.join(SAMPLERS)})")
    name = str(cfg.get("sampler", "default"))
    if name not in SAMPLERS:
        raise ConfigError(f"{path}: fewshot_config.sampler {name!r} is not supported; choose from: {', '.join(SAMPLERS)}")
    return name


def _filter_list(value, path) -> list:
    """lm-eval's ``filter_list`` with one pipeline -> [(function, kwargs)]."""
    if not value:
        return []
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict) \
            or not isinstance(value[0].get("filter"), list):
        raise ConfigError(f"{path}: filter_list must hold one pipeline {{name:, filter: [{{function: ...}}]}}")
    steps = []
    for step in value[0]["filter"]:
        fn = step.get("function") if isinstance(step, dict) else None
        if fn not in FILTERS:
            raise ConfigError(f"{path}: filter function {fn!r} is not supported; choose from: {', '.join(FILTERS)}")
        steps.append((fn, {k: v for k, v in step.items() if k != "function"}))
    return steps


def _metric_list(value, path) -> tuple[list, dict]:
    """Metric names, and lm-eval metric kwargs for entries written in lm-eval's form (``{metric: exact_match, ...}``)."""
    names, options = [], {}
    for entry in value or []:
        if isinstance(entry, str):
            names.append(entry)
            continue
        if not isinstance(entry, dict) or "metric" not in entry:
            raise ConfigError(f"{path}: metric_list entries are names or {{metric: NAME, ...}}; got {entry!r}")
        name = str(entry["metric"])
        extra = sorted(set(entry) - LM_EVAL_EM_KEYS)
        if name != "exact_match" or extra:
            raise ConfigError(f"{path}: metric {entry!r}: the lm-eval form supports exact_match with "
                              f"{', '.join(sorted(LM_EVAL_EM_KEYS - {'metric'}))}")
        names.append(name)
        options[name] = {k: entry[k] for k in ("ignore_case", "ignore_punctuation", "ignore_numbers",
                                               "regexes_to_ignore") if k in entry}
    return names, options


def _chance(value, path) -> dict:
    if value is None:
        return {}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"*": float(value)}
    if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
        return {str(k): float(v) for k, v in value.items()}
    raise ConfigError(f"{path}: 'chance' must be a number or a mapping metric -> number")


def get_task(name: str, include_path: str | None = None) -> Task:
    index = task_index(include_path)
    if name not in index:
        p = Path(name)
        if p.suffix == ".yaml" and p.is_file():
            return load_task_file(p)
        close = difflib.get_close_matches(name, list(index), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `llmmem ls tasks`"
        raise ConfigError(f"unknown task {name!r}{hint}")
    return load_task_file(index[name])


def parse_task_list(text: str) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks is empty; see `llmmem ls tasks`")
    return names
