"""Requests the server must refuse with a 422 naming the field, never a 5xx: integers out of any range (query, path
and body), then schemathesis over the app's own /openapi.json, positive and negative, derandomized so that every run
sends the same requests."""

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from test_serve import thread_server, tiny_model, tiny_pipe  # noqa: F401 - fixtures

# Small limits keep every generation the fuzzer asks for to a few milliseconds on the tiny 32x32 model.
LIMITS = dict(max_steps=4, max_batch=2, max_queue=4, max_pixels=64 * 64)
HUGE = 26842604487293621248196608  # over 2**64: SQLite cannot bind it, torch cannot hold it

# (method, path, request keywords, the field the 422 must name)
OUT_OF_RANGE = [
    ("get", "/v1/jobs", {"params": {"offset": HUGE}}, "offset"),
    ("get", "/v1/jobs", {"params": {"offset": -HUGE}}, "offset"),
    ("get", "/v1/jobs", {"params": {"limit": HUGE}}, "limit"),
    ("get", f"/v1/images/job/{HUGE}.png", {}, "index"),
    ("get", f"/v1/images/job/{-HUGE}.png", {}, "index"),
    *[("post", "/v1/jobs", {"json": {"prompt": "x", field: v}}, field)
      for field in ("n", "width", "height", "steps", "seed") for v in (HUGE, -HUGE)],
    *[("post", "/v1/images/generations", {"json": {"prompt": "x", field: v}}, field)
      for field in ("n", "steps", "seed") for v in (HUGE, -HUGE)],
    ("post", "/v1/images/generations", {"json": {"prompt": "x", "size": f"{HUGE}x{HUGE}"}}, "size"),
    *[("post", "/sdapi/v1/txt2img", {"json": {"prompt": "x", field: v}}, field)
      for field in ("batch_size", "n_iter", "width", "height", "steps", "seed") for v in (HUGE, -HUGE)],
]  # fmt: skip


def test_integers_out_of_range_get_422_naming_the_field(thread_server):  # noqa: F811
    wrong = []
    with thread_server(**LIMITS) as server:
        for method, path, kwargs, field in OUT_OF_RANGE:
            response = requests.request(method, server.base + path, timeout=30, **kwargs)
            error = response.json().get("error", {}) if response.status_code == 422 else {}
            if error.get("param") != field or not error.get("message", "").startswith(field):
                wrong.append((method, path, kwargs, response.status_code, response.text[:200]))
    assert not wrong, "\n".join(map(str, wrong))


def test_openapi_states_the_bounds_of_every_integer(thread_server):  # noqa: F811
    """Each integer a client sends has a minimum in the document, and a maximum unless the server's limits set it."""
    with thread_server(**LIMITS) as server:
        document = requests.get(server.base + "/openapi.json", timeout=30).json()
    integers = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                integers[f"{method} {path} {parameter['name']}"] = _integer(parameter["schema"])
    for name, model in document["components"]["schemas"].items():
        for field, schema in model.get("properties", {}).items():
            integers[f"{name}.{field}"] = _integer(schema)
    integers = {k: v for k, v in integers.items() if v is not None}
    assert integers and all("minimum" in v for v in integers.values()), integers
    assert integers["get /v1/jobs offset"]["maximum"] == 2**53 - 1
    assert integers["get /v1/images/{job_id}/{index}.png index"]["maximum"] == 2**53 - 1
    assert "maximum" in integers["JobRequest.seed"] and "maximum" in integers["A1111Txt2ImgRequest.seed"]


def _integer(schema: dict) -> dict | None:
    """The integer branch of a parameter's or property's schema (``anyOf: [integer, null]`` included)."""
    for option in [schema, *schema.get("anyOf", [])]:
        if option.get("type") == "integer":
            return option
    return None


EXAMPLES = 25  # per operation and mode: about 600 requests, well under a minute on 2 cores


def test_fuzzing_the_openapi_document_finds_no_server_error(thread_server):  # noqa: F811
    failures = []
    with thread_server(**LIMITS) as server:
        schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 10, [op.label for op in operations]
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    _fuzz(operation, mode, server.base)
                except Unsatisfiable:  # nothing in the request can be made invalid (no parameters, free strings)
                    assert mode == GenerationMode.NEGATIVE, operation.label
                except (FailureGroup, Exception) as error:  # collected, so that one run reports every operation
                    failures.append(f"{operation.label} ({mode.value}): {error}")
    assert not failures, "\n\n".join(failures)


def _fuzz(operation, mode, base: str) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def one(case):
        case.call_and_validate(base_url=base, checks=[not_a_server_error], timeout=60)

    one()
