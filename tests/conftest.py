import json
import os

import pytest

from fixtures.generate import MARKER_NAME, build

pytest_plugins = ["pytester"]  # test_synthetic runs a user's test file with the plugin alone

# verify remembers clean reports in the user's cache folder (ckpttool.operations.verify_cache): off in the tests, so
# that no test's verify answers from another's run; tests/test_verify_cache.py switches it on where it is tested.
os.environ["CKPTTOOL_CACHE_DIR"] = ""


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The whole fixture corpus, built once per test session with the real libraries."""
    root = tmp_path_factory.mktemp("corpus")
    made = build(str(root))
    made["_root"] = str(root)
    return made


@pytest.fixture
def no_payload(corpus):
    """Asserts after the test that the malicious pickle's marker file was never created."""
    marker = os.path.join(corpus["_root"], MARKER_NAME)
    yield marker
    assert not os.path.exists(marker), "a pickled payload was executed"


def run_json(runner, args):
    from ckpttool.cli import main

    result = runner.invoke(main, args)
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Runs written by the real trainers (transformers.Trainer, Lightning, a diffusers-style Accelerate loop, PEFT,
    torch.distributed.checkpoint as torchtitan lays it out), built once per test session; {name: run dir}."""
    from ckpttool.synthetic.runs import build_runs

    return build_runs(str(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="session")
def sealed_runs(tmp_path_factory):
    """Runs sealed as they saved by ckpttool's hooks (transformers single process and DDP, Lightning, Accelerate);
    {name: run dir}."""
    from ckpttool.synthetic.runs import build_sealed_runs

    return build_sealed_runs(str(tmp_path_factory.mktemp("sealed")))


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory):
    """Folders written by the real save_pretrained of transformers, diffusers (a pipeline) and PEFT, and a Hugging
    Face cache snapshot of one (fixtures/model_folders.py); {name: path}."""
    from fixtures.model_folders import build

    return build(str(tmp_path_factory.mktemp("model_folders")))
