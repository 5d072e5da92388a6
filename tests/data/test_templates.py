"""Prompt templates: built-in names, format strings, chat templates rendered as Hugging Face does."""

import json

import pytest

from tsched.data import templates

# Qwen3-style, with indented block tags between literal lines (so trim_blocks / lstrip_blocks decide the
# whitespace), a role check through raise_exception, tools / tojson, and the enable_thinking switch.
QWEN_STYLE = """{% for message in messages %}
    {% if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message.role) }}
    {% endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
    {% if enable_thinking is defined and enable_thinking is false %}
<think>

</think>

    {% endif %}
{% endif %}
{% if tools is not none %}{{ tools | tojson }}{% endif %}"""

PROBLEM = r"Find $x$ if $2x = \frac{1}{2}$ & x > 0."


def test_plain_and_boxed():
    assert templates.render("plain", PROBLEM) == PROBLEM
    assert templates.render("boxed", PROBLEM) == (
        PROBLEM + "\nPlease reason step by step, and put your final answer within \\boxed{}.")


def test_format_template_keeps_other_braces():
    t = r"Q: {problem}\nA (in \boxed{}):"
    assert templates.render(t, "1+1?") == r"Q: 1+1?\nA (in \boxed{}):"


@pytest.mark.parametrize("bad", ["qwen", "", "Problem: {question}"])
def test_unknown_template_names_the_field_and_the_allowed_values(bad):
    with pytest.raises(ValueError, match=r"data\.template.*plain, boxed, chat.*\{problem\}"):
        templates.render(bad, PROBLEM)


def test_chat_renders_the_boxed_prompt_as_one_user_turn():
    boxed = templates.render("boxed", PROBLEM)
    expected_think = f"<|im_start|>user\n{boxed}<|im_end|>\n<|im_start|>assistant\n"
    assert templates.render("chat", PROBLEM, QWEN_STYLE, thinking=True) == expected_think
    assert templates.render("chat", PROBLEM, QWEN_STYLE) == expected_think + "<think>\n\n</think>\n\n"


def test_chat_errors():
    with pytest.raises(ValueError, match="needs the checkpoint's chat template"):
        templates.render("chat", PROBLEM)
    with pytest.raises(ValueError, match="boom"):
        templates.render("chat", PROBLEM, "{{ raise_exception('boom') }}")
    with pytest.raises(ValueError, match="render"):  # the sandbox refuses to reach Python internals
        templates.render("chat", PROBLEM, "{{ messages.__class__.__mro__ }}")


def tiny_hf_tokenizer(chat_template):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([PROBLEM, "Please reason step by step"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>")
    tok.chat_template = chat_template
    return tok


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_matches_transformers_apply_chat_template(tmp_path, thinking):
    pytest.importorskip("transformers")
    tok = tiny_hf_tokenizer(QWEN_STYLE)
    messages = [{"role": "user", "content": templates.render("boxed", PROBLEM)}]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    assert templates.render("chat", PROBLEM, QWEN_STYLE, thinking=thinking) == want
    # and the template read back from what transformers saves
    tok.save_pretrained(tmp_path)
    assert templates.render("chat", PROBLEM, templates.load_chat_template(str(tmp_path)), thinking=thinking) == want


def test_special_tokens_reach_the_template_as_in_transformers(tmp_path):
    pytest.importorskip("transformers")
    llama_style = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
    tok = tiny_hf_tokenizer(llama_style)
    tok.add_special_tokens({"bos_token": "<|im_start|>"})
    messages = [{"role": "user", "content": templates.render("boxed", PROBLEM)}]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tok.save_pretrained(tmp_path)
    tokens = templates.load_special_tokens(str(tmp_path))
    assert tokens["bos_token"] == "<|im_start|>" and tokens["eos_token"] == "<|im_end|>"
    assert templates.render("chat", PROBLEM, llama_style, special_tokens=tokens) == want
    assert want.startswith("<|im_start|>[user] ")


def test_load_chat_template_sources(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    assert templates.load_chat_template(str(tmp_path)) == "from config"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default one"}]}))
    assert templates.load_chat_template(str(tmp_path)) == "default one"
    assert templates.load_chat_template(str(tmp_path), "tool_use") == "tools"
    with pytest.raises(ValueError, match="no chat template named 'rag'.*default.*tool_use"):
        templates.load_chat_template(str(tmp_path), "rag")
    (tmp_path / "chat_template.jinja").write_text("from jinja file")
    assert templates.load_chat_template(str(tmp_path)) == "from jinja file"  # the separate file wins, as in HF
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="no chat template"):
        templates.load_chat_template(str(empty))
