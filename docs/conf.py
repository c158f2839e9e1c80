"""Sphinx configuration: MyST Markdown pages, the furo theme, the API reference from the docstrings (autodoc),
the command line from nbdproto.cli's parsers (sphinx-argparse), the architecture drawn by graphviz, and a man
page for nbdproto and each of its commands (``sphinx-build -b man``).

CI builds it with ``sphinx-build -W -n``: every warning, and every cross-reference that resolves to nothing, is
an error. Python's own names resolve through the inventory Debian's python3-doc installs (links go to
docs.python.org); without it they are looked up at docs.python.org, and a build without network and without the
package fails on them (.ci/run installs it).
"""

from __future__ import annotations

import os
import sys

import nbdproto

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _ext: the local extensions

project = "nbdproto"
author = "the nbdproto authors"
copyright = "the nbdproto authors"
release = nbdproto.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.graphviz",
    "sphinxarg.ext",
    "sphinxcontrib_trio",
    "_ext.nbdproto_docs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]
myst_enable_extensions = ["colon_fence", "deflist", "substitution"]
myst_substitutions = {"release": release}
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"nbdproto {release}"
html_static_path = ["_static"]
html_last_updated_fmt = None

autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_class_signature = "separated"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_preserve_defaults = True
python_use_unqualified_type_names = True
graphviz_output_format = "svg"

_PYTHON_INVENTORY = next((path for path in ("/usr/share/doc/python3/html/objects.inv",) if os.path.exists(path)), None)
intersphinx_mapping = {"python": ("https://docs.python.org/3", _PYTHON_INVENTORY)}
# anyio publishes no inventory this build can reach offline: its types (in the async backend's signatures) are
# shown as text.
nitpick_ignore_regex = [("py:class", r"anyio\..*")]

nitpicky = True

# Options are written --like-this in the parsers' help: no en dashes for "--", and usage lines are not Python.
smartquotes_action = "qe"
highlight_language = "none"

man_pages = [
    ("reference/cli/index", "nbdproto", "Network Block Device tools built on nbdproto", [author], 1),
    *(
        (f"reference/cli/{command}", f"nbdproto-{command}", summary, [author], 1)
        for command, summary in (
            ("serve", "serve files, block devices, memory, S3 images and remote exports over NBD"),
            ("mirror", "serve a disk while mirroring it to another"),
            ("info", "describe an NBD export, as nbdinfo does"),
            ("list", "list the exports of an NBD server"),
            ("copy", "copy disks and NBD exports, sparse-aware, as nbdcopy does"),
            ("fuse", "show an NBD export as a file in a FUSE mount, as nbdfuse does"),
            ("control", "manage a running server through its control socket"),
        )
    ),
]
man_show_urls = False
default_role = "code"
