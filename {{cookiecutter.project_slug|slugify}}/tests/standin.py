"""A stand-in generative model for the serving tests: what the generative parts give the server
(`serve.TextGenerator`), without weights. Its tokens are words; it answers with the sampling
settings it was given, then the prompt's (or the last message's) words backwards."""

import functools
import sys


class EchoGenerator:
    context_length = 16

    def __init__(self, checkpoint):
        self.checkpoint, self.device = checkpoint, None

    @staticmethod
    def text(prompt) -> str:
        return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)

    def count_tokens(self, prompt) -> int:
        return len(self.text(prompt).split())

    def load(self, device: str) -> None:
        self.device = device  # a real part loads its weights here, in the worker

    def generate(self, prompt, max_tokens: int, temperature: float, top_p: float):
        last = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        pieces = [f"<{temperature} {top_p} {self.device}>", *(f" {w}" for w in reversed(last.split()))]
        yield from pieces[:max_tokens]


class EchoChat:  # the model classes a checkpoint names (`_class_path`)
    pass


class EchoLM:
    pass


def register(serve) -> None:
    """Serve EchoChat checkpoints as a chat model and EchoLM ones as a prompt model, as the parts will."""
    serve.KINDS["EchoChat"] = functools.partial(serve.ChatAPI, generator=EchoGenerator)
    serve.KINDS["EchoLM"] = functools.partial(serve.PromptAPI, generator=EchoGenerator)


if __name__ == "__main__":  # python tests/standin.py --ckpt_path ...: the serve command with both kinds
    import standin  # this file as a module: the workers unpickle its classes from there

    from {{ cookiecutter.package_name }} import serve

    standin.register(serve)
    sys.exit(serve.main())
