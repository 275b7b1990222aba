"""Citations resolve: every `docs/<file>.md#<anchor>` named in the code, the tests or the README is a file of docs/
with that heading, and nothing cites the REFERENCE.md that is not in the repository."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITE = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
SCAN = ("model", "bench", "tests", "README.md")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _files():
    for top in SCAN:
        path = os.path.join(REPO, top)
        if os.path.isfile(path):
            yield path
            continue
        for dirpath, _, files in os.walk(path):
            for fn in files:
                if fn.endswith((".py", ".md")):
                    yield os.path.join(dirpath, fn)


def test_every_docs_citation_names_a_real_file_and_heading():
    anchors = {}
    for fn in os.listdir(os.path.join(REPO, "docs")):
        if fn.endswith(".md"):
            with open(os.path.join(REPO, "docs", fn)) as f:
                anchors[fn] = {_anchor(line.lstrip("#")) for line in f if line.startswith("#")}
    bad, seen = [], 0
    for path in _files():
        with open(path) as f:
            for n, line in enumerate(f, 1):
                for name, anchor in CITE.findall(line):
                    seen += 1
                    if name not in anchors or (anchor and anchor not in anchors[name]):
                        bad.append(f"{os.path.relpath(path, REPO)}:{n}: docs/{name}#{anchor}")
    assert seen > 0
    assert not bad, "citations that do not resolve:\n" + "\n".join(bad)


def test_nothing_cites_the_reference_file_outside_the_repository():
    this = os.path.abspath(__file__)
    hits = []
    for path in _files():
        if os.path.abspath(path) == this:
            continue
        with open(path) as f:
            hits += [f"{os.path.relpath(path, REPO)}:{n}" for n, line in enumerate(f, 1) if "REFERENCE.md" in line]
    assert not hits, "cite docs/reference.md (or the paper / the release) instead: " + ", ".join(hits)
