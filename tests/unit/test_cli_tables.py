"""The tables `lmbridge models` prints (proxy/cli.py), from /v1/models as the daemon
answers it."""

from __future__ import annotations

from proxy.cli import render_models

MODEL = {"id": "qwen3-8b", "type": "llm", "state": "loaded", "max_context_length": 32768}


def test_one_upstream_has_no_upstreams_column():
    table = render_models([{**MODEL, "upstreams": ["default"]}])
    assert table.splitlines()[0].split() == ["ID", "TYPE", "STATE", "CONTEXT", "TOOLS", "PROFILE"]


def test_several_upstreams_say_which_list_each_model():
    models = [
        {**MODEL, "upstreams": ["studio", "box"]},
        {**MODEL, "id": "qwen3-32b", "upstreams": ["box"]},
    ]
    lines = render_models(models).splitlines()
    assert lines[0].split()[-1] == "UPSTREAMS"
    assert lines[1].endswith("studio, box") and lines[2].endswith("box")
