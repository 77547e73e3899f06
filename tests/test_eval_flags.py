"""lm-evaluation-harness's flags in `llmmem eval` and sweeps, with lm-eval's spelling and meaning: an lm-eval
command line with `lm_eval` replaced by `llmmem eval` runs unchanged (checked against lm-eval's own parser),
--gen_kwargs, --seed a,b,c,d, --batch_size auto, --predict_only, --output_path FILE.json, --model hf,
--verbosity / --write_out / --show_config."""

import json

import pytest

from conftest import cli_error, run_cli

CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    import tiny

    path = tiny.save_checkpoint(tmp_path_factory.mktemp("chat") / "tiny-chat", "llama", bos=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT
    tok.save_pretrained(path)
    return path


def _cells(run):
    return [json.loads(p.read_text()) for p in sorted(run.rglob("results.json"))]


def _rows(run, task):
    p = next(run.rglob(f"samples_{task}.jsonl"))
    return [json.loads(x) for x in p.read_text().splitlines()]


# ----------------------------------------------------------------------------- an lm-eval command line, unchanged
def _lm_eval_config(argv):
    """What lm-eval 0.4.x itself understands from ``lm_eval ARGV`` (its own parser and config checks)."""
    pytest.importorskip("lm_eval")
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.config.evaluate_config import EvaluatorConfig

    ns = HarnessCLI()._parser.parse_args(["run", *argv])
    return EvaluatorConfig.from_cli(ns)


def test_an_lm_eval_command_line_runs_unchanged(tmp_path, chat_dir, capsys):
    inc = tmp_path / "mytasks"
    inc.mkdir()
    (inc / "mine.jsonl").write_text("".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) + "\n"
                                            for i in range(40)))
    (inc / "mine.yaml").write_text("task: mine\nsuite: recall\ndata: mine.jsonl\ndoc_to_text: 'Q: {{q}}\\nA:'\n"
                                   "doc_to_target: '{{a}}'\nnum_fewshot: 1\n")
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--model", "hf", "--model_args", f"pretrained={chat_dir},dtype=float32,trust_remote_code=False",
            "--tasks", "capitals,mine", "--num_fewshot", "2", "--batch_size", "auto:4", "--limit", "0.05",
            "--output_path", str(out), "--log_samples", "--seed", "0,1234,1234,1234", "--device", "cpu",
            "--apply_chat_template", "--fewshot_as_multiturn", "--system_instruction", "Be brief.",
            "--gen_kwargs", "max_gen_toks=4,until=['\\n']", "--include_path", str(inc), "--use_cache", str(cache),
            "--verbosity", "WARNING"]
    cfg = _lm_eval_config(argv)  # a valid lm-eval command line, as lm-eval reads it
    assert cfg.model == "hf" and cfg.model_args["pretrained"] == str(chat_dir)
    assert run_cli(["eval", *argv]) == 0, capsys.readouterr().err
    (doc,) = _cells(out)
    ev = doc["cell_config"]["eval"]
    # the same meaning, flag by flag
    assert doc["cell_config"]["model"]["name"] == str(chat_dir) and doc["cell_config"]["model"]["dtype"] == "float32"
    assert ev["tasks"] == cfg.tasks == ["capitals", "mine"]
    assert ev["num_fewshot"] == cfg.num_fewshot == 2
    assert ev["limit"] == {"capitals": cfg.limit, "mine": cfg.limit} == {"capitals": 0.05, "mine": 0.05}
    assert doc["n_samples"] == {"capitals": 9, "mine": 2}  # ceil(0.05 * n), as lm-eval
    assert ev["apply_chat_template"] is cfg.apply_chat_template is True
    assert ev["fewshot_as_multiturn"] is cfg.fewshot_as_multiturn is True
    assert ev["system_instruction"] == cfg.system_instruction == "Be brief."
    assert ev["gen_kwargs"] == {"max_gen_toks": 4, "until": ["\n"]} == cfg.gen_kwargs
    assert cfg.seed == [0, 1234, 1234, 1234]
    assert doc["seeds"]["seed"] == 0 and doc["seeds"]["fewshot_seed"] == 1234 and doc["seeds"]["torch_seed"] == 1234
    assert [doc["config"][k] for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")] == cfg.seed
    assert cfg.batch_size == "auto:4" and doc["run"]["batch_size_auto"]["requested"] == "auto:4"
    assert isinstance(doc["run"]["batch_size"], int) and doc["run"]["device"] == "cpu"
    assert doc["run"]["log_samples"] is cfg.log_samples is True
    assert list(out.rglob("samples_capitals_*.jsonl")) and (cache / "llmmem-requests.sqlite").is_file()
    rows = _rows(out, "capitals")
    assert all(r["prompt"].startswith("<s><|system|>\nBe brief.</s>\n<|user|>\n") for r in rows)
    assert all(r["prompt"].count("<|user|>") == 3 for r in rows)  # 2 shots as turns + the question
    # lm-eval's own default seeds spelled out are llmmem's default: the same cell
    cli_error(capsys, ["eval", *[a if a != "0,1234,1234,1234" else "0" for a in argv]], "already finished")


def test_lm_eval_spellings_space_separated_and_predict_only(tmp_path, chat_dir, capsys):
    """lm-eval 0.4.13 also takes `--tasks a b` and `--model_args k=v k=v`; --predict_only implies --log_samples."""
    out = tmp_path / "out"
    argv = ["--model", "hf", "--model_args", f"pretrained={chat_dir}", "dtype=float32", "--tasks", "capitals",
            "famous_passages", "--limit", "3", "--output_path", str(out), "--predict_only", "--device", "cpu"]
    cfg = _lm_eval_config(argv)
    assert cfg.tasks == ["capitals", "famous_passages"] and cfg.predict_only and cfg.log_samples
    assert run_cli(["eval", *argv]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "predict only: no metric was computed" in printed and "exact_match" not in printed
    (doc,) = _cells(out)
    assert doc["predict_only"] is True and doc["cell_config"]["eval"]["predict_only"] is True
    assert doc["metrics"] == {"capitals": {}, "famous_passages": {}}
    assert all(doc["tasks"][t]["primary_metric"] is None for t in ("capitals", "famous_passages"))
    assert doc["run"]["log_samples"] is True and list(out.rglob("samples_capitals_*.jsonl"))
    rows = _rows(out, "capitals")
    assert len(rows) == 3 and all("response" in r and "prediction" in r and "prompt" in r for r in rows)
    assert not any(k in r for r in rows for k in ("exact_match", "f1"))
    ext = _rows(out, "famous_passages")
    assert ext and not any("extractable" in r for r in ext) and all("response" in r for r in ext)
    # lm-eval's results reader takes the file; llmmem's report does not show it as a scored cell
    from lm_eval.utils import make_table

    make_table(doc)
    from llmmem.report import build_report

    text = build_report(out)
    assert "predict only (outputs logged, no metric computed)" in text and "absolute" not in text


# ----------------------------------------------------------------------------- --model hf, --output_path FILE.json
def test_model_hf_needs_pretrained_and_backend_agreement(capsys, llama_dir, tmp_path):
    cli_error(capsys, ["eval", "--model", "hf", "--tasks", "capitals"],
              "--model hf is lm-eval's backend name", "--model_args pretrained=NAME_OR_PATH")
    cli_error(capsys, ["eval", "--model", "vllm", "--model_args", f"pretrained={llama_dir}", "--tasks", "capitals",
                       "--backend", "hf"], "--model vllm", "--backend hf", "disagree")
    cli_error(capsys, ["eval", "--model", "hf", "--model_args", f"pretrained={llama_dir},parallelize=True",
                       "--tasks", "capitals"], "unknown key 'parallelize'")


def test_pretrained_alias_device_and_trust_remote_code(capsys, llama_dir, tmp_path):
    """lm-eval's `--model_args pretrained=M` (without --model), `--device` and `--trust_remote_code` reach the
    ModelSpec, are recorded (device under run, trust_remote_code in the cell's model identity), and a sweep
    takes the same keys in its model_args."""
    from llmmem.cli import build_parser, model_spec_of
    from llmmem.errors import ConfigError
    from llmmem.sweep import parse_sweep

    def spec(*argv):
        return model_spec_of(build_parser().parse_args(["eval", "--tasks", "capitals", *argv]))

    s = spec("--model_args", f"pretrained={llama_dir},dtype=float32", "--device", "cpu", "--trust_remote_code")
    assert (s.name, s.dtype, s.device, s.trust_remote_code) == (str(llama_dir), "float32", "cpu", True)
    assert spec("--model", str(llama_dir), "--model_args", f"pretrained={llama_dir}").name == str(llama_dir)
    assert spec("--model_args", f"pretrained={llama_dir},device=cpu", "--device", "cpu").device == "cpu"
    for argv, needle in ((["--model", "a", "--model_args", "pretrained=b"], "disagree"),
                         (["--model_args", f"pretrained={llama_dir},device=cpu", "--device", "cuda"], "disagree"),
                         (["--model_args", f"pretrained={llama_dir}", "--device", "gpu0"], "gpu0")):
        with pytest.raises(ConfigError, match=needle):
            spec(*argv)
    sw = parse_sweep({"models": [str(llama_dir), {"name": str(llama_dir), "model_args": "dtype=bfloat16"}],
                      "model_args": "device=cpu,trust_remote_code=true", "tasks": ["capitals"], "methods": []})
    assert [(m.spec.device, m.spec.trust_remote_code) for m in sw.models] == [("cpu", True), ("auto", False)]
    out = tmp_path / "out"
    rc = run_cli(["eval", "--model_args", f"pretrained={llama_dir}", "--device", "cpu", "--trust_remote_code",
                  "--tasks", "capitals", "--limit", "2", "--output_path", out, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    (doc,) = _cells(out)
    model = doc["cell_config"]["model"]
    assert model["name"] == str(llama_dir) and model["trust_remote_code"] is True and doc["run"]["device"] == "cpu"
    assert doc["config"]["model_args"]["pretrained"] == str(llama_dir)  # lm-eval's config section


def test_quickstart_states_its_chat_template_choice():
    """Issue 19: the quickstart (an Instruct model) says whether it uses the chat template and why; stating
    `false` leaves its cells' identity as before, and the override the comment gives turns the template on."""
    from pathlib import Path

    import yaml

    from llmmem.sweep import load_sweep_spec

    path = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    text = path.read_text()
    assert yaml.safe_load(text)["apply_chat_template"] is False
    comment = text.split("apply_chat_template: false")[0].rsplit("batch_size", 1)[1]
    assert "# Chat template: off" in comment and "lm-eval's" in comment and "apply_chat_template=true" in comment
    spec = load_sweep_spec(str(path))
    assert spec.eval.apply_chat_template is False and "apply_chat_template" not in spec.eval.canonical()
    chat = load_sweep_spec(str(path), ["apply_chat_template=true", "output_path=results/quickstart-chat"])
    assert chat.eval.apply_chat_template is True and chat.eval.fewshot_as_multiturn is True


def test_output_path_json_file_and_output_flags(tmp_path, llama_dir, capsys):
    target = tmp_path / "out" / "results.json"
    rc = run_cli(["eval", "--model", "hf", "--model_args", f"pretrained={llama_dir}", "--tasks", "capitals",
                  "--limit", "2", "--output_path", target, "--write_out", "--show_config", "--verbosity", "ERROR"])
    assert rc == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    (doc,) = _cells(tmp_path / "out")
    copies = list((tmp_path / "out").glob("results_*.json"))  # lm-eval's <stem>_<date>.json beside the run
    assert len(copies) == 1 and json.loads(copies[0].read_text()) == doc
    assert "Task: capitals; document 0; context prompt (starting on next line):\nQ: What is the capital of" \
        in captured.out and "(end of target on previous line)" in captured.out
    assert '"cell_config"' in captured.out and '"configs"' in captured.out  # --show_config
    assert "llmmem:" not in captured.err  # --verbosity ERROR: no info lines
    with pytest.raises(SystemExit) as e:  # argparse's own error: one line, exit 2
        run_cli(["eval", "--model", llama_dir, "--tasks", "capitals", "--verbosity", "LOUD"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--verbosity: invalid choice: 'LOUD'" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- --gen_kwargs
def test_gen_kwargs_parse_as_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval._cli.utils import key_val_to_dict

    from llmmem.cells import parse_gen_kwargs

    for text in ("max_gen_toks=8,until=['\\n\\n','Q:']", "temperature=0.7,do_sample=true,top_p=0.9",
                 'until="\\n",max_gen_toks=3', "do_sample=False"):
        theirs = key_val_to_dict(text)
        ours = parse_gen_kwargs(text)
        assert {k: ours[k] for k in theirs} == {k: (v if k != "until" or isinstance(v, list) else [v])
                                                 for k, v in theirs.items()}, text
    assert parse_gen_kwargs("max_new_tokens=5,temperature=0") == {"max_gen_toks": 5, "temperature": 0.0,
                                                                  "do_sample": False}
    assert parse_gen_kwargs('{"max_tokens": 7}') == {"max_gen_toks": 7}


@pytest.mark.parametrize("bad,needle", [("max_gen_toks=0", "max_gen_toks=0 must be >= 1"),
                                         ("top_k=50", "top_k=50"), ("beams=2", "unknown key(s) beams"),
                                         ("temperature=-1", "temperature=-1 is outside"),
                                         ("do_sample=maybe", "do_sample"), ("max_gen_toks", "not key=value"),
                                         ("do_sample=true,temperature=0", "do_sample=true with temperature=0")])
def test_gen_kwargs_bad_values_exit_2_before_loading(capsys, llama_dir, bad, needle):
    cli_error(capsys, ["eval", "--model", llama_dir, "--tasks", "capitals", "--gen_kwargs", bad], needle)


def test_gen_kwargs_change_every_generate_request(llama_dir, tmp_path):
    from llmmem.backends.cache import CachingBackend
    from llmmem.backends.hf import HFBackend
    from llmmem.cells import EvalSpec
    from llmmem.config import ModelSpec
    from llmmem.evaluation import evaluate
    from llmmem.models import load_model
    from llmmem.tasks import get_task

    b = HFBackend(load_model(ModelSpec(str(llama_dir), device="cpu")), batch_size=4)
    tasks = [get_task("capitals"), get_task("associative_recall")]
    seen, outs = [], []
    inner = b.generate

    def spy(reqs):
        res = inner(reqs)
        seen.extend(reqs)
        outs.extend(res)
        return res

    b.generate = spy

    def run(gen, seed=0, backend=b):
        seen.clear()
        outs.clear()
        ev = EvalSpec(tasks=[t.name for t in tasks], limit=4, gen_kwargs=gen)
        res = evaluate(backend, tasks, eval_spec=ev, seed=seed)
        return res, list(seen), list(outs)

    _, reqs, _ = run(None)
    assert sorted({r.max_gen_toks for r in reqs}) == sorted({t.generation_kwargs.get("max_gen_toks", 16)
                                                             for t in tasks})
    assert not any(r.do_sample for r in reqs)
    _, reqs, res = run("max_gen_toks=1,until=[]")
    assert {r.max_gen_toks for r in reqs} == {1} and all(r.until == [] for r in reqs) and len(reqs) == 8
    assert all(len(r.token_ids) <= 1 for r in res)
    sampled, reqs, _ = run("do_sample=true,temperature=5.0,max_gen_toks=6")
    assert all(r.do_sample and r.temperature == 5.0 and r.seed == 0 for r in reqs)
    again, _, _ = run("do_sample=true,temperature=5.0,max_gen_toks=6")
    assert [r.rows for r in again] == [r.rows for r in sampled]  # seeded: the same draws
    other, reqs, _ = run("do_sample=true,temperature=5.0,max_gen_toks=6", seed=3)
    assert all(r.seed == 3 for r in reqs) and [r.rows for r in other] != [r.rows for r in sampled]
    cb = CachingBackend(b, tmp_path / "cache", "fp+dense")  # seeded sampling is cached like greedy decoding
    run("do_sample=true,temperature=5.0,max_gen_toks=6", backend=cb)
    cached, reqs, _ = run("do_sample=true,temperature=5.0,max_gen_toks=6", backend=cb)
    assert reqs == [] and cb.stats["hits"] == 8 and cb.stats["uncacheable"] == 0
    assert [r.rows for r in cached] == [r.rows for r in sampled]


# ----------------------------------------------------------------------------- --seed
def test_seed_comma_form(tmp_path, llama_dir, capsys):
    from llmmem.cells import parse_seed

    assert parse_seed("0,1234,1234,1234") == (0, 1234, 1234, 1234)
    assert parse_seed("5") == (5, None, None, None)
    assert parse_seed("1,None,2") == (1, None, 2, 1234)  # lm-eval fills a missing fourth with its default
    run = tmp_path / "run"
    # associative_recall draws its shots with lm-eval's default sampler (capitals' are fixed: first_n)
    base = ["eval", "--model", llama_dir, "--tasks", "associative_recall", "--limit", "6", "--log_samples", "--quiet"]
    assert run_cli([*base, "--output_path", run, "--seed", "0,7,8,42"]) == 0, capsys.readouterr().err
    (doc,) = _cells(run)
    assert doc["seeds"] == {"seed": 0, "fewshot_seed": 42, "numpy_seed": 7, "torch_seed": 8}
    assert doc["cell_config"]["eval"]["fewshot_seed"] == 42 and "torch_seed" not in doc["cell_config"]["eval"]
    from llmmem.tasks import PromptFormat, get_task

    task = get_task("associative_recall")
    want = task.prompts(task.docs(limit=6), 2, 0, PromptFormat(fewshot_seed=42))
    assert [r["prompt"] for r in _rows(run, "associative_recall")] == want != task.prompts(task.docs(limit=6), 2, 0)
    cli_error(capsys, [*base, "--output_path", run, "--seed", "1,2"], "--seed '1,2'", "python,numpy,torch,fewshot")
    cli_error(capsys, [*base, "--output_path", run, "--seed", "0,x,1,2"], "--seed (numpy)")


# ----------------------------------------------------------------------------- --batch_size auto
def test_cpu_rule_and_probe():
    from types import SimpleNamespace

    from llmmem.autobatch import cpu_batch_size, probe_batch_size, row_bytes
    from llmmem.config import ConfigError

    cfg = SimpleNamespace(vocab_size=50000, hidden_size=1000, num_attention_heads=10, intermediate_size=4000)
    per_row = row_bytes(cfg, 1000)
    assert per_row == 4 * 1000 * (2 * 50000 + 8 * 1000 + 2 * 4000 + 2 * 10 * 1000)
    assert cpu_batch_size(cfg, 1000, 64, memory=2 * 10 * per_row) == 8  # 10 rows fit: the power of two below
    assert cpu_batch_size(cfg, 1000, 4, memory=2 * 10 * per_row) == 4  # the cap
    assert cpu_batch_size(cfg, 1000, 64, memory=per_row) == 1
    tried = []

    def forward(b):
        tried.append(b)
        if b > 12:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert probe_batch_size(forward, 64) == 8 and tried == [64, 32, 16, 8]

    def broken(b):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        probe_batch_size(broken, 64)
    with pytest.raises(ConfigError, match="even a batch of 1"):
        probe_batch_size(lambda b: forward(100), 4)


def test_batch_size_auto_found_once_cached_and_recorded(tmp_path, llama_dir, capsys, monkeypatch):
    import llmmem.autobatch as ab
    from llmmem.config import llmmem_home

    calls = []
    real = ab.cpu_batch_size
    monkeypatch.setattr(ab, "cpu_batch_size", lambda *a, **k: calls.append(a) or real(*a, **k))
    base = ["eval", "--model", llama_dir, "--tasks", "capitals", "--limit", "2", "--batch_size", "auto", "--quiet"]
    assert run_cli([*base, "--output_path", tmp_path / "a"]) == 0, capsys.readouterr().err
    assert run_cli([*base, "--output_path", tmp_path / "b", "--max_batch_size", "4"]) == 0
    assert run_cli([*base, "--output_path", tmp_path / "c"]) == 0
    (a,), (b,), (c,) = _cells(tmp_path / "a"), _cells(tmp_path / "b"), _cells(tmp_path / "c")
    assert a["run"]["batch_size_auto"]["source"] == "found" and c["run"]["batch_size_auto"]["source"] == "cached"
    assert a["run"]["batch_size"] == c["run"]["batch_size"] == 64  # the tiny model fits lm-eval's default cap
    assert b["run"]["batch_size"] == 4 and b["run"]["batch_size_auto"]["max_batch_size"] == 4
    assert len(calls) == 2  # found for cap 64 and cap 4, the third run read the cache
    assert a["run"]["batch_size_auto"]["rule"] == "memory-estimate" and a["run"]["batch_size_auto"]["max_length"] == 128
    cache = json.loads((llmmem_home() / "batch_sizes.json").read_text())
    assert len(cache) == 2 and all("|cpu:" in k and "|float32|max_length=128|" in k for k in cache)
    assert a["cell_config"] == c["cell_config"]  # the batch size is not part of a cell's identity
    cli_error(capsys, [*base, "--output_path", tmp_path / "d", "--max_batch_size", "0"], "--max_batch_size")
    cli_error(capsys, [*base[:-2], "autox", "--output_path", tmp_path / "d"], "--batch_size")


def test_sweep_batch_size_auto_and_eval_keys(tmp_path, llama_dir, capsys):
    import yaml

    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"models": [str(llama_dir)], "methods": ["magnitude"], "sparsities": [0.5],
                                   "tasks": ["capitals"], "limit": 2, "batch_size": "auto", "max_batch_size": 16,
                                   "gen_kwargs": {"max_gen_toks": 2}, "predict_only": True,
                                   "output_path": str(tmp_path / "run")}))
    assert run_cli(["sweep", cfg, "--quiet"]) == 0, capsys.readouterr().err
    docs = _cells(tmp_path / "run")
    assert len(docs) == 2 and all(d["run"]["batch_size"] == 16 and d["predict_only"] for d in docs)
    assert all(d["metrics"] == {"capitals": {}} for d in docs)
    assert "predict only" in (tmp_path / "run" / "report.md").read_text()
