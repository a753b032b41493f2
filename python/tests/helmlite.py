"""Renders a Helm chart's templates for the tests, where Helm itself cannot be installed (it
is in none of the package registries this project builds from).

It understands the part of Helm's template language the Weir chart uses, with Go template
semantics: ``{{ .Values.a.b }}``, ``.Release.Name``, ``.Chart.AppVersion``, ``.`` inside
``with``; ``if``/``with``/``else``/``end``; pipelines ``x | f a``; the functions ``toYaml``,
``nindent``, ``indent``, ``quote``, ``default`` and ``sha256sum``; and ``{{-``/``-}}``
whitespace trimming. Anything else raises, so a template that outgrows it fails loudly
instead of rendering wrong.
"""

import copy
import hashlib
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _truthy(v: Any) -> bool:
    return not (v is None or v is False or v == 0 or v == "" or v == [] or v == {})


def _show(v: Any) -> str:
    if v is None:
        return ""
    if v is True or v is False:
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        raise ValueError(f"a map or list printed without toYaml: {v!r}")
    return str(v)


def _to_yaml(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=False, sort_keys=False).rstrip("\n")


def _indent(n: int, s: str) -> str:
    return "\n".join((" " * n + line) if line else line for line in s.split("\n"))


FUNCS: Dict[str, Callable[..., Any]] = {
    "toYaml": lambda v: _to_yaml(v),
    "nindent": lambda n, s: "\n" + _indent(int(n), _show(s)),
    "indent": lambda n, s: _indent(int(n), _show(s)),
    "quote": lambda v: '"' + _show(v).replace("\\", "\\\\").replace('"', '\\"') + '"',
    "default": lambda d, v: v if _truthy(v) else d,
    "sha256sum": lambda v: hashlib.sha256(_show(v).encode()).hexdigest(),
}


class Renderer:
    def __init__(self, chart: Path, release: str, values: Dict[str, Any]):
        self.chart = yaml.safe_load((chart / "Chart.yaml").read_text())
        self.root = {"Values": values, "Release": {"Name": release}, "Chart": {"Name": self.chart["name"],
                                                                               "AppVersion": self.chart["appVersion"]}}

    def _value(self, tok: str, dot: Any) -> Any:
        if tok == ".":
            return dot
        if tok.startswith("."):
            v: Any = self.root if tok.split(".")[1] in self.root else dot
            for part in tok[1:].split("."):
                v = v.get(part) if isinstance(v, dict) else None
            return v
        if tok.startswith('"'):
            return tok[1:-1]
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        raise ValueError(f"unknown value `{tok}`")

    def eval(self, expr: str, dot: Any) -> Any:
        result: Any = None
        for i, cmd in enumerate(c.strip() for c in expr.split("|")):
            words = shlex.split(cmd, posix=False)
            head, args = words[0], [self._value(w, dot) for w in words[1:]]
            if i > 0:
                args.append(result)
            if head in FUNCS:
                result = FUNCS[head](*args)
            elif i == 0 and not words[1:]:
                result = self._value(head, dot)
            else:
                raise ValueError(f"unknown function `{head}` in `{expr}`")
        return result

    def render(self, text: str) -> str:
        # Tokens: text and actions, with the trimming applied to the text around them.
        parts: List[Tuple[str, str]] = []
        pos = 0
        for m in ACTION.finditer(text):
            before = text[pos:m.start()]
            if m.group(1):
                before = before.rstrip(" \t\n")
            parts.append(("text", before))
            parts.append(("action", m.group(2)))
            pos = m.end()
            if m.group(3):
                rest = text[pos:]
                pos += len(rest) - len(rest.lstrip(" \t\n"))
        parts.append(("text", text[pos:]))
        out, _ = self._block(parts, 0, self.root, True)
        return out

    def _block(self, parts: List[Tuple[str, str]], i: int, dot: Any, emit: bool) -> Tuple[str, int]:
        out: List[str] = []
        while i < len(parts):
            kind, body = parts[i]
            i += 1
            if kind == "text":
                if emit:
                    out.append(body)
                continue
            if body.startswith("#") or body.startswith("/*"):
                continue
            word = body.split(None, 1)[0]
            if word in ("end", "else"):
                return "".join(out), i - 1
            if word in ("if", "with"):
                value = self.eval(body.split(None, 1)[1], dot) if emit else None
                taken = emit and _truthy(value)
                inner_dot = copy.deepcopy(value) if (word == "with" and taken) else dot
                text, i = self._block(parts, i, inner_dot, taken)
                out.append(text)
                if parts[i][1] == "else":
                    text, i = self._block(parts, i + 1, dot, emit and not taken)
                    out.append(text)
                if parts[i][1] != "end":
                    raise ValueError(f"`{word}` without `end`")
                i += 1
                continue
            if emit:
                out.append(_show(self.eval(body, dot)))
        return "".join(out), i


def merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def template(chart: Path, release: str = "weir", values: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """The manifests the chart makes with its values overridden by ``values``, like
    ``helm template``."""
    vals = merge(yaml.safe_load((chart / "values.yaml").read_text()), values or {})
    r = Renderer(chart, release, vals)
    docs = []
    for t in sorted((chart / "templates").glob("*.yaml")):
        for doc in yaml.safe_load_all(r.render(t.read_text())):
            if doc:
                docs.append(doc)
    return docs
