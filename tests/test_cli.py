import subprocess
import sys

import pytest

from conftest import cli_error, run_cli


def test_version_and_help_examples(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["--version"])
    assert e.value.code == 0
    assert "llmmem" in capsys.readouterr().out
    from llmmem.cli import COMMANDS, build_parser

    parser = build_parser()
    for name in COMMANDS:
        sub = parser._subparsers._group_actions[0].choices[name]
        assert "examples:" in sub.format_help() and "llmmem " in sub.format_help().split("examples:")[1]


def test_import_and_ls_do_not_import_torch():
    code = ("import sys; from llmmem.cli import main; main(['ls', 'models']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m" in out.stdout


def test_generate_on_local_checkpoint(llama_dir, capsys):
    rc = run_cli(["generate", "--model", llama_dir, "--prompt", "The capital of France is",
                  "--max_gen_toks", "4", "--quiet", "--model_args", "device=cpu,dtype=float32"])
    out = capsys.readouterr().out
    assert rc == 0 and out.strip()


def _bad(args, capsys, *needles):
    return cli_error(capsys, args, *needles)


def test_missing_path(capsys, tmp_path):
    _bad(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], capsys, "does not exist")


def test_hub_id_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from llmmem import presets as models

    models.hub_reachable.cache_clear()
    _bad(["generate", "--model", "someorg/somemodel", "--prompt", "x"], capsys, "unreachable", "preset")


def test_unknown_preset_lists_presets(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from llmmem import presets as models

    models.hub_reachable.cache_clear()
    _bad(["generate", "--model", "smollm-999", "--prompt", "x"], capsys, "smollm2-135m")
    _bad(["fetch", "smollm-999"], capsys, "unknown preset", "smollm2-135m")


def test_dir_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _bad(["generate", "--model", str(tmp_path / "empty"), "--prompt", "x"], capsys, "no config.json")


def test_encoder_only_model(capsys, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    _bad(["generate", "--model", str(tmp_path / "bert"), "--prompt", "x"], capsys, "encoder-only")


@pytest.mark.parametrize("margs,needle", [
    ("dtype", "not key=value"),
    ("flavour=x", "unknown key"),
    ("dtype=float17", "float17"),
])
def test_malformed_model_args(capsys, llama_dir, margs, needle):
    _bad(["generate", "--model", llama_dir, "--model_args", margs, "--prompt", "x"], capsys, needle)


def test_cuda_without_cuda(capsys, llama_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _bad(["generate", "--model", llama_dir, "--model_args", "device=cuda", "--prompt", "x"], capsys, "CUDA")


def test_batch_size_zero(capsys, llama_dir):
    _bad(["generate", "--model", llama_dir, "--batch_size", "0", "--prompt", "x"], capsys, "batch_size")


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["generate", "--model", "m"])  # --prompt missing
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    _bad(["generate", "--prompt", "x"], capsys, "no model given", "--model", "pretrained=")


def test_fetch_is_one_line_when_not_a_terminal(tmp_path, monkeypatch, capfd):
    """`llmmem fetch` into a log: no progress bars, no progress lines, one summary line."""
    import logging

    from llmmem import presets
    from llmmem.cli import main
    from llmmem.progress import progress

    def fake_fetch(dest, quiet):
        log = logging.getLogger("llmmem.presets")
        for i in progress(range(50), desc="download", quiet=quiet):
            log.info("step %d", i)
        from huggingface_hub.utils import are_progress_bars_disabled
        from tqdm.auto import tqdm  # a library's own bar (hub downloads, transformers' shard writer)
        for _ in tqdm(range(50), desc="library bar", disable=are_progress_bars_disabled()):
            pass
        dest.mkdir(parents=True)
        (dest / "config.json").write_text("{}")

    monkeypatch.setenv("LLMMEM_HOME", str(tmp_path))
    monkeypatch.setitem(presets.PRESETS._entries, "fake", presets.PRESETS._entries["testbed"].__class__(
        "fake", presets.Preset("fake", "a test preset", None, fake_fetch), "fake"))
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = []  # as in a fresh process: cli.main's basicConfig writes INFO lines to stderr
    try:
        assert main(["fetch", "fake"]) == 0
        out, err = capfd.readouterr()
        assert main(["fetch", "fake"]) == 0
        again, err2 = capfd.readouterr()
    finally:
        root.handlers[:] = saved
    assert err.strip() == "" and err2.strip() == "", err + err2
    assert len(out.splitlines()) == 1 and "fake ->" in out, out
    assert "already there" in again
