"""Make registry entries the usual ClearML ways, with the real SDK, and print their IDs as JSON.

Run as a child process against the API fixture (a task script's SDK session is process-wide):
`OutputModel.update_weights(register_uri=...)` (a reference to a folder),
`OutputModel.update_weights_package(...)` (a zipped folder uploaded: the SDK records
TensorFlow for it), and clearml-serving's own `model upload --path DIR` code.

    python tests/clearml_sdk_entries.py PROJECT MODEL_DIR STORE_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    project, model_dir, store = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    from clearml import OutputModel, Task

    from clearml_umem.clearml_io.session import use_reporter_thread

    # a user's training script, doing what docs/clearml.md advises: with the SDK's default forked
    # reporter, Task.close() can wait 300 s for a repository detection the fork left half done
    use_reporter_thread()
    store.mkdir(parents=True, exist_ok=True)
    task = Task.init(project_name=project, task_name="train", output_uri=store.as_uri(),
                     auto_connect_frameworks=False, auto_resource_monitoring=False, auto_connect_arg_parser=False)
    referenced = OutputModel(task=task, name="referenced")
    referenced.update_weights(register_uri=model_dir.resolve().as_uri())
    packaged = OutputModel(task=task, name="packaged")
    packaged.update_weights_package(weights_path=str(model_dir), auto_delete_file=False)
    task.flush(wait_for_uploads=True)
    ids = {"referenced": referenced.id, "packaged": packaged.id, "task": task.id}
    try:
        from clearml_serving.__main__ import func_model_upload
    except ImportError:
        func_model_upload = None
    if func_model_upload is not None:
        uploaded_ids = set()
        args = argparse.Namespace(path=str(model_dir), url=None, id=task.id, name="served-upload", tags=None,
                                  framework=None, destination=store.as_uri(), project=project, publish=False)
        before = {m.id for m in task.models["output"]}
        func_model_upload(args)
        task.reload()
        uploaded_ids = {m.id for m in task.models["output"]} - before
        ids["clearml_serving_upload"] = uploaded_ids.pop() if uploaded_ids else None
    task.close()
    print("ENTRIES " + json.dumps(ids), flush=True)


if __name__ == "__main__":
    main()
