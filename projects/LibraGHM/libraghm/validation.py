"""The valid range of every LibraGHM setting, written down once.

Every part (sampler, loss, neck, head) declares its arguments as a ``PARAMS`` table of specs::

    PARAMS = {"num_bins": Int(low=1), "floor_fraction": Float(0.0, 1.0), "positives": OneOf(...)}

Its constructor checks its plain arguments against the table (errors name the argument), and its
``from_config`` reads them with :func:`read_params` from one config node, where the config key of
argument ``num_bins`` is ``<NODE>.NUM_BINS`` (errors name the key). The same table is what the tests
draw valid and invalid values from.
"""
import contextlib
import math
import re
from collections import abc
from numbers import Integral, Real
from typing import Any, Dict, Mapping, Optional, Sequence

__all__ = [
    "Bool", "Float", "Int", "OneOf", "IntList", "StrList", "Spec",
    "check_params", "read_params", "cfg_node", "config_keys", "check_head_inputs", "as_list",
]


class Spec:
    """One setting's valid values. ``check(value, name)`` returns the value or raises ValueError."""

    def describe(self) -> str:
        raise NotImplementedError

    def is_valid(self, value) -> bool:
        raise NotImplementedError

    def check(self, value, name: str):
        """
        Args:
            value: the value to check.
            name (str): the argument or config key, for the error message.

        Returns:
            the value (ints given for a Float come back as float).
        """
        if not self.is_valid(value):
            raise ValueError(f"{name} = {value!r} is invalid: expected {self.describe()}.")
        return self.convert(value)

    def convert(self, value):
        return value


class Bool(Spec):
    """True or False (not a string, not a number)."""

    def describe(self):
        return "True or False"

    def is_valid(self, value):
        return isinstance(value, bool)


class Float(Spec):
    """A finite real number (bool excluded) in an optional, optionally open, range."""

    noun = "a finite number"

    def __init__(self, low=None, high=None, low_open=False, high_open=False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def describe(self):
        low, high, low_open, high_open = self.low, self.high, self.low_open, self.high_open
        if high is None:
            return self.noun + ("" if low is None else f" {'>' if low_open else '>='} {low:g}")
        if low is None:
            return f"{self.noun} {'<' if high_open else '<='} {high:g}"
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"{self.noun} in {left}{low:g}, {high:g}{right}"

    def is_valid(self, value):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def convert(self, value):
        return float(value)


class Int(Float):
    """An integer (bool excluded) in an optional range."""

    noun = "an integer"

    def is_valid(self, value):
        return isinstance(value, Integral) and super().is_valid(value)

    def convert(self, value):
        return int(value)


class OneOf(Spec):
    """One of a fixed set of values (compared with ``==`` and the same type)."""

    def __init__(self, *choices):
        self.choices = tuple(choices)

    def describe(self):
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def is_valid(self, value):
        return any(type(value) is type(c) and value == c for c in self.choices)


class IntList(Spec):
    """A list/tuple of integers >= ``low``, of length ``length`` (any non-zero length if None)."""

    def __init__(self, length: Optional[int] = None, low: int = 1):
        self.length, self.low = length, low

    def describe(self):
        n = f"{self.length} " if self.length else "a non-empty list of "
        return f"{n}integers >= {self.low}"

    def is_valid(self, value):
        return (isinstance(value, (list, tuple)) and len(value) > 0
                and (self.length is None or len(value) == self.length)
                and all(Int(low=self.low).is_valid(v) for v in value))

    def convert(self, value):
        return [int(v) for v in value]


class StrList(Spec):
    """A non-empty list/tuple of strings."""

    def describe(self):
        return "a non-empty list of strings"

    def is_valid(self, value):
        return isinstance(value, (list, tuple)) and len(value) > 0 and all(
            isinstance(v, str) for v in value
        )

    def convert(self, value):
        return list(value)


def as_list(value):
    """A list from a non-string sequence (e.g. a LazyConfig ListConfig); else ``value`` itself."""
    if isinstance(value, abc.Sequence) and not isinstance(value, (str, bytes)):
        return list(value)
    return value


def check_params(params: Mapping[str, Spec], names: Optional[Mapping[str, str]] = None,
                 **values) -> Dict[str, Any]:
    """
    Check arguments against their specs.

    Args:
        params (dict[str, Spec]): the part's ``PARAMS`` table.
        names (dict[str, str], optional): the name to report for each argument (config keys);
            default: the argument's own name.
        values: the arguments.

    Returns:
        dict: the checked (and converted) values.
    """
    names = names or {}
    return {arg: params[arg].check(value, names.get(arg, arg)) for arg, value in values.items()}


def cfg_node(cfg, key: str):
    """
    Args:
        cfg (CfgNode): a config.
        key (str): a dotted key, e.g. "MODEL.ROI_HEADS".

    Returns:
        the value at ``key``.
    """
    node = cfg
    for part in key.split("."):
        if part not in node:
            raise KeyError(
                f"The config has no key {key} (call libraghm.add_libraghm_config(cfg) before "
                "merging a LibraGHM config)."
            )
        node = node[part]
    return node


def read_params(cfg, node_key: str, params: Mapping[str, Spec],
                args: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """
    Read and check a part's arguments from one config node, argument ``x`` at ``<node_key>.X``.

    Args:
        cfg (CfgNode): a config.
        node_key (str): e.g. "MODEL.GHM_C".
        params (dict[str, Spec]): the part's ``PARAMS`` table.
        args (list[str], optional): which arguments to read (default: all of ``params``).

    Returns:
        dict: keyword arguments for the part's constructor.
    """
    node = cfg_node(cfg, node_key)
    args = list(params) if args is None else list(args)
    values = {a: node[a.upper()] for a in args}
    return check_params(
        {a: params[a] for a in args}, {a: f"{node_key}.{a.upper()}" for a in args}, **values
    )


@contextlib.contextmanager
def config_keys(node_key: str, args):
    """
    Inside the block, a ValueError whose message names an argument as ``arg = value`` is re-raised
    naming its config key ``<node_key>.ARG`` instead, so that a constructor's own checks (which
    know no config keys) report the key on the yaml path.

    Args:
        node_key (str): e.g. "MODEL.BFP".
        args (iterable[str] or dict[str, str]): argument names, or argument -> full key.
    """
    keys = dict(args) if isinstance(args, Mapping) else {a: f"{node_key}.{a.upper()}" for a in args}
    try:
        yield
    except ValueError as e:
        msg = str(e)
        for arg, key in keys.items():
            msg = re.sub(rf"(?<![\w.]){re.escape(arg)} =", f"{key} =", msg)
        if msg == str(e):
            raise
        raise ValueError(msg) from e


def check_head_inputs(cfg, outputs, producer: str):
    """
    Check that the heads of the configured meta-architecture ask the backbone only for features
    it produces, so that a level-count mismatch fails at build naming both sides, not later with a
    bare ``KeyError: 'p7'``.

    Args:
        cfg (CfgNode): the model config.
        outputs (iterable[str]): the backbone's output feature names.
        producer (str): the keys that decide the backbone's outputs, for the message.
    """
    outputs = sorted(outputs)
    if cfg.MODEL.META_ARCHITECTURE in ("GeneralizedRCNN", "ProposalNetwork"):
        heads = ["MODEL.RPN.IN_FEATURES", "MODEL.ROI_HEADS.IN_FEATURES"]
    else:  # RetinaNet and its subclasses read MODEL.RETINANET
        retina = "RetinaNet" in cfg.MODEL.META_ARCHITECTURE
        heads = ["MODEL.RETINANET.IN_FEATURES"] if retina else []
    for key in heads:
        wanted = list(cfg_node(cfg, key))
        missing = [f for f in wanted if f not in outputs]
        if missing:
            raise ValueError(
                f"{key} = {wanted} is invalid with this backbone: it produces {outputs} "
                f"(decided by {producer}), not {missing}; change one of the two."
            )
