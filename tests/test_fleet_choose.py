"""The fleet's choice of router for a model (fleet/choose.py, pure) and the parts of the front that
need no router: the status parser, discovery's URL handling, the device a clearml-agent gives."""

from __future__ import annotations

import pytest

from clearml_umem.device_env import assigned_gpus, device_label
from clearml_umem.fleet.choose import ModelLoad, RouterView, models_served, rank, round_robin
from clearml_umem.fleet.discovery import StaticRouters, _property
from clearml_umem.fleet.probe import parse_status


def router(url: str, alive: bool = True, pending: int = 0, **models: tuple) -> RouterView:
    return RouterView(url, alive, {name: ModelLoad(*spec) for name, spec in models.items()}, pending=pending)


A, B, C = "http://a", "http://b", "http://c"

CASES = [
    # (what it shows, routers, model, expected order)
    ("hot wins over ram and disk", [router(A, m=("disk",)), router(B, m=("gpu",)), router(C, m=("ram",))], "m",
     [B, C, A]),
    ("ram wins over disk and cold", [router(A, m=("cold",)), router(B, m=("disk",)), router(C, m=("ram",))], "m",
     [C, B, A]),
    ("hot but busy still beats idle in ram", [router(A, m=("gpu", 5, 3)), router(B, m=("ram",))], "m", [A, B]),
    ("replicas hot on two: the least loaded first",
     [router(A, m=("gpu", 3, 1)), router(B, m=("gpu", 1, 0)), router(C, m=("gpu", 2, 0))], "m", [B, C, A]),
    ("load counts every model of the router", [router(A, m=("cold",), x=("gpu", 4)), router(B, m=("cold",))], "m",
     [B, A]),
    ("the front's own open requests count when the router has not seen them",
     [router(A, pending=3, m=("gpu",)), router(B, m=("gpu", 1))], "m", [B, A]),
    ("the front's count and the router's are not added up",
     [router(A, pending=2, m=("gpu", 2)), router(B, m=("gpu", 3))], "m", [A, B]),
    ("cold everywhere: the router with nothing to evict",
     [router(A, m=("cold",), x=("gpu",)), router(B, m=("cold",), x=("ram",)), router(C, m=("cold",), y=("gpu",))],
     "m", [B, A, C]),
    ("a model on its way to the GPU counts as hot", [router(A, m=("cold", 0, 1, "gpu")), router(B, m=("ram",))],
     "m", [A, B]),
    ("a model leaving the GPU counts as where it goes", [router(A, m=("gpu", 0, 0, "disk")), router(B, m=("ram",))],
     "m", [B, A]),
    ("a dead router is never chosen", [router(A, alive=False, m=("gpu",)), router(B, m=("disk",))], "m", [B]),
    ("a router that does not serve the model is never chosen", [router(A, x=("gpu",)), router(B, m=("cold",))],
     "m", [B]),
    ("no router serves it", [router(A, x=("gpu",)), router(B, alive=False, m=("gpu",))], "m", []),
    ("equal routers: stable by URL", [router(C, m=("ram",)), router(A, m=("ram",)), router(B, m=("ram",))], "m",
     [A, B, C]),
]


@pytest.mark.parametrize(("routers", "model", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rank(routers: list[RouterView], model: str, expected: list[str]) -> None:
    assert [r.url for r in rank(routers, model)] == expected


def test_round_robin_turns_through_live_routers_whatever_they_hold() -> None:
    routers = [router(A, m=("gpu",)), router(B, m=("cold",)), router(C, alive=False, m=("gpu",))]
    assert [[r.url for r in round_robin(routers, "m", turn)][0] for turn in range(4)] == [A, B, A, B]


def test_models_served_is_the_union_over_live_routers() -> None:
    routers = [router(A, m=("gpu",), x=("cold",)), router(B, m=("ram",)), router(C, alive=False, y=("gpu",))]
    assert models_served(routers) == {"m": [A, B], "x": [A]}


def test_parse_status_reads_a_router_and_refuses_anything_else() -> None:
    view = parse_status(A, {"object": "router.status", "device": "h/cpu", "models": [
        {"id": "m", "tier": "ram", "moving_to": "gpu", "in_flight": 1, "waiting": 2}]})
    assert view.alive and view.device == "h/cpu" and view.models["m"] == ModelLoad("ram", 1, 2, "gpu")
    assert view.load == 3
    assert not parse_status(A, {"detail": "Not Found"}).alive
    assert not parse_status(A, ["x"]).alive


@pytest.mark.parametrize(("text", "urls"), [
    ("http://h:1/v1, http://h:2/", ("http://h:1", "http://h:2")),
    ("http://h:1,http://h:1/v1", ("http://h:1",)),
])
def test_static_routers(text: str, urls: tuple[str, ...]) -> None:
    assert StaticRouters.parse(text)() == list(urls)


@pytest.mark.parametrize("text", ["", "h:8000", "http://h:1,ftp://x"])
def test_static_routers_refuse_what_is_not_a_url(text: str) -> None:
    with pytest.raises(ValueError):
        StaticRouters.parse(text)


def test_task_property_read_from_either_shape() -> None:
    class Item:
        value = "http://h:1/v1"

    assert _property({"properties": {"router_url": {"value": "http://h:1/v1"}}}, "router_url") == "http://h:1/v1"
    assert _property({"properties": {"router_url": Item()}}, "router_url") == "http://h:1/v1"
    assert _property({}, "router_url") is None and _property(None, "router_url") is None


@pytest.mark.parametrize(("env", "gpus"), [
    ({"CUDA_VISIBLE_DEVICES": "3"}, ["3"]),
    ({"CUDA_VISIBLE_DEVICES": "2,5", "NVIDIA_VISIBLE_DEVICES": "all"}, ["2", "5"]),
    ({"NVIDIA_VISIBLE_DEVICES": "GPU-1a2b"}, ["GPU-1a2b"]),
    ({"NVIDIA_VISIBLE_DEVICES": "all"}, []),
    ({"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "4"}, []),
    ({}, []),
])
def test_assigned_gpus_as_a_clearml_agent_gives_them(env: dict[str, str], gpus: list[str]) -> None:
    assert assigned_gpus(env) == gpus


def test_device_label_names_the_card_the_agent_gave() -> None:
    assert device_label("cuda", {"CUDA_VISIBLE_DEVICES": "3"}, host="m1") == "m1/cuda:0=GPU 3"
    assert device_label("cuda:1", {"CUDA_VISIBLE_DEVICES": "2,5"}, host="m1") == "m1/cuda:1=GPU 5"
    assert device_label("cpu", {"CUDA_VISIBLE_DEVICES": "3"}, host="m1") == "m1/cpu"
