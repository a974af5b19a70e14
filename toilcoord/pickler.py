"""Serialising calls for another process: pickle, plus code by value.

Plain :mod:`pickle` refers to functions and classes by name, which another
process cannot resolve for a lambda, a nested function, a class defined in
a function, or anything of the ``__main__`` script. :func:`dumps` tries
plain pickle first and falls back to a pickler that carries such functions
and plain classes as their code and namespace (marshalled bytecode, tagged
with the interpreter that made it: another Python version refuses it with
:class:`ForeignCodeError` instead of crashing). Their globals travel by
module name where another process can import the module, else by value.

Only files this user wrote are ever unpickled (see ``deferred.py``): a
pickle runs code by design.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Any, Optional, Tuple

__all__ = ["PROTOCOL", "ForeignCodeError", "callable_name", "dumps", "is_reachable", "short_repr", "unserialisable"]

# A fixed protocol, so every Python from 3.8 on reads what any other wrote.
PROTOCOL = 5

# pickle is loaded on first use: importing the package must stay light.
_pickle_dumps: Any = None


def dumps(obj: object) -> bytes:
    """Pickle *obj* so that another process on this node can load it."""
    global _pickle_dumps
    if _pickle_dumps is None:
        import pickle

        _pickle_dumps = pickle.dumps
    try:
        data = _pickle_dumps(obj, PROTOCOL)
    except Exception:
        # Lambdas, nested functions and the like: the full pickler below
        # either handles them or raises the error worth reporting.
        return _dumps_by_value(obj)
    if b"__main__" in data:
        # Plain pickle refers to __main__ by name, which is another program
        # in the process that runs it; rare, so pay for the full pickler.
        return _dumps_by_value(obj)
    return data


def _dumps_by_value(obj: object) -> bytes:
    import io

    buffer = io.BytesIO()
    _by_value_pickler()(buffer, PROTOCOL).dump(obj)
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def _by_value_pickler() -> type:
    import pickle

    class ByValuePickler(pickle.Pickler):
        """Carries functions that cannot be imported by name as code."""

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, types.FunctionType):
                return _reduce_function(obj)
            if isinstance(obj, type):
                return _reduce_class(obj)
            if isinstance(obj, types.ModuleType):
                return _import_module, (_module_reference(obj.__name__),)
            # What a class carried by value holds besides functions.
            if isinstance(obj, (classmethod, staticmethod)):
                return type(obj), (obj.__func__,)
            if type(obj) is property:
                return property, (obj.fget, obj.fset, obj.fdel, obj.__doc__)
            return NotImplemented

    return ByValuePickler


def _main_module_name() -> Optional[str]:
    """The importable name of ``__main__`` (run with ``-m``), or None for a
    script, ``-c`` or an interactive session, which others cannot import."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    return name if name and name != "__main__" else None


def _module_reference(name: str) -> str:
    if name != "__main__":
        return name
    main = _main_module_name()
    if main is None:
        raise TypeError("the __main__ script cannot be imported by another process")
    return main


def _import_module(name: str) -> types.ModuleType:
    if name == _main_module_name():
        return sys.modules["__main__"]  # the creator itself: do not import it twice
    import importlib

    return importlib.import_module(name)


def _load_attribute(module: str, qualname: str) -> Any:
    obj: Any = _import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def is_reachable(obj: Any, module: Optional[str]) -> bool:
    """True if *obj* is what its qualified name finds in its loaded module."""
    found: Any = sys.modules.get(module or "")
    for part in getattr(obj, "__qualname__", "<>").split("."):
        found = getattr(found, part, None)
    return found is obj


def _reduce_by_name(obj: Any) -> Any:
    """How pickle reduces a class or function it can find again by name:
    NotImplemented (pickle's own way), a lookup under the real name of the
    ``__main__`` module, or None: it must travel by value."""
    module = obj.__module__
    if is_reachable(obj, module):
        if module != "__main__":
            return NotImplemented  # by name, as pickle always does
        main = _main_module_name()
        if main is not None:
            return _load_attribute, (main, obj.__qualname__)
    return None


def _reduce_class(cls: type) -> Any:
    reduced = _reduce_by_name(cls)
    return reduced if reduced is not None else _reduce_class_by_value(cls)


# Set by the interpreter on every class, or describing its instances' layout:
# never carried.
_CLASS_MACHINERY = frozenset(("__dict__", "__weakref__"))


def _reduce_class_by_value(cls: type) -> Any:
    """Carry a class that another process cannot import by name (defined in
    a function, or in the __main__ script) as its name, bases and namespace,
    as lambdas are carried. Plain classes only: a metaclass could do
    anything when the class is made again."""
    if type(cls) is not type:
        raise TypeError(
            f"class {cls.__qualname__} cannot be imported by another process and has the metaclass "
            f"{type(cls).__qualname__}; only plain classes defined in functions can be deferred"
        )
    namespace = {key: value for key, value in vars(cls).items() if key not in _CLASS_MACHINERY}
    slots = namespace.get("__slots__", ())
    for slot in (slots,) if isinstance(slots, str) else slots:
        namespace.pop(slot, None)  # member descriptors: made again from __slots__
    # The class exists (and is memoised) before its namespace is set, so its
    # methods may refer to it (super(), a closure over __class__).
    skeleton = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    if "__slots__" in namespace:
        skeleton["__slots__"] = namespace.pop("__slots__")
    namespace.pop("__module__", None)
    namespace.pop("__qualname__", None)
    return _new_class, (cls.__name__, cls.__bases__, skeleton), namespace, None, None, _set_class_state


def _new_class(name: str, bases: tuple, skeleton: dict) -> type:
    return type(name, bases, dict(skeleton))


def _set_class_state(cls: type, namespace: dict) -> None:
    for key, value in namespace.items():
        setattr(cls, key, value)


class _EmptyCell:
    """Stands for a closure cell that had no value yet."""


def _reduce_function(fn: types.FunctionType) -> Any:
    reduced = _reduce_by_name(fn)
    if reduced is not None:
        return reduced
    import marshal

    globals_module = _globals_module(fn)
    captured = _referenced_globals(fn) if globals_module is None else None
    closure = fn.__closure__ or ()
    values = tuple(_cell_value(cell) for cell in closure)
    # The state is set after the function exists and is memoised, so a
    # function may refer to itself through its closure or globals.
    state = (fn.__qualname__, fn.__module__, fn.__defaults__, fn.__kwdefaults__, fn.__dict__ or None, values, captured)
    arguments = (_code_tag(), marshal.dumps(fn.__code__), globals_module, fn.__name__, len(closure))
    return _new_function, arguments, state, None, None, _set_function_state


def _globals_module(fn: types.FunctionType) -> Optional[str]:
    """The module another process imports to get *fn*'s globals, or None if
    they must travel by value (the __main__ script, an exec namespace)."""
    name = fn.__globals__.get("__name__")
    module = sys.modules.get(name) if isinstance(name, str) else None
    if module is None or vars(module) is not fn.__globals__:
        return None
    return name if name != "__main__" else _main_module_name()


def _referenced_globals(fn: types.FunctionType) -> dict:
    names = _global_names(fn.__code__)
    namespace = fn.__globals__
    return {name: namespace[name] for name in names if name in namespace and name != "__builtins__"}


def _global_names(code: types.CodeType) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EmptyCell


class ForeignCodeError(ImportError):
    """Marshalled code made by another Python version (like a .pyc with a
    bad magic number, which importlib reports as ImportError)."""


def _code_tag() -> Tuple[str, bytes]:
    from importlib.util import MAGIC_NUMBER

    return f"{sys.implementation.name} {sys.version_info[0]}.{sys.version_info[1]}", MAGIC_NUMBER


def _new_function(
    tag: Tuple[str, bytes], code: bytes, globals_module: Optional[str], name: str, cells: int
) -> types.FunctionType:
    ours = _code_tag()
    if tuple(tag) != ours:
        # Checked before marshal.loads: foreign bytecode could crash us.
        raise ForeignCodeError(
            f"deferred function {name} was compiled by {tag[0]} (bytecode {tag[1].hex()}) "
            f"and cannot run on {ours[0]} (bytecode {ours[1].hex()})"
        )
    import builtins
    import marshal

    if globals_module is None:
        namespace = {"__builtins__": builtins}
    else:
        namespace = vars(_import_module(globals_module))
    closure = tuple(types.CellType() for _ in range(cells)) or None
    return types.FunctionType(marshal.loads(code), namespace, name, None, closure)


def _set_function_state(fn: types.FunctionType, state: tuple) -> None:
    qualname, module, defaults, kwdefaults, attributes, values, captured = state
    if captured:
        fn.__globals__.update(captured)
    for cell, value in zip(fn.__closure__ or (), values):
        if value is not _EmptyCell:
            cell.cell_contents = value
    fn.__qualname__ = qualname
    fn.__module__ = module
    fn.__defaults__ = defaults
    fn.__kwdefaults__ = kwdefaults
    if attributes:
        fn.__dict__.update(attributes)


def callable_name(function: Any) -> str:
    if isinstance(function, functools.partial):
        return f"partial({callable_name(function.func)})"
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
    return name if isinstance(name, str) else type(function).__qualname__


def short_repr(obj: object) -> str:
    try:
        text = repr(obj)
    except Exception:  # a broken __repr__ must not hide the real error
        text = object.__repr__(obj)
    return text if len(text) <= 120 else text[:117] + "..."


def unserialisable(function: Any, args: tuple, kwargs: dict, error: Exception) -> Tuple[TypeError, BaseException]:
    """Find the first part of a call that cannot be pickled; return the
    TypeError that names it, and the pickling error as its cause."""
    name = callable_name(function)
    parts = [(f"the function {short_repr(function)}", function)]
    parts += [(f"argument {index} ({short_repr(arg)})", arg) for index, arg in enumerate(args)]
    parts += [(f"keyword argument {key}={short_repr(arg)}", arg) for key, arg in kwargs.items()]
    for what, obj in parts:
        try:
            dumps(obj)
        except Exception as culprit:
            return TypeError(f"cannot defer {name}: {what} cannot be serialised: {culprit}"), culprit
    # Each part alone pickles, together they do not (say, shared state).
    return TypeError(f"cannot defer {name}: its arguments cannot be serialised: {error}"), error
