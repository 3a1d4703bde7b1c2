"""The Python-backend model of a medsr Triton repository: ``medsr-export --triton`` copies this file to
``<model>/1/model.py`` (docs/serving.md).

Triton calls ``execute`` with the requests its dynamic batcher gathered; medsr.serve.service checks each one, runs
those that share a plane shape, steps and consistency as one engine batch (each plane seeded on its own), and
answers a bad request with an error response of its own, so the others of its batch still get their images.
The Python environment of the backend needs medsr (with onnxruntime, or openvino) importable;
``triton_python_backend_utils`` is the backend's own module, imported where it is used.
"""

import json
import os

import numpy as np


class TritonPythonModel:
    def initialize(self, args):
        from medsr.serve.service import open_service

        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        bundle = parameters.get("bundle") or "bundle"
        threads = int(parameters.get("threads") or 0) or None
        bounds = {}  # max_request_bytes: absent in older repositories (the service's default), 0 for no bound
        if "max_request_bytes" in parameters:
            bounds["max_request_bytes"] = int(parameters["max_request_bytes"]) or None
        self.service = open_service(
            os.path.join(version_dir, bundle),
            engine=parameters.get("engine", "ort"),
            device=parameters.get("device", "cpu"),
            precision=parameters.get("precision", "fp32"),
            threads=threads,
            **bounds,
        )
        self.input_name = config["input"][0]["name"]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils  # the Python backend's own module, there only

        from medsr.errors import InputError, MedsrError

        parsed = []
        for request in requests:
            try:
                lr = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
                parsed.append(self.service.parse(lr, json.loads(request.parameters() or "{}")))
            except MedsrError as exc:
                parsed.append(exc)
        responses = []
        for result in self.service.run(parsed):
            if isinstance(result, Exception):
                code = (
                    pb_utils.TritonError.INVALID_ARG
                    if isinstance(result, InputError)
                    else pb_utils.TritonError.INTERNAL
                )
                error = pb_utils.TritonError(f"medsr: {result}", code)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                tensors = [
                    pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in result.outputs().items()
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self):
        self.service = None
