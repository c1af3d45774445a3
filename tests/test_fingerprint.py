"""Behaviour does not change by accident: what inspect, verify and verify --for-resume say of every fixture and every
real-library sample equals the record (tests/data/fingerprint.json, written by `python -m tests.fingerprint
--record` in the commit that changes it on purpose, which says why)."""

import json

from tests.fingerprint import RECORD, fingerprint, samples


def test_what_ckpttool_says_of_every_fixture_and_sample_is_the_record(corpus):
    paths = {f"corpus/{name}": path for name, path in corpus.items() if isinstance(path, str) and name != "_root"}
    paths.update({f"data/{name}": path for name, path in samples().items()})
    now = json.loads(json.dumps(fingerprint(paths)))
    with open(RECORD) as f:
        recorded = json.load(f)
    changed = sorted(name for name in set(now) | set(recorded) if now.get(name) != recorded.get(name))
    assert not changed, "behaviour changed for " + "; ".join(
        f"{name}: {json.dumps(recorded.get(name))} -> {json.dumps(now.get(name))}" for name in changed[:5])
