"""The chat template of the transformers-native export: our ChatML prompt, written by Jinja.

`chat_template(system_prompt)` returns a template that, given transformers' / OpenAI's messages, writes the
text whose tokens are the ids `dataset.conversation.build_prompt_ids` builds for the same conversation:

    <|im_start|>system\\n{system}<|im_end|>
    \\n<|im_start|>{role}\\n{content}<|im_end|>        (each message in turn)
    \\n<|im_start|>assistant\\n                          (add_generation_prompt)

- system: the first message if it is a system message, else the model's own system prompt (the one it was
  trained with, written into the template at export); an empty system message gives an empty system prompt.
- content: a string, or a list of {"type": "text", "text": ...} and {"type": "image"} (or "image_url") items.
  An image is our image tag (`<|extra_0|>`, expanded by the processor), placed as `infer.py` places images:
  when every image of a message comes before its text, each tag is written on its own line ("<|extra_0|>\\n")
  in front of the text, as a prompt without `<image>` marks; otherwise tags are written where the images are,
  with nothing added, as a prompt whose `<image>` marks stand at those places. Images only in user messages.
- special-token text (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0|>` ... `<|extra_204|>`) in
  any message is refused with an error. Our prompt builder encodes message text with special tokens disallowed,
  so such text stays text; a template's output is one string in which typed and structural markers cannot be
  told apart, and every consumer (transformers, vLLM, SGLang) would turn typed ones into control tokens.
  Refusing keeps the export's prompts equal to ours or loudly absent, never silently different (infer.py
  refuses a typed `<|extra_0|>` for the same reason).

One known difference with our ids: message text that starts with white space containing a line break
("\\nWhat is it?") joins the "\\n" after the role into one token here (the text is tokenised as a whole),
whereas our builder encodes the role line and the content separately. The text is the same.
"""

from __future__ import annotations

import json

from qwen import IMAGE_TAG
from qwen.tokenization_qwen import ENDOFTEXT, EXTRAS, IM_END, IM_START, SPECIAL_TOKENS

_TEMPLATE = r"""
{%- macro refuse_special_text(text) -%}
  {%- if '__ENDOFTEXT__' in text or '__IM_START__' in text or '__IM_END__' in text -%}
    {{- raise_exception('message text contains special-token text (<|endoftext|>, <|im_start|> or <|im_end|>); this model keeps typed text as text and refuses to turn it into control tokens') -}}
  {%- endif -%}
  {%- if '<|extra_' in text -%}
    {%- for i in range(__NUM_EXTRAS__) -%}
      {%- if ('<|extra_' ~ i ~ '|>') in text -%}
        {{- raise_exception('message text contains the special token <|extra_' ~ i ~ '|>; images are content items of type "image"') -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
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


def special_text_in(text: str) -> str | None:
    """The first special token whose text occurs in `text` (what the template refuses), or None."""
    return next((token for token in SPECIAL_TOKENS if token in text), None)


def chat_template(system_prompt: str) -> str:
    """The Jinja chat template with `system_prompt` as the default system message (see the module docstring)."""
    found = special_text_in(system_prompt)
    if found:
        raise ValueError(f"the system prompt contains the special token {found}; it cannot be written as text")
    # A Jinja string literal: JSON's escapes (\n, \", \\, \u00XX for control characters) are also Jinja's.
    system_literal = json.dumps(system_prompt, ensure_ascii=False)
    replacements = {
        "__ENDOFTEXT__": ENDOFTEXT,
        "__IM_START__": IM_START,
        "__IM_END__": IM_END,
        "__IMAGE_TAG__": IMAGE_TAG,
        "__NUM_EXTRAS__": str(len(EXTRAS)),
        "__SYSTEM__": system_literal,
    }
    text = _TEMPLATE.strip() + "\n"
    for placeholder, value in replacements.items():
        text = text.replace(placeholder, value)
    return text
