"""Inside sagactl the modules import downward: the entry point, the app, the command modules, then what they share."""

from __future__ import annotations

from tests.contract.test_layout import _circle, _imports, _module_name, _python_files

# Each layer may import the layers after it, lazy imports included; nothing imports the entry point.
LAYERS = (
    {"sagactl.main"},
    {"sagactl.app"},
    {"sagactl.stack", "sagactl.order", "sagactl.reads", "sagactl.operate", "sagactl.waiting",
     "sagactl.definitions", "sagactl.conformance", "sagactl.web_command"},
    {"sagactl.web.server"},
    {"sagactl.web.app"},
    {"sagactl.web.pages"},
    {"sagactl.web.timeline", "sagactl.web.grpc_calls", "sagactl.web.security"},
    {"sagactl.web", "sagactl.web.views", "sagactl.web.settings"},
    {"sagactl.definition_graph"},
    {"sagactl.common", "sagactl.demo"},
    {"sagactl.completion"},
    {"sagactl.roothelp", "sagactl.client", "sagactl.render"},
    {"sagactl.settings"},
)  # fmt: skip


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    modules = {_module_name(path): path for path in _python_files("sagactl")}
    longest_first = sorted(modules, key=len, reverse=True)
    for module, path in modules.items():
        for _, name in _imports(path):
            target = next((known for known in longest_first if name == known or name.startswith(f"{known}.")), None)
            if target not in (None, module, "sagactl"):
                graph.setdefault(module, set()).add(str(target))
    return graph


def test_every_module_is_in_a_layer() -> None:
    modules = {_module_name(path) for path in _python_files("sagactl")} - {"sagactl"}
    assert modules == set().union(*LAYERS)


def test_modules_import_only_the_layers_below_them() -> None:
    layer_of = {module: index for index, layer in enumerate(LAYERS) for module in layer}
    upward = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if layer_of[target] <= layer_of[module]
    ]
    assert not upward, upward
    assert _circle(_graph()) is None
    # Guards the check itself: the entry point's lazy import of the app is seen.
    assert "sagactl.app" in _graph()["sagactl.main"]
