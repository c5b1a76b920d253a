"""The documentation's relative links resolve: every `[text](path)` and `[text](path#anchor)` in
README.md and docs/*.md names a file inside the repository and, with an anchor, a heading of that
file (GitHub's anchors: lower case, punctuation dropped, spaces to hyphens). Links out of the
repository (`../shared/...`) would not survive a clone. Links to web addresses are not checked."""
import glob
import os
import re
from typing import Dict, List, Set, Tuple

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md'] + sorted(os.path.relpath(path, REPO_ROOT)
                              for path in glob.glob(os.path.join(REPO_ROOT, 'docs', '*.md')))
FENCE = re.compile(r'^(```|~~~).*?^\1', re.M | re.S)
INLINE_CODE = re.compile(r'`[^`\n]*`')
LINK = re.compile(r'\]\(([^()\s]+)(?:\s+"[^"]*")?\)')
HEADING = re.compile(r'^#{1,6}\s+(.*?)\s*#*\s*$', re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans, where brackets are not links."""
    return INLINE_CODE.sub('', FENCE.sub('', text))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped (but hyphens and
    underscores), spaces to hyphens."""
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link in a heading: its text
    text = re.sub(r'[^\w\- ]', '', text.lower())
    return text.replace(' ', '-')


def anchors(path: str) -> Set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen: Dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(FENCE.sub('', open(path, encoding='utf-8').read())):
        base = anchor(heading)
        count = seen.get(base, 0)
        result.add(base if count == 0 else f'{base}-{count}')
        seen[base] = count + 1
    return result


def links(doc: str) -> List[Tuple[str, str]]:
    """(target path relative to the repository root, anchor or '') of each relative link in `doc`."""
    found = []
    for target in LINK.findall(prose(open(os.path.join(REPO_ROOT, doc), encoding='utf-8').read())):
        if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # https:, mailto: ...
            continue
        path, _, fragment = target.partition('#')
        resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        found.append((resolved, fragment))
    return found


@pytest.mark.parametrize('doc', DOCS)
def test_every_relative_link_names_a_file_and_heading_in_the_repository(doc):
    problems = []
    for path, fragment in links(doc):
        full = os.path.join(REPO_ROOT, path)
        if path.startswith('..') or os.path.isabs(path):
            problems.append(f'{path}: outside the repository')
        elif not os.path.exists(full):
            problems.append(f'{path}: no such file')
        elif fragment and (not path.endswith('.md') or fragment not in anchors(full)):
            problems.append(f'{path}#{fragment}: no such heading')
    assert not problems, f'{doc}: ' + '; '.join(problems)


def test_the_docs_have_links_to_check():
    assert len(DOCS) > 3 and all(links(doc) for doc in ('README.md', 'docs/architecture.md'))
