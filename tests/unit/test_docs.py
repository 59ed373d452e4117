"""The documentation stays true to the tree: the README, the layout, the config reference.

Fast and without Ray's runtime (some config models live in modules that import ``ray``;
importing is all that happens). ``mkdocs build --strict`` (in ``make test``) checks the site's
own links, anchors and navigation; these tests check what it cannot see.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices, BaseModel
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

#: Every pydantic model whose fields a user writes in serve_config.yaml (application args
#: and each deployment's user_config); models nested in their fields are found from them.
CONFIG_MODELS = (
    "graph.app:AppArgs",
    "deployments.ingress.dataplane.plane:IngressConfig",
    "deployments.cache.core:CacheConfig",
    "deployments.features.rowcache:FeatureCacheConfig",
    "deployments.onnx.core:OnnxModelConfig",
    "deployments.features.core:FeatureServiceConfig",
    "deployments.observability.slo:SloConfig",
    "deployments.llm.config:LLMGatewayConfig",
)

#: The modules whose pydantic-settings classes read Keel's environment variables.
SETTINGS_MODULES = ("deployments.settings",)

_MARKDOWN_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_HTML_LINK = re.compile(r"""(?:href|src)=["']([^"']+)["']""")


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# --- (a) the layout ----------------------------------------------------------------------


def layout_paths() -> list[str]:
    """The repository paths the architecture page's Layout section lists (one per bullet,
    in backticks at its start)."""
    text = (DOCS / "architecture.md").read_text()
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "docs/architecture.md has no '## Layout' section"
    paths = re.findall(r"^- `([^`]+)`", match.group(1), re.M)
    assert paths, "the Layout section lists no paths"
    return paths


@pytest.mark.parametrize("path", layout_paths())
def test_layout_path_exists(path: str) -> None:
    assert not path.startswith(("/", "..")), f"{path}: not a path inside the repository"
    target = ROOT / path
    if path.endswith("/"):
        assert target.is_dir(), f"docs/architecture.md, Layout: {path} is not a directory"
    else:
        assert target.exists(), f"docs/architecture.md, Layout: {path} does not exist"


def test_every_package_has_a_layout_line() -> None:
    """Every package directory under deployments/ and graph/ (a room, or a room's
    sub-package) has its own line in the Layout: a new room without one fails here."""
    listed = set(layout_paths())
    packages = sorted(f"{init.parent.relative_to(ROOT).as_posix()}/"
                      for top in ("deployments", "graph")
                      for init in (ROOT / top).rglob("__init__.py"))
    assert packages, "no package found under deployments/ and graph/"
    missing = [package for package in packages if package not in listed]
    assert not missing, f"docs/architecture.md, Layout: no line for {missing}"


# --- (b) configuration -------------------------------------------------------------------


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += _nested_models(arg)
    return found


def config_models() -> list[type[BaseModel]]:
    """The CONFIG_MODELS and every model nested in their fields, each once."""
    seen: dict[str, type[BaseModel]] = {}
    todo: list[type[BaseModel]] = [_load(target) for target in CONFIG_MODELS]
    while todo:
        model = todo.pop()
        key = f"{model.__module__}.{model.__qualname__}"
        if key in seen:
            continue
        seen[key] = model
        for field in model.model_fields.values():
            todo += _nested_models(field.annotation)
    return sorted(seen.values(), key=lambda m: m.__name__)


def environment_variables() -> dict[str, list[str]]:
    """Per settings class, the environment variables its fields are read from."""
    found: dict[str, list[str]] = {}
    for module_name in SETTINGS_MODULES:
        module = importlib.import_module(module_name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not issubclass(cls, BaseSettings) or cls.__module__ != module.__name__:
                continue
            prefix = cls.model_config.get("env_prefix", "")
            names: list[str] = []
            for name, field in cls.model_fields.items():
                alias = field.validation_alias
                if isinstance(alias, AliasChoices):
                    names += [str(choice) for choice in alias.choices]
                elif isinstance(alias, str):
                    names.append(alias)
                else:
                    names.append(f"{prefix}{name}".upper())
            found[cls.__name__] = names
    return found


def test_every_config_field_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = [f"{model.__name__}.{name}" for model in config_models()
               for name in model.model_fields if f"`{name}`" not in text]
    assert not missing, f"docs/configuration.md does not mention (in backticks): {missing}"


def test_every_environment_variable_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = [f"{cls}: {name}" for cls, names in environment_variables().items()
               for name in names if f"`{name}`" not in text]
    assert not missing, f"docs/configuration.md does not mention (in backticks): {missing}"


# --- (c) the README ----------------------------------------------------------------------


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it at 200 or fewer"


def _links(text: str) -> list[str]:
    return (_MARKDOWN_LINK.findall(text) + _IMAGE_LINK.findall(text)
            + _HTML_LINK.findall(text))


def test_readme_links_stay_inside_the_repository_and_resolve() -> None:
    text = README.read_text()
    assert "../" not in text, "README.md points outside the repository ('../')"
    problems = []
    for link in _links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue  # a URL (http:, mailto:...) or an anchor on the page itself
        path = link.split("#", 1)[0]
        target = (ROOT / path).resolve()
        if path.startswith("/") or not target.is_relative_to(ROOT):
            problems.append(f"{link}: outside the repository")
        elif not target.exists():
            problems.append(f"{link}: no such file")
    assert not problems, f"README.md links: {problems}"


# --- (d) the generated REST reference ----------------------------------------------------


def _hook() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("keel_docs_openapi_hook",
                                                  DOCS / "hooks" / "openapi.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rest_reference_renders_every_route() -> None:
    hook = _hook()
    page = (DOCS / "api" / "reference.md").read_text()
    assert hook.MARKER in page, "docs/api/reference.md lost the marker the hook fills"
    document = hook.openapi_document()
    routes = set(hook.route_keys(document))
    assert {"POST /v2/models/{name}/infer", "POST /v1/decide"} <= routes
    rendered = hook.paths_in(hook.render(document))
    assert rendered == routes
