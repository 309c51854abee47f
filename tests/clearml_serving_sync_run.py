"""Child process for tests/test_clearml_serving_sync.py, against the API fixture: a serve task that
publishes what it serves (ServeTaskRecord, as tasks/serve.py does), a clearml-serving service made
by clearml-serving's own code with one hand-made endpoint, and `clearml-umem serving-sync` run as a
command, then again in this process (the same code, without another SDK start) after each change.
Prints the service's endpoints after each run as JSON.

    python tests/clearml_serving_sync_run.py MODEL_A_ID MODEL_B_ID WEIGHTS_DIR PREPROCESS
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from clearml import Task
from clearml_serving.serving.endpoints import ModelEndpoint
from clearml_serving.serving.model_request_processor import ModelRequestProcessor

from clearml_umem.clearml_io.serve_record import ServeTaskRecord
from clearml_umem.clearml_io.serving_sync import served_by_task, sync_service
from clearml_umem.spec import ModelSpec


def endpoints(service_id: str) -> dict[str, Any]:
    processor = ModelRequestProcessor(task_id=service_id)
    processor.deserialize(skip_sync=True)
    metrics = processor.list_metric_logging()
    return {url: {"model_id": e.model_id, "engine": e.engine_type, "code": e.preprocess_artifact,
                  "aux": e.auxiliary_cfg, "metrics": sorted((metrics.get(url).metrics or {}) if url in metrics else [])}
            for url, e in processor.get_endpoints().items()}


def main() -> None:
    model_a, model_b, weights, preprocess = sys.argv[1:5]
    serve = Task.init(project_name="umem-tests", task_name="serve", auto_connect_frameworks=False,
                      auto_resource_monitoring=False, auto_connect_arg_parser=False)
    record = ServeTaskRecord(serve, "http://10.0.0.7:8000")
    specs = [ModelSpec("alpha", weights, 1, model_id=model_a), ModelSpec("beta", weights, 1, model_id=model_b)]
    record.update(specs)

    service = ModelRequestProcessor(force_create=True, name="llm serving", project="umem-tests")
    service.add_endpoint(ModelEndpoint(engine_type="custom_async", serving_url="manual"), preprocess_code=preprocess)
    service.serialize()
    service_id = service.get_id()

    def sync() -> str:
        done = subprocess.run([sys.executable, "-m", "clearml_umem", "serving-sync", "--service-id", service_id,
                               "--serve-task-id", serve.id, "--preprocess", preprocess],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise SystemExit(f"serving-sync failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout.strip().splitlines()[-1]

    def sync_here() -> str:
        result = sync_service(service_id, served_by_task(serve.id), Path(preprocess))
        return f"added {', '.join(result.added) or 'none'}; removed {', '.join(result.removed) or 'none'}"

    out: dict[str, Any] = {"first_run": sync(), "first": endpoints(service_id)}
    out["again_run"] = sync_here()
    record.update(specs[1:])
    out["second_run"] = sync_here()
    out["second"] = endpoints(service_id)
    record.close()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
