"""The one prompt renderer of the chat part: training, generation and serving all render with it.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
It becomes text through the tokenizer's chat template (the Jinja template a chat model ships with
its tokenizer) or, for a tokenizer without one (a base model), through PLAIN_TEMPLATE:

    ### User:
    What is 2 + 2?

    ### Assistant:
    4<eos>

The template in use is the model's `chat_template` hyperparameter, so it is saved in every
checkpoint and written into exported folders: a model is always prompted the way it was trained
(a model trained with one template and prompted with another repeats itself or never stops).

data/chat.py (which tokens are learned) and models/chat.py (generation) both import this module;
they never import each other.
"""

CHAT_EXTRA = "pip install -e '.[chat]'"
ROLES = ("system", "user", "assistant")

# Each assistant turn ends with the tokenizer's end-of-sequence token: the model learns to stop.{% raw %}
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + (message['role'] | capitalize) + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
){% endraw %}


def use_template(tokenizer, template: str | None = None):
    """`tokenizer`, set up to render conversations: with `template` if given (a checkpoint's),
    else its own chat template, else PLAIN_TEMPLATE; and with a pad token (its EOS when it has none)."""
    tokenizer.chat_template = template or tokenizer.chat_template or PLAIN_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is never learned: the collator masks it by length
    return tokenizer


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The text of `messages`; with `add_generation_prompt`, followed by the opening of an assistant turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text; the template writes any special tokens (BOS) itself."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """What the model is given to answer the last message of `messages`: generation and serving use this."""
    return encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True))
