"""The chat template of the transformers-native export: our ChatML prompt, written by Jinja.

`chat_template(system_prompt, tokenizer)` returns a template that, given transformers' / OpenAI's messages, writes
the text whose tokens are the ids `dataset.conversation.build_prompt_ids` builds with `tokenizer` (any language
backbone's chat tokenizer, llm/) for the same conversation:

    <|im_start|>system\\n{system}<|im_end|>
    \\n<|im_start|>{role}\\n{content}<|im_end|>        (each message in turn)
    \\n<|im_start|>assistant\\n                          (add_generation_prompt)

- system: the first message if it is a system message, else the model's own system prompt (the one it was
  trained with, written into the template at export); an empty system message gives an empty system prompt.
- content: a string, or a list of {"type": "text", "text": ...} and {"type": "image"} (or "image_url") items.
  An image is the LLM's image token (`<|extra_0|>` for QWen v1, `<|image_pad|>` for Qwen2.5 / Qwen3; the
  processor expands it), placed as `infer.py` places images: when every image of a message comes before its
  text, each token is written on its own line ("<|image_pad|>\\n") in front of the text, as a prompt without
  `<image>` marks; otherwise tokens are written where the images are, with nothing added, as a prompt whose
  `<image>` marks stand at those places. Images only in user messages.
- the text of any special or added token of the tokenizer (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, the
  image token; QWen v1's `<|extra_0|>` ... `<|extra_204|>`; Qwen2.5's vision and tool tokens, Qwen3's `<think>`)
  in any message is refused with an error. Our prompt builder encodes message text as text (`encode_text` never
  gives a special id), so such text stays text; a template's output is one string in which typed and structural
  markers cannot be told apart, and every consumer (transformers, vLLM, SGLang) would turn typed ones into
  control tokens. Refusing keeps the export's prompts equal to ours or loudly absent, never silently different.

One known difference with our ids: message text that starts with white space containing a line break
("\\nWhat is it?") joins the "\\n" after the role into one token here (the text is tokenised as a whole),
whereas our builder encodes the role line and the content separately. The text is the same.
"""

from __future__ import annotations

import json

from llm import ChatTokenizer

_TEMPLATE = r"""
{%- macro refuse_special_text(text) -%}
  {%- for token in __SPECIAL_TOKENS__ -%}
    {%- if token in text -%}
      {{- raise_exception('message text contains the special token ' ~ token
                          ~ '; this model keeps typed text as text and refuses to turn it into a control token'
                          ~ ' (images are content items of type "image")') -}}
    {%- endif -%}
  {%- endfor -%}
{%- endmacro -%}

{%- macro write_content(message) -%}
  {%- if message['content'] is string -%}
    {{- refuse_special_text(message['content']) -}}
    {{- message['content'] -}}
  {%- else -%}
    {%- set state = namespace(text_seen=false, inline=false) -%}
    {%- for item in message['content'] -%}
      {%- if item['type'] == 'text' -%}
        {%- set state.text_seen = true -%}
      {%- elif item['type'] in ['image', 'image_url'] -%}
        {%- if message['role'] != 'user' -%}
          {{- raise_exception('images belong in user messages, not in a ' ~ message['role'] ~ ' message') -}}
        {%- endif -%}
        {%- if state.text_seen -%}
          {%- set state.inline = true -%}
        {%- endif -%}
      {%- else -%}
        {{- raise_exception('unsupported content item type: ' ~ item['type']) -}}
      {%- endif -%}
    {%- endfor -%}
    {%- for item in message['content'] -%}
      {%- if item['type'] == 'text' -%}
        {{- refuse_special_text(item['text']) -}}
        {{- item['text'] -}}
      {%- elif state.inline -%}
        {{- '__IMAGE_TAG__' -}}
      {%- else -%}
        {{- '__IMAGE_TAG__\n' -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}

{%- if messages and messages[0]['role'] == 'system' -%}
  {{- '__IM_START__system\n' ~ write_content(messages[0]) ~ '__IM_END__' -}}
{%- else -%}
  {{- '__IM_START__system\n' ~ __SYSTEM__ ~ '__IM_END__' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- if not loop.first -%}
      {{- raise_exception('a system message may only come first') -}}
    {%- endif -%}
  {%- elif message['role'] in ['user', 'assistant'] -%}
    {{- '\n__IM_START__' ~ message['role'] ~ '\n' ~ write_content(message) ~ '__IM_END__' -}}
  {%- else -%}
    {{- raise_exception('unsupported role: ' ~ message['role'] ~ ' (system, user and assistant only)') -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '\n__IM_START__assistant\n' -}}
{%- endif -%}
"""


def special_tokens(tokenizer: ChatTokenizer) -> list[str]:
    """The text of every special or added token of `tokenizer` (the ids `encode_text` never gives), by id."""
    return [tokenizer.decode([i]) for i in sorted(tokenizer.special_ids)]


def special_text_in(text: str, tokens: list[str]) -> str | None:
    """The first of `tokens` whose text occurs in `text` (what the template refuses), or None."""
    return next((token for token in tokens if token in text), None)


def chat_template(system_prompt: str, tokenizer: ChatTokenizer) -> str:
    """The Jinja chat template with `system_prompt` as the default system message (see the module docstring)."""
    tokens = special_tokens(tokenizer)
    found = special_text_in(system_prompt, tokens)
    if found:
        raise ValueError(f"the system prompt contains the special token {found}; it cannot be written as text")
    # Jinja literals: JSON's strings (escapes \n, \", \\, \u00XX for control characters) and lists are also Jinja's.
    replacements = {
        "__SPECIAL_TOKENS__": json.dumps(tokens, ensure_ascii=False),
        "__IM_START__": tokenizer.decode([tokenizer.im_start_id]),
        "__IM_END__": tokenizer.decode([tokenizer.im_end_id]),
        "__IMAGE_TAG__": tokenizer.image_token,
        "__SYSTEM__": json.dumps(system_prompt, ensure_ascii=False),
    }
    text = _TEMPLATE.strip() + "\n"
    for placeholder, value in replacements.items():
        text = text.replace(placeholder, value)
    return text
