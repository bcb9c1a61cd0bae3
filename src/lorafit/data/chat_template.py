"""The one place conversations become prompt text: training, evaluation, generation, export and
serving all call `render_chat`, so the prompt format cannot drift between them (a model tuned on
one format and asked in another answers worse, silently).

The template is the base model's own (its tokenizer's `chat_template`) unless `data.chat_template`
says otherwise. A model without one gets DEFAULT_CHAT_TEMPLATE, a plain-text format that needs no
special tokens beyond the tokenizer's EOS, which ends every answer so the tuned model stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import ConfigError, DataError

# lorafit's documented default (README: "Chat template"):
#   {system}\n\n### User:\n{user}\n\n### Assistant:\n{answer}<eos>\n\n ... and, to generate, "### Assistant:\n".
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{%- else -%}{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}"
)

_PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U"},
    {"role": "assistant", "content": "A"},
]


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    origin: str  # "model", "default", a file path or "inline"


class RenderError(ValueError):
    """The template refused a conversation (e.g. roles that do not alternate)."""


def resolve_chat_template(tokenizer, setting: str = "auto") -> ChatTemplate:
    """The template `data.chat_template` asks for, checked by rendering a probe conversation."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if setting == "auto":
        template = ChatTemplate(own, "model") if own else ChatTemplate(DEFAULT_CHAT_TEMPLATE, "default")
    elif setting == "model":
        if not own:
            raise ConfigError(
                "data.chat_template is 'model', but the base model's tokenizer has no chat template; set "
                "data.chat_template to 'default' (lorafit's documented template), a .jinja file, or a Jinja string."
            )
        template = ChatTemplate(own, "model")
    elif setting == "default":
        template = ChatTemplate(DEFAULT_CHAT_TEMPLATE, "default")
    elif "{{" in setting or "{%" in setting:
        template = ChatTemplate(setting, "inline")
    else:
        path = Path(setting).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"data.chat_template: {setting!r} is neither 'auto', 'model', 'default', an existing .jinja file "
                "nor a Jinja template string."
            )
        template = ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    if tokenizer.eos_token is None:
        raise ConfigError("The tokenizer has no EOS token, so a tuned model could not learn to stop; set one.")
    _check_template(tokenizer, template)
    return template


def _check_template(tokenizer, template: ChatTemplate) -> None:
    import jinja2

    try:
        render_chat(tokenizer, template, _PROBE, add_generation_prompt=False)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"chat template ({template.origin}): line {exc.lineno}: {exc.message}; fix it.") from None
    except RenderError:
        # Some templates refuse system messages; the probe without one must work.
        try:
            render_chat(tokenizer, template, _PROBE[1:], add_generation_prompt=False)
        except RenderError as exc:
            raise ConfigError(f"chat template ({template.origin}) cannot render a user/assistant chat: {exc}") from None


def render_chat(tokenizer, template: ChatTemplate, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Conversation -> the exact text the model sees; with `add_generation_prompt`, ready for an answer."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template.text, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateSyntaxError:
        raise
    except jinja2.TemplateError as exc:
        raise RenderError(str(exc)) from None


def render_prompt(tokenizer, template: ChatTemplate, messages: list[dict[str, str]]) -> str:
    """The prompt for the next assistant answer (a trailing assistant message, if any, is dropped)."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render_chat(tokenizer, template, messages, add_generation_prompt=True)


def end_of_turn_ids(tokenizer, template: ChatTemplate) -> list[int]:
    """The ids that end an assistant answer under `template`: the special token the template puts
    right after an answer (Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`, Phi-3's `<|end|>`), then
    the tokenizer's EOS. An answer is trained through the first and generation stops at either, so
    a base whose EOS is another token (Llama 3's `<|end_of_text|>`) still learns to end its turn."""
    answer_text = "lorafit probe answer"  # found by itself in the rendered turn, whatever the markup
    probe = [{"role": "user", "content": "U"}, {"role": "assistant", "content": answer_text}]
    stops = [tokenizer.eos_token_id]
    try:
        prompt = render_chat(tokenizer, template, probe[:1], add_generation_prompt=True)
        full = render_chat(tokenizer, template, probe, add_generation_prompt=False)
    except RenderError:
        return stops
    if not full.startswith(prompt):
        return stops
    answer = full[len(prompt) :]
    if answer_text not in answer:
        return stops
    content_end = answer.index(answer_text) + len(answer_text)
    special = set(tokenizer.all_special_ids) | {
        index for index, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    after = tokenizer(answer[content_end:], add_special_tokens=False)["input_ids"]
    for token in after:
        if token in special:
            return list(dict.fromkeys([token, *stops]))
    return stops


def conversation_segments(
    tokenizer, template: ChatTemplate, messages: list[dict[str, str]], train_turns: str = "all"
) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: assistant answers are trained, all
    else (system, user, template markup) is context. Rendering the first k messages must be a prefix
    of rendering k+1 — true of incremental templates (ChatML, Llama, lorafit's default) — or the
    answer tokens could not be told apart; such a template raises DataError."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_turns == "last":
        answers = answers[-1:]
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for index in answers:
        prompt = render_chat(tokenizer, template, messages[:index], add_generation_prompt=True)
        full = render_chat(tokenizer, template, messages[: index + 1], add_generation_prompt=False)
        closing = tokenizer.eos_token or ""
        if (
            closing
            and segments
            and not prompt.startswith(rendered)
            and rendered.endswith(closing)
            and prompt.startswith(rendered[: -len(closing)])
        ):
            # An EOS that closes only a whole conversation (Phi-3's template): the earlier answer ends without it.
            text, trained = segments[-1]
            segments[-1] = (text[: -len(closing)], trained)
            rendered = rendered[: -len(closing)]
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise DataError(
                f"The chat template ({template.origin}) does not render conversations incrementally (the text "
                f"up to message {index} is not a prefix of the text that follows), so lorafit cannot tell the "
                "answer tokens apart; set data.chat_template: default, or data.train_turns: last."
            )
        segments.append((prompt[len(rendered) :], False))
        segments.append((full[len(prompt) :], True))
        rendered = full
    return segments
