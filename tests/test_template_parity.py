"""Every built-in template that stands for a model family encodes exactly like that family's own chat
template: a tokenizer carrying the family's special tokens and `chat_template` (the text shipped in the
model's tokenizer_config.json) gives the same input_ids through `apply_chat_template` as through
tunepipe, single- and multi-turn, and tunepipe's labels cover exactly the assistant answers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from tunepipe.runtime import chat_template as ct  # noqa: E402
from tunepipe.runtime import template_registry  # noqa: E402

# The families' chat templates, verbatim from their tokenizer_config.json (vicuna, baichuan,
# baichuan2 and internlm ship none: theirs are written from the formats their own code builds).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI35 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)
DEEPSEEK = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
DEEPSEEK3 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)
YI = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% endif %}"
    "{% if system_message is defined %}{{ system_message }}{% endif %}{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'user' %}{{ '<|im_start|>user\\n' + content + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
)
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
INTERNLM2 = (
    "{% if messages[0]['role'] == 'user' or messages[0]['role'] == 'system' %}{{ bos_token }}{% endif %}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% elif messages[-1]['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
)
CHATGLM3 = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CPM = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{'<用户>' + message['content'].strip() + '<AI>'}}"
    "{% else %}{{message['content'].strip()}}{% endif %}{% endfor %}"
)
# FastChat's vicuna_v1.1 conversation: "SYSTEM USER: q ASSISTANT: a</s>USER: …"
VICUNA = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    '{% else %}{% set sys = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, '
    "detailed, and polite answers to the user's questions.\" %}{% set loop_messages = messages %}{% endif %}{{ sys + ' ' }}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Baichuan2's build_chat_input / fine-tune.py: <reserved_106>q<reserved_107>a … and eos closing the conversation.
BAICHUAN2 = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<reserved_106>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<reserved_107>' + m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<reserved_107>' }}{% else %}{{ eos_token }}{% endif %}"
)
BAICHUAN = BAICHUAN2.replace("reserved_106", "reserved_102").replace("reserved_107", "reserved_103")
# InternLM-chat v1's build_inputs: "<|User|>:q<eoh>\n<|Bot|>:a<eoa>\n" after bos.
INTERNLM = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|System|>:' + m['content'] + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<|User|>:' + m['content'] + '<eoh>\n' }}{% else %}{{ '<|Bot|>:' + m['content'] + '<eoa>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|Bot|>:' }}{% endif %}"
)

IM = ["<|im_start|>", "<|im_end|>"]
# template name: (chat_template, special tokens, bos, eos, has system prompts, sentencepiece-style pre-tokenizer)
FAMILIES = {
    "chatml": (CHATML, IM, None, "<|im_end|>", True, False),
    "qwen": (QWEN25, IM + ["<|endoftext|>"], None, "<|im_end|>", True, False),
    "qwen3": (QWEN3, IM + ["<|endoftext|>"], None, "<|im_end|>", True, False),
    "llama2": (LLAMA2, ["<s>", "</s>"], "<s>", "</s>", True, True),
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        True,
        False,
    ),
    "mistral": (MISTRAL, ["<s>", "</s>"], "<s>", "</s>", False, True),
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", False, True),
    "phi3": (
        PHI35,
        ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "<s>",
        "<|endoftext|>",
        True,
        False,
    ),
    "deepseek": (
        DEEPSEEK,
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        True,
        False,
    ),
    "deepseek3": (
        DEEPSEEK3,
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        True,
        False,
    ),
    "yi": (YI, IM + ["<|startoftext|>", "<|endoftext|>"], "<|startoftext|>", "<|im_end|>", True, False),
    "zephyr": (ZEPHYR, ["<s>", "</s>"], "<s>", "</s>", True, False),
    "internlm2": (INTERNLM2, IM + ["<s>", "</s>"], "<s>", "</s>", True, False),
    "chatglm3": (
        CHATGLM3,
        ["[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
        None,
        "</s>",
        True,
        False,
    ),
    "cpm": (CPM, ["<s>", "</s>", "<用户>", "<AI>"], "<s>", "</s>", True, False),
    "vicuna": (VICUNA, ["<s>", "</s>"], "<s>", "</s>", True, True),
    "baichuan": (BAICHUAN, ["<s>", "</s>", "<reserved_102>", "<reserved_103>"], "<s>", "</s>", False, False),
    "baichuan2": (BAICHUAN2, ["<s>", "</s>", "<reserved_106>", "<reserved_107>"], "<s>", "</s>", False, False),
    "internlm": (
        INTERNLM,
        ["<s>", "</s>", "<eoh>", "<eoa>", "<|User|>", "<|Bot|>", "<|System|>"],
        "<s>",
        "</s>",
        True,
        False,
    ),
}
FAMILY_IS_SP = {f[0]: f[5] for f in FAMILIES.values()}
# Families whose chat template ends a conversation without an eos that their own fine-tuning code
# appends (and tunepipe trains, as the template's suffix).
APPENDS_EOS = {"chatglm3", "cpm"}
# Families whose registry template trains the stop word opening the turn after an answer (their next
# role token) as the answer's end; their Jinja chat templates do not mark it, so `auto` masks it.
STOP_TRAINED = {"chatglm3", "cpm", "baichuan", "baichuan2"}
# Families without a chat template of their own: checked against their generated Jinja only.
GENERIC = ["default", "alpaca", "empty"]

CORPUS = [
    "Hello! How are you today? I am fine, thank you very much.",
    "What is 12 plus 30? It is 42. The answer is forty-two.",
    "Who made you? I was trained by tunepipe, a tiny pipeline.",
    "Tell me a story about a fox and a river in the morning.",
    "Name three colours: red, green and blue. 你好，世界！",
    "Write code: def add(a, b):\n    return a + b\n",
] * 20
SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly."}
TURNS = [
    ("Who made you?", "I was trained by tunepipe."),
    ("What is 12 plus 30?", "It is 42.\nThe answer is  forty-two."),
    ("Write code: add two numbers", "def add(a, b):\n    return a + b"),
    ("Say hello in Chinese", "你好，世界！"),
]


def conversation(n_turns: int, system: bool) -> list[dict]:
    messages = [SYSTEM] if system else []
    for q, a in TURNS[:n_turns]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


@pytest.fixture(scope="module")
def base_tokenizers():
    """Two small BPEs trained on the corpus: byte-level (GPT/Llama-3/Qwen style) and a
    sentencepiece-style one (Metaspace, as Llama-2/Mistral/Gemma)."""
    byte = Tokenizer(models.BPE())
    byte.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte.decoder = decoders.ByteLevel()
    byte.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    sp = Tokenizer(models.BPE(byte_fallback=False, unk_token="<unk>"))
    sp.normalizer = normalizers.Sequence([normalizers.Replace(" ", "▁")])
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    sp.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"], show_progress=False))
    return {"byte": byte.to_str(), "sp": sp.to_str()}


def family_tokenizer(base_tokenizers, name: str) -> PreTrainedTokenizerFast:
    chat_template, specials, bos, eos, _, sentencepiece = FAMILIES[name]
    backend = Tokenizer.from_str(base_tokenizers["sp" if sentencepiece else "byte"])
    tokens = list(dict.fromkeys(specials + [t for t in (bos, eos) if t]))
    backend.add_special_tokens(tokens)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, chat_template=chat_template)


def reference_ids(tokenizer, messages, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tunepipe_encode(tokenizer, template: str, messages, tools=None) -> ct.Encoded:
    renderer, _ = ct.resolve({"template": template}, tokenizer, None)
    return ct.encode(tokenizer, renderer, [{"messages": messages, "tools": tools}], cutoff_len=100_000)[0]


def text_of(tokenizer, ids: list[int]) -> str:
    """The exact text of some tokens (decode() would drop a sentencepiece-style leading space)."""
    if FAMILY_IS_SP.get(tokenizer.chat_template):
        return "".join(tokenizer.convert_ids_to_tokens(ids)).replace("▁", " ")
    return tokenizer.decode(ids)


def trained_runs(encoded: ct.Encoded) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(encoded.input_ids.tolist(), encoded.labels.tolist()):
        if label != ct.IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_registry_has_at_least_20_templates_and_every_family_is_checked():
    names = set(template_registry.template_names()) - {"auto"}
    assert len(names) >= 20
    assert names == set(FAMILIES) | set(GENERIC)
    for name in names:
        assert (template_registry.get(name)["mirrors"] is not None) == (name in FAMILIES) or name in (
            "baichuan",
            "baichuan2",
            "internlm",
        )


CASES = [
    (name, turns, system)
    for name in FAMILIES
    for turns in (1, 3)
    for system in (False, True)
    if FAMILIES[name][4] or not system
]


@pytest.mark.parametrize("name,turns,system", CASES, ids=[f"{n}-{t}turn{'-sys' if s else ''}" for n, t, s in CASES])
def test_input_ids_equal_apply_chat_template(base_tokenizers, name, turns, system):
    tokenizer = family_tokenizer(base_tokenizers, name)
    messages = conversation(turns, system)
    encoded = tunepipe_encode(tokenizer, name, messages)
    reference = reference_ids(tokenizer, messages) + ([tokenizer.eos_token_id] if name in APPENDS_EOS else [])
    assert encoded.input_ids.tolist() == reference

    # labels: one trained run per answer, each decoding to the template's answer slot for it
    slots = template_registry.get(name)
    runs = trained_runs(encoded)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    for i, (run, answer) in enumerate(zip(runs, answers)):
        expected = slots["assistant"].replace("{{content}}", answer.strip() if slots.get("strip_content") else answer)
        if i == len(answers) - 1:
            expected += slots.get("suffix") or ""
        else:  # a stop word opening the next (user) turn is trained as this answer's end
            expected += next((w for w in slots["stop_words"] if slots["user"].startswith(w)), "")
        expected = expected.replace("{{eos_token}}", eos).replace("{{bos_token}}", bos)
        assert text_of(tokenizer, run) == expected
    # every other token is masked, and the generation prompt is the reference's
    assert int((encoded.labels != ct.IGNORE).sum()) == sum(len(r) for r in runs)
    prompt = messages[:-1]
    assert ct.encode_prompt(tokenizer, ct.resolve({"template": name}, tokenizer, None)[1], prompt) == reference_ids(
        tokenizer, prompt, add_generation_prompt=True, **({"enable_thinking": False} if name == "qwen3" else {})
    )


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "qwen3"])
def test_auto_template_masks_like_the_registry(base_tokenizers, name):
    """`template: auto` (spans found by rendering prefixes with the tokenizer's own template) and the
    registry slots are independent ways to find the answers: they must agree."""
    tokenizer = family_tokenizer(base_tokenizers, name)
    messages = conversation(3, FAMILIES[name][4])
    by_slots = tunepipe_encode(tokenizer, name, messages)
    by_jinja = tunepipe_encode(tokenizer, "auto", messages)
    n = len(by_slots.input_ids) - (name in APPENDS_EOS)  # the eos the family's chat template lacks
    expected = by_slots.labels[:n].copy()
    if name in STOP_TRAINED:
        stop_ids = [tokenizer.convert_tokens_to_ids(w) for w in template_registry.get(name)["stop_words"]]
        expected[np.isin(expected, stop_ids)] = ct.IGNORE
    assert by_jinja.input_ids.tolist() == by_slots.input_ids[:n].tolist()
    assert by_jinja.labels.tolist() == expected.tolist()


def test_qwen3_masks_the_empty_think_block(base_tokenizers):
    tokenizer = family_tokenizer(base_tokenizers, "qwen3")
    encoded = tunepipe_encode(tokenizer, "qwen3", conversation(2, False))
    runs = [tokenizer.decode(r) for r in trained_runs(encoded)]
    assert runs == ["I was trained by tunepipe.<|im_end|>\n", "It is 42.\nThe answer is  forty-two.<|im_end|>\n"]
    assert "<think>\n\n</think>\n\n<|im_start|>" not in tokenizer.decode(encoded.input_ids)
    assert tokenizer.decode(encoded.input_ids).endswith(
        "assistant\n<think>\n\n</think>\n\nIt is 42.\nThe answer is  forty-two.<|im_end|>\n"
    )


@pytest.mark.parametrize("name", ["qwen", "qwen3"])
def test_tool_calls_equal_apply_chat_template(base_tokenizers, name):
    tokenizer = family_tokenizer(base_tokenizers, name)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Add two numbers",
                "parameters": {"type": "object", "properties": {"a": {"type": "number"}}},
            },
        }
    ]
    call = {"name": "add", "arguments": {"a": 12, "b": 30}}
    ours = [
        {"role": "user", "content": "What is 12 plus 30?"},
        {"role": "function", "content": json.dumps(call)},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "It is 42."},
    ]
    theirs = [
        ours[0],
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        ours[2],
        ours[3],
    ]
    encoded = tunepipe_encode(tokenizer, name, ours, tools=json.dumps(tools))
    assert encoded.input_ids.tolist() == reference_ids(tokenizer, theirs, tools=tools)
    runs = [tokenizer.decode(r) for r in trained_runs(encoded)]
    assert runs == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call><|im_end|>\n',
        "It is 42.<|im_end|>\n",
    ]


@pytest.mark.parametrize("name", sorted(FAMILIES) + GENERIC)
def test_generated_jinja_reproduces_the_template(base_tokenizers, name):
    """The chat_template saved with the artifact's tokenizer renders what tunepipe trained on."""
    tokenizer = family_tokenizer(base_tokenizers, name if name in FAMILIES else "chatml")
    renderer, _ = ct.resolve({"template": name}, tokenizer, None)
    for messages in (conversation(3, False), conversation(2, True)):
        trained_text = "".join(t for t, _ in renderer.segments(messages))
        assert (
            tokenizer.apply_chat_template(messages, tokenize=False, chat_template=renderer.to_jinja()) == trained_text
        )
        assert tokenizer.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True, chat_template=renderer.to_jinja()
        ) == renderer.prompt(messages[:-1])


def test_truncation_keeps_whole_tokens_and_balance(base_tokenizers):
    tokenizer = family_tokenizer(base_tokenizers, "llama3")
    messages = conversation(3, True)
    full = tunepipe_encode(tokenizer, "llama3", messages)
    renderer, _ = ct.resolve({"template": "llama3"}, tokenizer, None)
    cut = ct.encode(tokenizer, renderer, [{"messages": messages}], cutoff_len=40)[0]
    assert cut.truncated and len(cut.input_ids) == 40
    # what remains is the head of each kept part: a subsequence of the full ids, special tokens intact
    ids, labels = full.input_ids.tolist(), full.labels.tolist()
    it = iter(zip(ids, labels))
    assert all(any(pair == (i, l) for pair in it) for i, l in zip(cut.input_ids.tolist(), cut.labels.tolist()))
    assert (cut.labels != ct.IGNORE).sum() > 0 and (cut.labels == ct.IGNORE).sum() > 0
    assert ct.infer_seqlen(100, 10, 40) == (30, 10)  # short answer kept whole
    assert ct.infer_seqlen(10, 100, 40) == (10, 30)  # short prompt kept whole
    assert ct.infer_seqlen(60, 40, 50) == (30, 20)  # both cut in proportion


def test_labels_are_int32_and_masked_with_minus_100(base_tokenizers):
    tokenizer = family_tokenizer(base_tokenizers, "chatml")
    encoded = tunepipe_encode(tokenizer, "chatml", conversation(1, False))
    assert encoded.input_ids.dtype == np.int32 and encoded.labels.dtype == np.int32
    assert set(encoded.labels[encoded.labels < 0].tolist()) == {-100}
