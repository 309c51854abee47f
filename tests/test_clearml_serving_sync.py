"""`clearml-umem serving-sync`: a clearml-serving service's endpoints follow what a serve task serves.

clearml-serving's own ModelRequestProcessor and the real SDK, in a child process, against the API
fixture (a service is a task with configuration objects and artifacts on a server).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.clearml_env import REPO, offline_env, run_python
from tests.fixtures.clearml_api_server import ClearMLApiFixture

pytestmark = pytest.mark.slow


def test_endpoints_are_added_and_removed_with_the_served_models(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    api = ClearMLApiFixture().start()
    try:
        uri = tiny_models["tiny-llama"].resolve().as_uri()
        model_a = api.add_model("alpha", uri, project="sync/models")
        model_b = api.add_model("beta", uri, project="sync/models")
        env = offline_env(tmp_path, **api.env())
        env.pop("CLEARML_OFFLINE_MODE")
        (tmp_path / "files").mkdir()
        env["CLEARML_FILES_HOST"] = (tmp_path / "files").as_uri()
        proc = run_python(["tests/clearml_serving_sync_run.py", model_a, model_b, str(tiny_models["tiny-llama"]),
                           str(REPO / "serving" / "preprocess.py")], env, timeout=300)
        out = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    finally:
        api.stop()

    first = out["first"]
    assert set(first) == {"manual", "alpha", "beta"}, out["first_run"]
    for name, model_id in (("alpha", model_a), ("beta", model_b)):
        assert first[name]["model_id"] == model_id and first[name]["engine"] == "custom_async"
        assert first[name]["code"] and first[name]["aux"]["model"] == name
        assert first[name]["metrics"] == ["umem_completion_tokens", "umem_prompt_tokens", "umem_served_from"]
    assert "added alpha, beta" in out["first_run"]
    assert "added none" in out["again_run"] and "removed none" in out["again_run"], "idempotent"
    assert set(out["second"]) == {"manual", "beta"}, "alpha left; the hand-made endpoint stays"
    assert "removed alpha" in out["second_run"]
