"""Which model class has an option that the chosen model lacks.

`--model.init_from=...` on the plain classifier is refused by the parser with a dozen lines about
Union subtypes; `refused_model_option` turns that refusal into one line naming the model classes
of this package that take the option and the configs that select them.
"""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import lightning as L
import yaml

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
REFUSED = re.compile(r"Problem with given class_path '([\w.]+)':\s+Option '(\w+)' is not accepted")


def model_classes() -> list[type]:
    """The LightningModules defined in this package's `models` modules (whichever the project has)."""
    package = importlib.import_module(f"{__package__}.models")
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        try:
            module = importlib.import_module(f"{package.__name__}.{info.name}")
        except ImportError:
            continue  # a model whose extra is not installed
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, L.LightningModule) and value.__module__ == module.__name__:
                found[value.__qualname__] = value
    return list(found.values())


def configs_selecting(cls: type) -> list[str]:
    """The configs/*.yaml whose model is `cls` (by its full or its package-level class path)."""
    names = {f"{cls.__module__}.{cls.__qualname__}", f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__qualname__}"}
    found = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        model = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model")
        if isinstance(model, dict) and model.get("class_path") in names:
            found.append(f"configs/{path.name}")
    return found


def refused_model_option(err: BaseException) -> str | None:
    """The one-line message for a `--model.<option>` that the chosen model class does not take but another
    model class of this project does, or None."""
    found = REFUSED.search(str(err))
    if found is None:
        return None
    chosen, option = found[1].rsplit(".", 1)[-1], found[2]
    having = [cls for cls in model_classes() if option in inspect.signature(cls.__init__).parameters]
    if not having:
        return None  # a plain typo: the parser's own message lists the options
    uses = []
    for cls in having:
        configs = configs_selecting(cls)
        how = f"--config {configs[0]}" if configs else f"--model.class_path={cls.__module__}.{cls.__qualname__}"
        uses.append(f"{cls.__qualname__} ({how})")
    return f"--model.{option}: the model {chosen} has no option {option!r}; it belongs to " + ", ".join(uses)
