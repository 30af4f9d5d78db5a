"""mneme's C chat templates against the real Jinja templates rendered by jinja2.

The SmolLM2 template is read from the real GGUF (tokenizer.chat_template) with the
`gguf` package; the Llama 3, Llama 2 and Mistral templates are the chat_template
strings of meta-llama/Meta-Llama-3-8B-Instruct, meta-llama/Llama-2-7b-chat-hf and
mistralai/Mistral-7B-Instruct-v0.2 (later revision, also Mixtral-8x7B-Instruct-v0.1),
as JSON-decoded from their tokenizer_config.json. Each is rendered the way
transformers' apply_chat_template does (sandboxed environment, trim_blocks,
lstrip_blocks, raise_exception) and compared byte for byte with tests/tools/chat_render.

Needs: jinja2, gguf (PyPI). Model: env MNEME_MODEL, else $MNEME_MODELS or
~/.cache/mneme /SmolLM2-135M-Instruct.Q4_1.gguf; missing model fails unless
MNEME_ALLOW_NO_MODEL=1.
"""
import os
import subprocess
from pathlib import Path

import jinja2
import jinja2.sandbox
import pytest

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

SPECIAL = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama2": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "chatml": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
}

CONVERSATIONS = [
    [("user", "Hello!")],
    [("system", "You are a pirate."), ("user", "Hi")],
    [("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?")],
    [("system", " Be terse. "), ("user", "  padded  \n"), ("assistant", " sure "),
     ("user", "tabs\tand\nnewlines\r\n")],
    [("user", "h\u00e9llo \U0001F600 \u00a0nbsp\u3000"), ("assistant", "\u2028ok\u2003"), ("user", "\x1f.\x0b")],
    [("user", "a\\b 'q' \"dq\" {{ not jinja }} {% raw %} [INST] <<SYS>>")],
    [("system", ""), ("user", "empty system")],
]


def build_dir():
    return Path(os.environ.get("MNEME_BUILD_DIR", "/work/main/build"))


def model_path():
    if os.environ.get("MNEME_MODEL"):
        return Path(os.environ["MNEME_MODEL"])
    base = os.environ.get("MNEME_MODELS") or os.path.expanduser("~/.cache/mneme")
    return Path(base) / MODEL_NAME


def smollm2_template():
    p = model_path()
    if not p.exists():
        if os.environ.get("MNEME_ALLOW_NO_MODEL") == "1":
            pytest.skip(f"model {p} not found (MNEME_ALLOW_NO_MODEL=1)")
        pytest.fail(f"model {p} not found: set MNEME_MODEL (or MNEME_ALLOW_NO_MODEL=1)")
    import gguf
    r = gguf.GGUFReader(str(p))
    f = r.fields["tokenizer.chat_template"]
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def jinja_render(template, conv, gen, special):
    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    msgs = [{"role": r, "content": c} for r, c in conv]
    return env.from_string(template).render(messages=msgs, add_generation_prompt=gen, **special)


def escape(s):
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def c_render(tmp_path, template, conv, gen):
    tool = build_dir() / "chat_render"
    assert tool.exists(), f"{tool} not built"
    tf = tmp_path / "template.jinja"
    tf.write_bytes(template.encode("utf-8"))
    mf = tmp_path / "messages.txt"
    mf.write_bytes("".join(f"{r}\t{escape(c)}\n" for r, c in conv).encode("utf-8"))
    args = [str(tool), str(tf), str(mf)] + (["--gen"] if gen else [])
    return subprocess.run(args, capture_output=True)


def c_info(tmp_path, template):
    tf = tmp_path / "template.jinja"
    tf.write_bytes(template.encode("utf-8"))
    p = subprocess.run([str(build_dir() / "chat_render"), str(tf), "--info"], capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    kind, _, default = p.stdout.decode("utf-8").partition("\n")
    return kind, default


def check_family(tmp_path, template, kind):
    got_kind, _ = c_info(tmp_path, template)
    assert got_kind == kind
    n = 0
    # an empty conversation breaks the [INST] templates' messages[0] in jinja itself
    extra = [[]] if kind in ("chatml", "llama3") else []
    for conv in CONVERSATIONS + extra:
        for gen in (True, False):
            want = jinja_render(template, conv, gen, SPECIAL[kind])
            p = c_render(tmp_path, template, conv, gen)
            assert p.returncode == 0, p.stderr.decode()
            assert p.stdout == want.encode("utf-8"), f"{kind} {conv} gen={gen}:\n{p.stdout!r}\n{want!r}"
            n += 1
    return n


def test_smollm2_real_template(tmp_path):
    template = smollm2_template()
    kind, default = c_info(tmp_path, template)
    assert kind == "chatml"
    # the default system message is what jinja inserts before a user-only conversation
    rendered = jinja_render(template, [("user", "x")], False, SPECIAL["chatml"])
    head = "<|im_start|>system\n"
    assert rendered.startswith(head)
    assert rendered[len(head):rendered.index("<|im_end|>")] == default
    assert check_family(tmp_path, template, "chatml") == 2 * (len(CONVERSATIONS) + 1)


def test_llama3_template(tmp_path):
    check_family(tmp_path, LLAMA3, "llama3")


def test_llama2_template(tmp_path):
    check_family(tmp_path, LLAMA2, "llama2")


def test_mistral_template(tmp_path):
    check_family(tmp_path, MISTRAL, "mistral")


@pytest.mark.parametrize("template,kind", [(LLAMA2, "llama2"), (MISTRAL, "mistral")])
def test_inst_role_errors_agree(tmp_path, template, kind):
    # conversations the [INST] templates refuse with raise_exception: mneme refuses them too
    for conv in ([("user", "a"), ("user", "b")], [("assistant", "a")],
                 [("system", "s"), ("assistant", "a")], [("user", "a"), ("assistant", "b"), ("system", "c")]):
        with pytest.raises(jinja2.exceptions.TemplateError):
            jinja_render(template, conv, True, SPECIAL[kind])
        p = c_render(tmp_path, template, conv, True)
        assert p.returncode == 2 and b"messages[" in p.stderr, (conv, p.stderr)
