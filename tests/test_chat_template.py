"""--apply_chat_template / --fewshot_as_multiturn / --system_instruction: llmmem's recall and icl prompts are
lm-eval's own, doc by doc (compared in-process with lm-eval's ``ConfigurableTask.fewshot_context`` and
``simple_evaluate`` on the exported task), tokenized without a second BOS, on both backends."""

import json

import pytest

from conftest import cli_error, run_cli

pytest.importorskip("lm_eval")

# a ChatML-like template that writes BOS itself, on a tokenizer that also adds BOS: a second BOS is the bug
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# a template that refuses a system message (as some instruct models' templates do)
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
             "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] "
             "{% endif %}")
SYSTEM = "You are a geography teacher."


def _with_template(path, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = template
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    import tiny

    return _with_template(tiny.save_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-chat", "llama", bos=True), CHAT)


@pytest.fixture(scope="module")
def nosys_dir(tmp_path_factory):
    import tiny

    return _with_template(tiny.save_checkpoint(tmp_path_factory.mktemp("nosys") / "tiny-nosys", "llama", bos=True),
                          NO_SYSTEM)


def _backend(path, batch_size=4):
    from llmmem.backends.hf import HFBackend
    from llmmem.config import ModelSpec
    from llmmem.models import load_model

    return HFBackend(load_model(ModelSpec(str(path), device="cpu")), batch_size=batch_size)


def _hflm(b):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=b.model, tokenizer=b.tok, batch_size=1, max_length=b.max_length)


def _task_with_description(d):
    """A recall task with a description, a few-shot file and list targets (the layout's corner cases)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "t.jsonl").write_text("".join(json.dumps({"q": f"question {i}", "a": [f"ans{i}", f"alt{i}"]}) + "\n"
                                       for i in range(20)))
    (d / "t.yaml").write_text(
        "task: t\nsuite: recall\ndata: t.jsonl\nprompt_description: \"Answer the questions.\"\n"
        "doc_to_text: 'Q: {{q}}?\\nA:'\ndoc_to_target: '{{a}}'\nfewshot_delimiter: \"\\n\"\nnum_fewshot: 3\n")
    return str(d)


def _lm_eval_prompts(out, name, n_docs, k, *, chat=None, multiturn=False, system=None, seed=1234):
    """lm-eval's own prompts: TaskManager load, set_fewshot_seed, fewshot_context over the docs in order."""
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=[str(out)], include_defaults=False).load_task_or_group([name])[name]
    task.set_fewshot_seed(seed)
    return [task.fewshot_context(d, num_fewshot=k, system_instruction=system, apply_chat_template=chat is not None,
                                 fewshot_as_multiturn=multiturn, chat_template=chat)
            for _, d in zip(range(n_docs), task.eval_docs)]


def _ours(task, n_docs, k, b, *, template=True, multiturn=False, system=None, seed=0, fewshot_seed=None):
    from llmmem.chat import chat_renderer
    from llmmem.tasks import PromptFormat

    fmt = PromptFormat(system_instruction=system, chat=chat_renderer(b.tok, template) if template else None,
                       fewshot_as_multiturn=multiturn, fewshot_seed=fewshot_seed)
    return task.prompts(task.docs(limit=n_docs), k, seed, fmt)


@pytest.mark.parametrize("multiturn", [True, False])
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_chat_prompts_equal_lm_evals_fewshot_context(tmp_path, chat_dir, multiturn, system):
    from llmmem.lmeval import export_tasks
    from llmmem.tasks import get_task

    b = _backend(chat_dir)
    hflm = _hflm(b)
    src = _task_with_description(tmp_path / "src")
    out = tmp_path / "exported"
    export_tasks(out, ["capitals", "associative_recall"])
    export_tasks(out, ["t"], include_path=src)
    for name, inc, k in (("capitals", None, 3), ("associative_recall", None, 2), ("t", src, 3), ("capitals", None, 0)):
        task = get_task(name, inc)
        ours = _ours(task, 12, k, b, multiturn=multiturn, system=system)
        theirs = _lm_eval_prompts(out, f"llmmem_{name}", 12, k, chat=hflm.apply_chat_template, multiturn=multiturn,
                                  system=system)
        assert ours == theirs, name
        assert ours[0].startswith("<s><|system|>" if system or name == "t" else "<s><|user|>")
        assert ours[0].endswith("</s>\n<|assistant|>\n")  # the generation prompt
        n_user = ours[0].count("<|user|>")
        assert n_user == (k + 1 if multiturn else 1), (name, n_user)


def test_plain_text_system_instruction_equals_lm_evals(tmp_path, chat_dir):
    from llmmem.lmeval import export_tasks
    from llmmem.tasks import get_task

    b = _backend(chat_dir)
    src = _task_with_description(tmp_path / "src")
    out = tmp_path / "exported"
    export_tasks(out, ["t"], include_path=src)
    export_tasks(out, ["capitals"])
    for name, inc in (("t", src), ("capitals", None)):
        task = get_task(name, inc)
        ours = _ours(task, 10, 3, b, template=False, system=SYSTEM)
        assert ours == _lm_eval_prompts(out, f"llmmem_{name}", 10, 3, system=SYSTEM)
        assert ours[0].startswith(SYSTEM) and ours != _ours(task, 10, 3, b, template=False)


def test_fewshot_seed_is_lm_evals_fourth_seed(tmp_path, chat_dir):
    from llmmem.lmeval import export_tasks
    from llmmem.tasks import get_task

    b = _backend(chat_dir)
    out = tmp_path / "exported"
    export_tasks(out, ["associative_recall"])  # lm-eval's default sampler (capitals has fixed first_n shots)
    task = get_task("associative_recall")
    ours = _ours(task, 8, 2, b, fewshot_seed=42)
    assert ours == _lm_eval_prompts(out, "llmmem_associative_recall", 8, 2, chat=_hflm(b).apply_chat_template, seed=42)
    assert ours != _ours(task, 8, 2, b)


def test_one_bos_and_lm_evals_token_ids(chat_dir):
    """The template writes BOS and the tokenizer adds BOS: one BOS, and lm-eval's HFLM token ids."""
    from llmmem.backends.base import GenerateRequest
    from llmmem.tasks import get_task

    b = _backend(chat_dir)
    bos = b.tok.bos_token_id
    assert b.tok("x")["input_ids"][0] == bos  # the tokenizer adds BOS to plain text
    prompts = _ours(get_task("capitals"), 4, 1, b)  # short enough for the tiny model's 128 positions
    hflm = _hflm(b)
    for p in prompts:
        assert not b.prompt_truncated(GenerateRequest(context=p, max_gen_toks=4))
        ids = b.prompt_ids(GenerateRequest(context=p, max_gen_toks=4))
        assert ids[0] == bos and ids.count(bos) == 1
        assert ids == hflm.tok_batch_encode([p])[0][0].tolist()
    plain = b.prompt_ids(GenerateRequest(context="Q: What is the capital of France?\nA:", max_gen_toks=4))
    assert plain[0] == bos and plain.count(bos) == 1  # plain prompts keep the tokenizer's BOS


def test_same_prompts_and_responses_as_lm_eval_simple_evaluate(tmp_path, chat_dir):
    """End to end: lm-eval's simple_evaluate on the exported task with the chat flags = llmmem's suite."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from llmmem.cells import EvalSpec
    from llmmem.evaluation import evaluate
    from llmmem.lmeval import export_tasks
    from llmmem.tasks import get_task

    out = tmp_path / "exported"
    export_tasks(out, ["capitals"])
    b = _backend(chat_dir, batch_size=1)
    ev = EvalSpec(tasks=["capitals"], limit=8, apply_chat_template=True, fewshot_as_multiturn=True,
                  system_instruction=SYSTEM, gen_kwargs="max_gen_toks=5")
    ours = evaluate(b, [get_task("capitals")], eval_spec=ev, seed=0)[0]
    res = simple_evaluate(model=_hflm(b), tasks=["llmmem_capitals"], limit=8, log_samples=True,
                          apply_chat_template=True, fewshot_as_multiturn=True, system_instruction=SYSTEM,
                          gen_kwargs={"max_gen_toks": 5},
                          task_manager=TaskManager(include_path=[str(out)], include_defaults=False), bootstrap_iters=0)
    samples = sorted(res["samples"]["llmmem_capitals"], key=lambda s: s["doc_id"])
    assert [s["arguments"][0][0] for s in samples] == [r["prompt"] for r in ours.rows]
    assert [s["arguments"][0][1]["max_gen_toks"] for s in samples] == [5] * 8
    assert [s["resps"][0][0] for s in samples] == [r["response"] for r in ours.rows]


def test_template_refusing_system_drops_it_as_lm_eval(tmp_path, nosys_dir):
    from llmmem.lmeval import export_tasks
    from llmmem.tasks import get_task

    b = _backend(nosys_dir)
    out = tmp_path / "exported"
    export_tasks(out, ["capitals"])
    ours = _ours(get_task("capitals"), 5, 3, b, multiturn=True, system=SYSTEM)
    theirs = _lm_eval_prompts(out, "llmmem_capitals", 5, 3, chat=_hflm(b).apply_chat_template, multiturn=True,
                              system=SYSTEM)
    assert ours == theirs and SYSTEM not in ours[0] and ours[0].startswith("[user] Q:")


def test_named_templates(chat_dir, tmp_path):
    from llmmem.chat import chat_renderer, check_template
    from llmmem.config import ConfigError

    b = _backend(chat_dir)
    msgs = [{"role": "user", "content": "hello"}]
    b.tok.chat_template = {"default": CHAT, "bracket": NO_SYSTEM}
    assert chat_renderer(b.tok, True)(msgs) == "<s><|user|>\nhello</s>\n<|assistant|>\n"
    assert chat_renderer(b.tok, "bracket")(msgs) == "[user] hello\n[assistant] "
    with pytest.raises(ConfigError, match="no template of that name; choose from: bracket, default"):
        check_template(b.tok, "chatml")
    b.tok.chat_template = CHAT
    with pytest.raises(ConfigError, match="one chat template, not named ones"):
        check_template(b.tok, "bracket")
    b.tok.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        check_template(b.tok, True)


def test_cli_chat_flags_write_chat_prompts(tmp_path, chat_dir, capsys):
    run = tmp_path / "run"
    rc = run_cli(["eval", "--model", chat_dir, "--tasks", "capitals,famous_passages", "--limit", "3",
                  "--apply_chat_template", "--system_instruction", SYSTEM, "--log_samples", "--output_path", run,
                  "--quiet"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(next(run.rglob("results.json")).read_text())
    assert doc["cell_config"]["eval"]["apply_chat_template"] is True
    assert doc["cell_config"]["eval"]["fewshot_as_multiturn"] is True  # lm-eval 0.4.13's default with a template
    assert doc["run"]["chat_template"] == CHAT and doc["chat_template"] == CHAT
    assert doc["fewshot_as_multiturn"] is True and doc["system_instruction"] == SYSTEM
    rows = [json.loads(x) for x in next(run.rglob("samples_capitals.jsonl")).read_text().splitlines()]
    assert all(r["prompt"].startswith(f"<s><|system|>\n{SYSTEM}</s>\n<|user|>\n") for r in rows)
    assert all(r["prompt"].count("<|assistant|>") == 4 for r in rows)  # 3 shots + the generation prompt
    assert "chat prompt" in doc["tasks"]["capitals"]["conventions"]["prompt_format"]
    ext = [json.loads(x) for x in next(run.rglob("samples_famous_passages.jsonl")).read_text().splitlines()]
    assert ext and not any("<|user|>" in str(r.get("prefix", "")) for r in ext)  # raw text: no template


def test_cli_single_turn_and_model_without_template(tmp_path, chat_dir, llama_dir, capsys):
    run = tmp_path / "run"
    rc = run_cli(["eval", "--model", chat_dir, "--tasks", "capitals", "--limit", "2", "--apply_chat_template",
                  "--fewshot_as_multiturn", "false", "--log_samples", "--output_path", run, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in next(run.rglob("samples_capitals.jsonl")).read_text().splitlines()]
    assert all(r["prompt"].count("<|user|>") == 1 and r["prompt"].count("<|assistant|>") == 1 for r in rows)
    cli_error(capsys, ["eval", "--model", llama_dir, "--tasks", "capitals", "--apply_chat_template",
                       "--output_path", tmp_path / "r2"], "has no chat template", "--apply_chat_template")
    cli_error(capsys, ["eval", "--model", chat_dir, "--tasks", "capitals", "--apply_chat_template", "chatml",
                       "--output_path", tmp_path / "r3"], "one chat template, not named ones")
    cli_error(capsys, ["eval", "--model", llama_dir, "--tasks", "capitals", "--fewshot_as_multiturn",
                       "--output_path", tmp_path / "r4"], "fewshot_as_multiturn=true needs apply_chat_template")
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r4").exists()


def test_sweep_with_chat_keys(tmp_path, chat_dir, capsys):
    import yaml

    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"models": [str(chat_dir)], "methods": ["magnitude"], "sparsities": [0.5],
                                   "tasks": ["capitals"], "limit": 3, "apply_chat_template": True,
                                   "fewshot_as_multiturn": False, "system_instruction": SYSTEM, "log_samples": True,
                                   "gen_kwargs": "max_gen_toks=3", "output_path": str(tmp_path / "run")}))
    assert run_cli(["sweep", cfg, "--quiet"]) == 0, capsys.readouterr().err
    docs = [json.loads(p.read_text()) for p in (tmp_path / "run").rglob("results.json")]
    assert len(docs) == 2
    for d in docs:
        assert d["cell_config"]["eval"]["fewshot_as_multiturn"] is False
        assert d["cell_config"]["eval"]["gen_kwargs"] == {"max_gen_toks": 3}
        rows = [json.loads(x) for x in (tmp_path / "run" / d["cell"]["name"] / "samples_capitals.jsonl")
                .read_text().splitlines()]
        assert all(r["prompt"].startswith(f"<s><|system|>\n{SYSTEM}</s>\n<|user|>\n") for r in rows)
        assert all(r["prompt"].count("<|user|>") == 1 for r in rows)
        cfgs = d["configs"]["capitals"]["generation_kwargs"]
        assert cfgs["max_gen_toks"] == 3


@pytest.mark.slow
def test_smollm2_chat_prompts_equal_lm_evals(tmp_path, smollm2_dir):
    """The real Instruct model's template (ChatML, no BOS written, <|im_start|> is its BOS token)."""
    from llmmem.backends.base import GenerateRequest
    from llmmem.lmeval import export_tasks
    from llmmem.tasks import get_task

    b = _backend(smollm2_dir)
    assert b.tok.chat_template
    hflm = _hflm(b)
    out = tmp_path / "exported"
    export_tasks(out, ["capitals", "capitals_override", "associative_recall"])
    for name in ("capitals", "capitals_override", "associative_recall"):
        task = get_task(name)
        for multiturn in (True, False):
            ours = _ours(task, 10, task.num_fewshot, b, multiturn=multiturn, system=SYSTEM)
            assert ours == _lm_eval_prompts(out, f"llmmem_{name}", 10, task.num_fewshot,
                                            chat=hflm.apply_chat_template, multiturn=multiturn, system=SYSTEM)
            assert ours[0].startswith("<|im_start|>system\n" + SYSTEM) and ours[0].endswith("<|im_start|>assistant\n")
            ids = b.prompt_ids(GenerateRequest(context=ours[0], max_gen_toks=8))
            assert ids == hflm.tok_batch_encode([ours[0]])[0][0].tolist()
