"""Prompt templates (`data.template`): how a problem's text becomes the prompt the model continues.

- `plain`: the problem as it is (the built-in tasks, models trained here from scratch).
- `boxed`: the problem, a newline, then BOXED_INSTRUCTION, the instruction math-tuned checkpoints
  (Qwen2.5-Math, DeepSeek-R1 distills) were trained and evaluated with; pairs with the `math` verifier.
- `chat`: the checkpoint's own chat template (jinja, from `load_chat_template`) applied to one user
  message holding the `boxed` prompt, with the generation prompt, as Hugging Face's
  `apply_chat_template(..., add_generation_prompt=True, tokenize=False)` renders it;
  `thinking` is passed as `enable_thinking` (Qwen3 templates close an empty think block when False).
- any other string containing `{problem}`: a format template; `{problem}` is replaced and every other
  character (LaTeX braces included) is kept as written.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Mapping

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
NAMES = ("plain", "boxed", "chat")


def render(template: str, problem: str, chat_template: str | None = None, thinking: bool = False,
           special_tokens: Mapping[str, str] | None = None) -> str:
    """The prompt text for `problem` under `template` (module docstring); ValueError for an unknown
    template name, or `chat` without a chat template. `special_tokens` (`load_special_tokens`) are the
    template variables `bos_token`, `eos_token`, ... (Llama-style templates start with `bos_token`)."""
    if template == "plain":
        return problem
    if template == "boxed":
        return f"{problem}\n{BOXED_INSTRUCTION}"
    if template == "chat":
        if not chat_template:
            raise ValueError("config field 'data.template' = 'chat' needs the checkpoint's chat template "
                             "(tokenizer_config.json 'chat_template' or chat_template.jinja); none was given")
        import jinja2

        messages = [{"role": "user", "content": render("boxed", problem)}]
        try:
            # tools / documents: None, as transformers passes them, for templates that test `tools is none`
            return _compile(chat_template).render(messages=messages, tools=None, documents=None,
                                                  add_generation_prompt=True, enable_thinking=thinking,
                                                  **(special_tokens or {}))
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed to render: {e}") from e
    if "{problem}" in template:
        return template.replace("{problem}", problem)
    raise ValueError(f"config field 'data.template' = {template!r}: allowed values are {', '.join(NAMES)}, "
                     "or a format string containing {problem}")


@functools.lru_cache(maxsize=8)
def _compile(chat_template: str):
    """The template compiled in the environment Hugging Face renders chat templates in: sandboxed
    (templates ship with checkpoints: untrusted code), trim_blocks / lstrip_blocks, loop controls, and
    the helpers templates call (`raise_exception`, `tojson` without HTML escaping, `strftime_now`)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(chat_template)


def load_chat_template(model_dir: str, name: str = "default") -> str:
    """The chat template of a Hugging Face checkpoint directory.

    Looked up as transformers does: `chat_template.jinja` (or `chat_templates/<name>.jinja` for a
    named one) first, else `tokenizer_config.json`'s `chat_template`, a string or a list of
    `{"name": ..., "template": ...}` entries. ValueError if there is none.
    """
    jinja_file = (os.path.join(model_dir, "chat_template.jinja") if name == "default"
                  else os.path.join(model_dir, "chat_templates", f"{name}.jinja"))
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    config_file = os.path.join(model_dir, "tokenizer_config.json")
    value = None
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            value = json.load(f).get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if name not in named:
            raise ValueError(f"{config_file}: no chat template named {name!r} (has {sorted(map(str, named))})")
        value = named[name]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{model_dir}: no chat template (neither chat_template.jinja nor a 'chat_template' "
                         "in tokenizer_config.json); use data.template='boxed' or a format string")
    return value


def load_special_tokens(model_dir: str) -> dict[str, str]:
    """`{"bos_token": ..., "eos_token": ..., ...}` from `tokenizer_config.json` (a token there is a
    string or an `{"content": ...}` AddedToken entry), the variables transformers gives a chat
    template; {} if the file is absent."""
    config_file = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return {}
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    out = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out
