"""Sphinx configuration of the ftmlopt documentation site (`make docs` -> docs/_build/html).

Why these tools:

* Sphinx + autodoc + napoleon: the docstrings are reStructuredText with ``.. math::`` blocks and
  Google-style ``Example:`` sections; autodoc imports the real modules (no mocking of ftmlopt or of
  the frameworks: ``make docs`` builds in ``.venv``, which has torch, JAX/optax, Keras, llvmlite and
  Triton) and napoleon turns the Google sections into reST. mkdocstrings would need another
  docstring style.
* MyST-Parser: the guides are Markdown (``docs/*.md``), readable on GitHub as they are.
* furo: a theme on PyPI whose CSS, JS and fonts ship inside the wheel; it fetches nothing at build or
  view time, so the site builds and reads offline. It is a single-column reading layout with a
  sidebar of the whole tree and a light/dark switch, and no configuration to maintain (pydata- and
  book-theme bring more machinery than a site of a dozen pages needs).
* sphinx-mathjax-offline: MathJax from its wheel, not from a CDN (see below).

Warnings fail the build (the Makefile runs ``sphinx-build -W --keep-going``) and ``nitpicky`` is on:
every cross-reference to ftmlopt must resolve. There is no intersphinx (CI builds offline), so
references to other projects' objects (numpy, torch, jax, optax, keras, the standard library) cannot
resolve; ``nitpick_ignore_regex`` lets exactly those through and nothing under ``ftmlopt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# Keras picks its backend at import time; the JAX backend is the one .venv always has (as in the tests).
os.environ.setdefault("KERAS_BACKEND", "jax")

import ftmlopt  # noqa: E402

project = "ftmlopt"
author = "ftmlopt developers"
copyright = "ftmlopt developers"
release = ftmlopt.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx-mathjax-offline",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: `$...$`-free Markdown as on GitHub; heading anchors so that `page.md#section` links resolve.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc: the public names (``__all__``) of the public modules, in source order, with the types in
# the description rather than in long signatures.
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autoclass_content = "both"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# The formulas of the docstrings (``.. math::``) are typeset by MathJax, which Sphinx loads from a CDN by
# default; sphinx-mathjax-offline (in the extensions above) copies MathJax 3 from its wheel into
# ``_static`` instead, so the site renders its math without the network too.

nitpicky = True
nitpick_ignore_regex = [
    # Other projects' objects: no intersphinx offline, so these cannot resolve (see the module docstring).
    (r"py:.*", r"(numpy|np|torch|jax|jnp|optax|chex|keras|flax|triton|llvmlite|ctypes|collections|typing"
               r"|typing_extensions|types|abc|os|pathlib|argparse|enum|dataclasses|functools|numbers)(\..*)?"),
    (r"py:class", r"(int|float|bool|str|bytes|object|tuple|list|dict|set|type|slice|complex|None|Ellipsis"
                  r"|Any|Callable|Sequence|Mapping|Iterable|Iterator|NamedTuple|TypeVar"
                  # ... and names that a module imports from a framework and uses bare in its annotations
                  r"|Tensor|Array|ArrayLike|DTypeLike|NDArray|PyTree|ParamsT)"),
    (r"py:exc", r"(TypeError|ValueError|RuntimeError|UserWarning|DeprecationWarning|KeyError|AttributeError)"),
    # ftmlopt's private names (a dotted component starting with "_") and its implementation modules, which
    # the reference does not document: the public modules re-export what users need, and the files behind
    # them are free to move (a docstring may still name them, rendered as code).
    (r"py:.*", r"(.*\.)?_\w+(\..*)?"),
    (r"py:mod", r"ftmlopt\.(torch\.(?!functional$)\w+|kernels(\..*)?|bench(\..*)?|experiments(\..*)?"
                r"|mxnet\.optimizer\.\w+)"),
    # Type aliases of ftmlopt.mxnet.optimizer (both ``Any``) and ftmlopt.optax (a union of the two states).
    (r"py:class", r"(Index|State)"),
]


def _resolve_by_name(app: Any, env: Any, node: Any, contnode: Any) -> Any:  # Sphinx's missing-reference event
    """Resolve a Python reference that names a documented object by another path.

    A docstring may name an object by the module that defines it (``ftmlopt.torch.ftml.FTML``) or by
    its bare name (``FTML``); the reference documents it under its public address (``ftmlopt.torch.FTML``).
    Among the documented objects with the same last name, take the one whose public module shares the
    longest prefix with the module the reference was written in, so ``FTML`` written in the torch
    package means ``ftmlopt.torch.FTML``, not the Keras or MXNet class.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    name = target.rsplit(".", 1)[-1]
    domain = env.get_domain("py")
    here = (node.get("py:module") or target).split(".")
    candidates = [full for full, obj in domain.objects.items()
                  if full.rsplit(".", 1)[-1] == name and not obj.aliased and full != target]
    if not candidates:
        return None

    def shared(full: str) -> int:
        n = 0
        for a, b in zip(full.split("."), here):
            if a != b:
                break
            n += 1
        return n

    best = max(candidates, key=shared)
    if sum(shared(c) == shared(best) for c in candidates) > 1:
        return None  # ambiguous: let nitpicky report it
    from sphinx.util.nodes import make_refnode

    obj = domain.objects[best]
    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, best)


def _drop_namedtuple_boilerplate(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Drop the docstrings Python writes for a NamedTuple ("Alias for field number 0", "Create new
    instance of ..."): they say nothing that the signature does not, once per field."""
    if lines and (lines[0].startswith("Alias for field number") or lines[0].startswith("Create new instance of")):
        del lines[:]


def setup(app: Any) -> None:
    app.connect("missing-reference", _resolve_by_name)
    app.connect("autodoc-process-docstring", _drop_namedtuple_boilerplate)


html_theme = "furo"
html_title = f"ftmlopt {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
