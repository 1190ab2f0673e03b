"""Generate the built-in evaluation metadata from open_clip (the only way those files are made).

    python scripts/gen_eval_metadata.py            # write src/clipserve/data/*.txt
    python scripts/gen_eval_metadata.py --check    # exit 1 if the committed files differ

`clipserve eval` is a client of a running server and never imports open_clip, so the ImageNet
class names and OpenAI's 80 ImageNet prompt templates of ``open_clip.zero_shot_metadata`` are
committed as text files, one item per line. open_clip's templates are callables
(``lambda c: f"a photo of a {c}."``); they are rendered with ``"{}"`` for the label, the form the
server's Classify takes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "src" / "clipserve" / "data"
IMAGENET_CLASSES_FILE = "imagenet_classes.txt"
OPENAI_TEMPLATES_FILE = "openai_templates.txt"


def _metadata() -> ModuleType:
    """``open_clip.zero_shot_metadata`` of the installed open_clip.

    The module is plain data, so it is loaded from its file alone when it can be: importing the
    `open_clip` package would import torch, which takes longer than everything else here.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip is not installed: pip install -e '.[export]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "zero_shot_metadata.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_zero_shot_metadata", path)
    if module_spec is not None and module_spec.loader is not None:
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
            return module
        except ImportError:  # the file grew imports of its package: import it the usual way
            pass
    return importlib.import_module("open_clip.zero_shot_metadata")


def render() -> dict[str, str]:
    """File name -> content, from the installed open_clip."""
    metadata = _metadata()
    IMAGENET_CLASSNAMES = metadata.IMAGENET_CLASSNAMES  # noqa: N806 - open_clip's names
    OPENAI_IMAGENET_TEMPLATES = metadata.OPENAI_IMAGENET_TEMPLATES  # noqa: N806

    templates = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    for name, items in (("class names", IMAGENET_CLASSNAMES), ("templates", templates)):
        bad = [item for item in items if "\n" in item or item != item.strip() or not item]
        if bad:
            raise ValueError(f"{name} that one line cannot hold: {bad!r}")
    if any(template.count("{}") != 1 for template in templates):
        raise ValueError("every template must hold exactly one '{}'")
    return {
        IMAGENET_CLASSES_FILE: "".join(f"{name}\n" for name in IMAGENET_CLASSNAMES),
        OPENAI_TEMPLATES_FILE: "".join(f"{template}\n" for template in templates),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed files, write nothing"
    )
    args = parser.parse_args(argv)
    stale = []
    for name, content in render().items():
        path = DATA_DIR / name
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == content:
            continue
        if args.check:
            stale.append(name)
        else:
            DATA_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(
            f"out of date: {', '.join(stale)}; run python scripts/gen_eval_metadata.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
