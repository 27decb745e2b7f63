"""The one error hierarchy (gramstyle.errors): every class under GramstyleError, each old
import path the same class, FieldError carrying its field and value, and options validated
once into a frozen copy."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pickle
import pkgutil
import warnings

import pytest
from conftest import count_validation

from gramstyle import codec, errors
from gramstyle.errors import (
    Cancelled,
    FieldError,
    FieldWarning,
    GramstyleError,
    ImageError,
    MalformedRequest,
    ModelNotLoaded,
    QueueFull,
    ShuttingDown,
    WeightsError,
)
from gramstyle.options import MAX_ITERATIONS, MAX_SIZE, StyleOptions, default_within
from gramstyle.v1 import gramstyle_pb2 as pb

#: Every error class: (where it is imported from, name) -> its bases in the hierarchy.
OLD_PATHS = {
    ("gramstyle.engine", "Cancelled"): Cancelled,
    ("gramstyle.engine.stop", "Cancelled"): Cancelled,
    ("gramstyle.engine.transfer", "Cancelled"): Cancelled,
    ("gramstyle.engine.extractor", "WeightsError"): WeightsError,
    ("gramstyle.images", "ImageError"): ImageError,
    ("gramstyle.server.admission", "QueueFull"): QueueFull,
    ("gramstyle.server.admission", "ShuttingDown"): ShuttingDown,
    ("gramstyle.server.status", "ModelNotLoaded"): ModelNotLoaded,
    ("gramstyle.server.interceptors", "MalformedRequest"): MalformedRequest,
}


@pytest.mark.parametrize(("module", "name"), list(OLD_PATHS))
def test_every_old_import_path_is_the_one_class(module, name):
    assert getattr(importlib.import_module(module), name) is OLD_PATHS[module, name]


def test_the_deprecated_server_alias_is_the_same_class():
    import gramstyle.server

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert gramstyle.server.Cancelled is Cancelled


def test_the_hierarchy():
    from gramstyle.cli.flags import CLIError
    from gramstyle.client.errors import ServiceError

    for cls in (FieldError, Cancelled, QueueFull, ShuttingDown, MalformedRequest, CLIError,
                ServiceError):
        assert issubclass(cls, GramstyleError), cls
    for cls in (ImageError, WeightsError, ModelNotLoaded):
        assert issubclass(cls, FieldError), cls
    # A FieldError is a ValueError, so `except ValueError` callers keep working; the others
    # are not (a full queue is not a bad value).
    assert issubclass(FieldError, ValueError)
    for cls in (Cancelled, QueueFull, ShuttingDown, MalformedRequest, CLIError, ServiceError):
        assert not issubclass(cls, ValueError), cls


def _defined_exceptions() -> list[type]:
    """Every exception class defined in a gramstyle module (the generated stubs aside)."""
    names = ["gramstyle"]
    # The subpackages live in their own folders (engine/, server/, cli/, ...): walk each.
    for package in ("gramstyle", "gramstyle.engine", "gramstyle.server", "gramstyle.client",
                    "gramstyle.cli", "gramstyle.kernels"):
        path = importlib.import_module(package).__path__
        names += [package] + [info.name for info in pkgutil.iter_modules(path, package + ".")]
    found = []
    for name in dict.fromkeys(names):
        if ".v1" in name or name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional extra (the compiled op, ...)
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == name:
                found.append(cls)
    return found


def test_no_exception_class_outside_the_hierarchy():
    classes = _defined_exceptions()
    names = {cls.__name__ for cls in classes}
    # Those the brief lists, at least: they are all found by the walk.
    assert {"GramstyleError", "FieldError", "Cancelled", "QueueFull", "ShuttingDown",
            "WeightsError", "ImageError", "ModelNotLoaded", "MalformedRequest", "CLIError",
            "ServiceError"} <= names
    for cls in classes:
        if cls.__name__ == "StartupCancelled":
            # Control flow, like KeyboardInterrupt: raised from a signal handler into the
            # model load, so no `except Exception` on the way may swallow it.
            assert not issubclass(cls, Exception)
            continue
        assert issubclass(cls, (GramstyleError, Warning)), f"{cls.__module__}.{cls.__name__}"


def test_field_error_carries_field_problem_and_value():
    error = FieldError("iterations", "must be between 1 and 10000, got 0", 0)
    assert str(error) == "iterations: must be between 1 and 10000, got 0"
    assert (error.field, error.problem, error.value) == (
        "iterations", "must be between 1 and 10000, got 0", 0)
    weights = WeightsError("file not found: 'x.pth'", "x.pth")
    assert (weights.field, str(weights), weights.value) == (
        "weights", "weights: file not found: 'x.pth'", "x.pth")


@pytest.mark.parametrize("error", [
    FieldError("style[1]", "cannot decode image", b"xx"),
    ImageError("content[0]", "empty image (0 bytes)"),
    WeightsError("bad file", "w.pth"),
    ModelNotLoaded("arch", "model vgg11/* is not loaded", "vgg11"),
    Cancelled("stopped after 3 of 10 iterations", iterations=3),
    QueueFull("queue full"),
])
def test_errors_survive_pickling_with_their_attributes(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert copy.__dict__ == error.__dict__


def test_field_warning_names_its_field():
    with pytest.warns(FieldWarning) as caught:
        errors.warn_field("token", "sent in plaintext")
    assert caught[0].message.field == "token"
    assert str(caught[0].message) == "token: sent in plaintext"


# ------------------------------------------------------------------ options: fields, once

BAD_OPTIONS = [
    ({"iterations": 0}, "iterations", "iterations: must be between 1 and 10000, got 0"),
    ({"size": 5000}, "size", "size: must be an integer between 16 and 4096 pixels, got 5000"),
    ({"optimizer": "sgd"}, "optimizer", "optimizer: must be one of lbfgs, adam, got 'sgd'"),
    ({"content_weight": -1}, "content_weight", "content_weight: must be a finite number >= 0"),
    ({"style_layer_weights": (1, 2)}, "style_layer_weights",
     "style_layer_weights: expected 5 value(s), one per item, got 2"),
    ({"content_layer_weights": (float("nan"),)}, "content_layer_weights[0]",
     "content_layer_weights[0]: must be a finite number >= 0, got nan"),
    ({"style_blend_weights": (1.0, -2.0)}, "style_blend_weights[1]",
     "style_blend_weights[1]: must be a finite number >= 0, got -2.0"),
    ({"content_layers": (), "style_layers": ()}, "content_layers/style_layers",
     "content_layers/style_layers: at least one layer is needed"),
    ({"style_scale": 16.0}, "style_scale", "style_scale: must be > 0 and keep size*style_scale"),
    ({"scales": 5, "size": 64}, "scales", "scales: 5 scales from size 64 would start below"),
    ({"iterations": 5000, "scales": 3}, "iterations",
     "iterations: iterations*scales must be at most 10000, got 5000*3"),
    ({"preserve_colors": "yes"}, "preserve_colors", "preserve_colors: must be true or false"),
]


@pytest.mark.parametrize(("given", "field", "message"), BAD_OPTIONS)
def test_options_errors_are_field_errors(given, field, message):
    with pytest.raises(FieldError) as info:
        StyleOptions(**given).validated()
    assert info.value.field == field
    assert str(info.value).startswith(message)
    assert str(info.value).startswith(info.value.field + ": ")


def test_validated_options_are_frozen_and_checked_once(monkeypatch):
    import gramstyle.options as options_module

    checked: list[str] = []
    real = options_module.check_value
    monkeypatch.setattr(options_module, "check_value",
                        lambda name, *args: (checked.append(name), real(name, *args))[1])
    options = StyleOptions(size=256, content_layers="relu3_1, relu4_2").validated()
    assert options.content_layers == ("relu3_1", "relu4_2")
    assert sorted(checked) == sorted(name for name, _, _ in StyleOptions.specs())
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.size = 128
    # Asked again within the same or looser limits: the same object, no check repeated.
    checked.clear()
    assert options.validated() is options
    assert options.validated(max_size=MAX_SIZE, max_iterations=MAX_ITERATIONS) is options
    assert checked == []
    # Tighter limits are checked (and may refuse).
    with pytest.raises(FieldError, match=r"^size: must be an integer between 16 and 128 "):
        options.validated(max_size=128)
    # A changed copy is unchecked and mutable again.
    copy = dataclasses.replace(options, size=64)
    copy.iterations = 5
    assert copy.checked_limits is None and options.checked_limits == (MAX_SIZE, MAX_ITERATIONS)


def test_the_engine_trusts_options_it_checked(random_engine, monkeypatch):
    checked, resolved = count_validation(monkeypatch, random_engine)
    options = random_engine.validate(StyleOptions(content_layers=("22",), precision="auto"))
    assert options.content_layers == ("relu4_2",) and options.precision in ("fp32", "bf16")
    assert options.network == random_engine.model_key
    assert len(checked) == len(list(StyleOptions.specs()))
    assert sorted(resolved) == ["content_layers", "style_layers"]
    checked.clear(), resolved.clear()
    assert random_engine.validate(options) is options
    assert checked == [] and resolved == []


def test_unset_size_and_iterations_fall_back_to_the_limits():
    assert default_within() == {"size": 512, "iterations": 300}
    assert default_within(max_size=256, max_iterations=100) == {"size": 256, "iterations": 100}
    assert default_within(max_iterations=100, scales=3) == {"size": 512, "iterations": 33}
    request = pb.StylizeRequest()
    options = codec.stylize_options(request, max_size=256, max_iterations=100)
    assert (options.size, options.iterations) == (256, 100)
    options = codec.stylize_options(pb.StylizeRequest(scales=2), max_size=256, max_iterations=100)
    assert (options.size, options.iterations, options.scales) == (256, 50, 2)
    # A value the caller set is its own, and refused over the limit.
    with pytest.raises(FieldError, match=r"^iterations: must be between 1 and 100, got 300$"):
        codec.stylize_options(pb.StylizeRequest(iterations=300), 256, 100)
    with pytest.raises(FieldError, match=r"^size: must be an integer between 16 and 256 "
                                         r"pixels, got 512$"):
        codec.stylize_options(pb.StylizeRequest(size=512), 256, 100)
    # Without lower limits nothing changes: the declared defaults.
    assert codec.stylize_options(pb.StylizeRequest()) == StyleOptions()
