"""Name -> builder registries that check config kwargs against the builder's signature.

Every configurable piece (backbone, transform op, dataset, module, lr schedule) is built through
`Registry.build`, so an unknown name, an unknown or missing argument and a wrongly typed value all
produce the same one-line ConfigError naming the config key and the closest valid choice.
"""
import difflib
import inspect

from ppmoco.errors import ConfigError


def closest(name, choices):
    """' (did you mean X?)' for the nearest choice, or '' when nothing is near."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def is_number(value):
    """An int or float, not a bool (YAML's true is an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def type_ok(value, default):
    """Whether a YAML `value` has the type declared by `default`: the one rule for config keys
    (config.SCHEMA) and builder arguments (signature defaults). None on either side accepts
    anything, an int is a valid float, a bool is never a number, and lists and tuples are one type
    (YAML only makes lists)."""
    if value is None or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return is_number(value)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_kwargs(fn, kwargs, key_path):
    """Raise ConfigError unless `fn(**kwargs)` binds and every value has its default's type."""
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items()
             if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in kwargs.items():
        if key not in named:
            if accepts_any:
                continue
            raise ConfigError(f"{key_path}.{key}: unknown key{closest(key, named)}; "
                              f"valid keys: {', '.join(sorted(named))}")
        default = named[key].default
        if default is not inspect.Parameter.empty and not type_ok(value, default):
            raise ConfigError(f"{key_path}.{key}: expected {type(default).__name__} "
                              f"(like {default!r}), got {type(value).__name__} {value!r}")
    missing = [n for n, p in named.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(f"{key_path}: missing required key '{missing[0]}'")


class Registry:
    """A named table of builders (classes or functions)."""

    def __init__(self, kind):
        self.kind = kind
        self._builders = {}

    def register(self, fn=None, *, name=None, aliases=()):
        def add(f):
            for key in (name or f.__name__, *aliases):
                self._builders[key] = f
            return f
        return add(fn) if fn is not None else add

    def names(self):
        return sorted(self._builders)

    def get(self, name, key_path):
        if name not in self._builders:
            raise ConfigError(f"{key_path}: unknown {self.kind} '{name}'{closest(name, self._builders)}; "
                              f"choose one of: {', '.join(self.names())}")
        return self._builders[name]

    def build(self, name, kwargs, key_path, **extra):
        """Build `name` from config `kwargs` (checked) plus trusted `extra` arguments from code."""
        fn = self.get(name, key_path)
        kwargs = dict(kwargs or {})
        check_kwargs(fn, {**kwargs, **extra}, key_path)
        return fn(**kwargs, **extra)
