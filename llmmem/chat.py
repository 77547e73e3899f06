"""Chat templates (``--apply_chat_template [TEMPLATE]``), as lm-evaluation-harness applies them.

lm-eval renders a prompt's messages with ``HFLM.apply_chat_template`` (``lm_eval/models/huggingface.py``):
``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
continue_final_message=False)``, retried without the system message when the template raises a Jinja
``TemplateError`` (templates that refuse a system role). :func:`chat_renderer` does the same; a template
name picks one of a tokenizer's named templates (lm-eval 0.4.13 records the name but renders the tokenizer's
default template; llmmem renders the one named). The rendered text is tokenized as lm-eval tokenizes it: no
special tokens are added when it already starts with the BOS token (``TokenizedBackend.encode``), so a
template that writes BOS does not get a second one.

Which suites use it: recall and icl build chat prompts (their few-shot prompts are lm-eval's). Extraction
and membership inference score raw text (a document's prefix and its true continuation, a candidate
member text): there is no instruction to wrap, and memorization is a property of the raw text, so they
ignore the chat template (and the system instruction), as lm-eval's ``loglikelihood_rolling`` tasks do.
"""

from __future__ import annotations

import logging

from llmmem.config import ConfigError

log = logging.getLogger(__name__)

CHAT_SUITES = ("recall", "icl")  # the suites whose prompts a chat template changes


def template_names(tok) -> list[str] | None:
    """The names of a tokenizer's templates when it has several (a dict), else None."""
    t = getattr(tok, "chat_template", None)
    return sorted(t) if isinstance(t, dict) else None


def check_template(tok, template, model: str = "the model") -> None:
    """Raise ConfigError when ``template`` (True or a name) cannot be applied with ``tok``."""
    if not template:
        return
    current = getattr(tok, "chat_template", None)
    if not current:
        raise ConfigError(f"apply_chat_template: {model} has no chat template (its tokenizer defines none); "
                          f"leave --apply_chat_template out for a base model")
    names = template_names(tok)
    if isinstance(template, str):
        if names is None:
            raise ConfigError(f"apply_chat_template={template!r}: {model} has one chat template, not named ones; "
                              f"give --apply_chat_template without a name")
        if template not in names:
            raise ConfigError(f"apply_chat_template={template!r}: {model} has no template of that name; "
                              f"choose from: {', '.join(names)}")
    elif names is not None and "default" not in names:
        raise ConfigError(f"apply_chat_template: {model} has several chat templates and none is 'default'; "
                          f"name one: --apply_chat_template NAME (one of: {', '.join(names)})")


def template_text(tok, template) -> str | None:
    """The Jinja text of the template ``template`` selects (recorded in results, as lm-eval's ``chat_template``)."""
    if not template:
        return None
    current = getattr(tok, "chat_template", None)
    if isinstance(current, dict):
        return current.get(template if isinstance(template, str) else "default")
    return current


def chat_renderer(tok, template=True):
    """``messages -> prompt text``: lm-eval's ``HFLM.apply_chat_template`` with the generation prompt."""
    check_template(tok, template)
    import jinja2

    kwargs = {"tokenize": False, "add_generation_prompt": True, "continue_final_message": False}
    if isinstance(template, str):
        kwargs["chat_template"] = template
    warned = []

    def render(messages: list[dict]) -> str:
        try:
            return tok.apply_chat_template(messages, **kwargs)
        except jinja2.exceptions.TemplateError:
            if not any(m["role"] == "system" for m in messages):
                raise
            if not warned:
                log.warning("the chat template refused a system message; rendering without it (as lm-eval)")
                warned.append(True)
            return tok.apply_chat_template([m for m in messages if m["role"] != "system"], **kwargs)

    return render


def check_model_template(model_spec, template) -> None:
    """Before any model loads: the model's tokenizer has the chat template asked for (tokenizer files only)."""
    if not template:
        return
    from llmmem.models import load_tokenizer, resolve

    src = resolve(model_spec)
    common = {"trust_remote_code": model_spec.trust_remote_code}
    if model_spec.revision:
        common["revision"] = model_spec.revision
    if src.gguf_file:
        common["gguf_file"] = src.gguf_file
    tok = load_tokenizer(src, common)
    check_template(tok, template, f"model {model_spec.display_name!r}")
