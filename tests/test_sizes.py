"""Classes that fit in a head, functions that fit on a screen (issue 10).

Every class in ``fido_tx/`` stays under :data:`CLASS_LINES` lines and every
function under :data:`FUNCTION_LINES` (the ~300 and ~60 of the design, with
some room so that a small fix does not force a split in a hurry).  The
allowlist names what is too big today and being split; each entry has the
size it may not grow past, and an entry whose class has shrunk under the
limit must go (so the list only gets shorter).
"""

import ast
import os
import textwrap

from twisted.trial.unittest import SynchronousTestCase

import fido_tx

CLASS_LINES = 320
FUNCTION_LINES = 70

#: (path under fido_tx/, qualified name) -> the most lines it may have now,
#: for a class being split (empty: every class and function is within bounds)
ALLOWED = {}

PACKAGE = os.path.dirname(os.path.abspath(fido_tx.__file__))


def sizes(source, path="<source>"):
    """``[(kind, qualified name, first line, lines)]`` of every class and
    function (methods and nested ones included) in ``source``."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                kind = "class"
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kind = "function"
            else:
                visit(child, prefix)
                continue
            name = f"{prefix}{child.name}"
            found.append((kind, name, child.lineno, child.end_lineno - child.lineno + 1))
            visit(child, f"{name}.")

    visit(ast.parse(source, path), "")
    return found


def too_big(source, path, allowed=None):
    """The classes and functions of ``source`` over their limit, as lines
    for a failure message; ``allowed``: ``{qualified name: most lines}``."""
    allowed = allowed or {}
    out = []
    for kind, name, line, length in sizes(source, path):
        limit = CLASS_LINES if kind == "class" else FUNCTION_LINES
        limit = max(limit, allowed.get(name, 0))
        if length > limit:
            out.append(f"{path}:{line}: {kind} {name} has {length} lines (limit {limit})")
    return out


def package_files():
    for directory, _dirs, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                yield os.path.relpath(path, PACKAGE).replace(os.sep, "/"), path


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


class PackageSizeTests(SynchronousTestCase):
    def test_no_class_or_function_in_fido_tx_is_over_its_limit(self):
        problems = []
        for relative, path in package_files():
            allowed = {name: most for (where, name), most in ALLOWED.items()
                       if where == relative}
            problems += too_big(read(path), f"fido_tx/{relative}", allowed)
        self.assertEqual(problems, [], "split these along their seams:\n" + "\n".join(problems))

    def test_the_allowlist_names_only_what_is_still_over_the_limit(self):
        stale = []
        for (relative, name), _most in ALLOWED.items():
            path = os.path.join(PACKAGE, relative)
            found = {n: length for kind, n, _line, length in sizes(read(path), path)
                     if kind == "class"} if os.path.exists(path) else {}
            if found.get(name, 0) <= CLASS_LINES:
                stale.append(f"{relative} {name}: {found.get(name, 'gone')} lines")
        self.assertEqual(stale, [], "take these off tests/test_sizes.ALLOWED:\n"
                         + "\n".join(stale))


def _class(name, methods, body_lines):
    """Source of a class with ``methods`` methods of ``body_lines`` lines each."""
    out = [f"class {name}:"]
    for m in range(methods):
        out.append(f"    def m{m}(self):")
        out += [f"        x{i} = {i}" for i in range(body_lines)]
    return "\n".join(out) + "\n"


class CheckerTests(SynchronousTestCase):
    """The checker itself: it measures what it claims to."""

    def test_a_class_one_line_over_the_limit_is_named_with_its_size(self):
        source = _class("Big", 1, CLASS_LINES - 1)  # class line + def line + body
        self.assertEqual(len(source.splitlines()), CLASS_LINES + 1)
        [problem] = [p for p in too_big(source, "x.py") if " class " in p]
        self.assertEqual(problem, f"x.py:1: class Big has {CLASS_LINES + 1} lines "
                                  f"(limit {CLASS_LINES})")

    def test_a_class_at_the_limit_and_short_methods_pass(self):
        source = _class("Fits", 8, (CLASS_LINES - 1) // 8 - 1)
        self.assertLessEqual(len(source.splitlines()), CLASS_LINES)
        self.assertEqual(too_big(source, "x.py"), [])

    def test_a_long_nested_function_is_named_by_its_qualified_name(self):
        body = textwrap.indent("\n".join(f"y = {i}" for i in range(FUNCTION_LINES)), " " * 8)
        source = f"def outer():\n    def inner():\n{body}\n    return inner\n"
        problems = too_big(source, "x.py")
        self.assertIn(f"x.py:2: function outer.inner has {FUNCTION_LINES + 1} lines "
                      f"(limit {FUNCTION_LINES})", problems)
        self.assertIn("function outer has", "\n".join(problems))

    def test_an_allowlisted_class_may_not_grow_past_its_recorded_size(self):
        source = _class("Old", 20, 19)  # 1 + 20 * (1 + 19) lines
        self.assertEqual(too_big(source, "x.py", {"Old": 401}), [])
        self.assertEqual(too_big(source, "x.py", {"Old": 400}),
                         ["x.py:1: class Old has 401 lines (limit 400)"])
