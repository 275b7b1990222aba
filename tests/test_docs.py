"""Citations resolve: every `docs/<file>.md#<anchor>` named in the code (dz_kernels, the model, the benchmarks, the
examples), the tests or the README is a file of docs/ with that heading, and nothing cites the REFERENCE.md that is
not in the repository."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITE = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
# every source root (dz_kernels was missing, so dz_kernels/attention's "REFERENCE.md section 7" went unseen)
SCAN = ("dz_kernels", "model", "bench", "examples", "tests", "README.md")
# files whose REFERENCE.md citations another change in flight replaces (none left: dz_kernels/quant/reference.py
# cites docs/reference.md#formats). The test fails once a file here stops citing it, so an entry goes with its fix.
PENDING = ()


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
    hits, pending = [], set()
    for path in _files():
        if os.path.abspath(path) == this:
            continue
        rel = os.path.relpath(path, REPO)
        with open(path) as f:
            found = [f"{rel}:{n}" for n, line in enumerate(f, 1) if "REFERENCE.md" in line]
        if found and rel in PENDING:
            pending.add(rel)
        else:
            hits += found
    assert not hits, "cite docs/reference.md (or the paper / the release) instead: " + ", ".join(hits)
    assert pending == set(PENDING), \
        f"{sorted(set(PENDING) - pending)} no longer cite REFERENCE.md: drop them from PENDING in tests/test_docs.py"


def test_the_scan_covers_every_source_root():
    """A citation in the kernel library is checked like one in the model (the REFERENCE.md of dz_kernels/attention
    went unseen when the scan left dz_kernels out)."""
    scanned = {os.path.relpath(p, REPO).split(os.sep)[0] for p in _files()}
    assert {"dz_kernels", "model", "bench", "examples", "tests", "README.md"} <= scanned
