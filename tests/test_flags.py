"""The command line is derived from the config dataclasses: every field is a flag with the field's default,
type and allowed values, and a value of the wrong type is refused in one line naming the flag and the type."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from igpt.cli import build_parser
from igpt.data.preparation import PrepareConfig
from igpt.errors import IgptError
from igpt.finetuning.config import FinetuneConfig
from igpt.generation.sample import SampleConfig
from igpt.pipeline.plans import QuickstartOptions
from igpt.probes.setup import ProbeConfig
from igpt.serving.app import ServeConfig
from igpt.settings import field_docs, flag_name
from igpt.training.config import ModelChoice, TrainConfig

# (command, config, fields the command supplies itself, whether unset flags stay unset)
COMMANDS = [
    ("prepare", PrepareConfig, set(), False),
    ("pretrain", ModelChoice, set(), True),
    ("pretrain", TrainConfig, {"precision_reason"}, True),
    ("probe", ProbeConfig, set(), False),
    ("finetune", FinetuneConfig, set(), False),
    ("sample", SampleConfig, set(), False),
    ("serve", ServeConfig, set(), False),
    ("quickstart", QuickstartOptions, set(), False),
]


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def default_of(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


@pytest.mark.parametrize("command,cls,skip,given_only", COMMANDS, ids=lambda c: getattr(c, "__name__", None))
def test_every_config_field_is_a_flag_with_its_default(command, cls, skip, given_only):
    p = subparser(command)
    by_dest = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        assert f.name in by_dest, f"{cls.__name__}.{f.name} has no flag in igpt {command}"
        action = by_dest[f.name]
        assert f.name in field_docs(cls), f"{cls.__name__}.{f.name} has no docstring (the flag's help)"
        if not action.option_strings:  # positional: a required field
            assert f.default is dataclasses.MISSING
            continue
        assert flag_name(f.name) in action.option_strings
        if action.required:
            assert f.default is dataclasses.MISSING
        elif given_only:
            assert action.default is argparse.SUPPRESS
        else:
            assert action.default == default_of(f), f"--{f.name}: {action.default!r} != {default_of(f)!r}"
        if "choices" in f.metadata:  # offered in the help; the config refuses the others in its own words
            assert action.metavar == "{" + ",".join(f.metadata["choices"]) + "}"


def test_parsed_defaults_build_the_config_defaults():
    """Parsing nothing but the required arguments gives each config exactly its own defaults."""
    args = build_parser().parse_args(["probe", "runs/r"])
    cfg = ProbeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ProbeConfig)})
    assert cfg == ProbeConfig(run="runs/r")
    args = build_parser().parse_args(
        ["pretrain", "--out", "o", "--steps", "7", "--keep-steps", "2,4", "--flip"]
    )
    given = {k for k in vars(args) if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    assert given == {"steps", "keep_steps", "flip"}  # the rest stays unset: a resume keeps its own
    assert (args.steps, args.keep_steps, args.flip) == (7, [2, 4], True)


@pytest.mark.parametrize(
    "argv,flag,kind",
    [
        (["pretrain", "--out", "o", "--steps", "ten"], "--steps", "integer"),
        (["pretrain", "--out", "o", "--lr", "fast"], "--lr", "number"),
        (["probe", "r", "--batch-size", "1.5"], "--batch-size", "integer"),
        (["finetune", "r", "--out", "o", "--minutes", "x"], "--minutes", "number"),
        (["pretrain", "--out", "o", "--keep-steps", "1,b"], "--keep-steps", "comma-separated integers"),
    ],
)
def test_wrong_type_names_flag_and_type_in_one_line(argv, flag, kind, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("igpt: error: ")
    assert flag in err and kind in err


@pytest.mark.parametrize("command", sorted({c for c, *_ in COMMANDS} | {"convert"}))
def test_every_command_prints_its_help(command, capsys):
    """The help is the first thing a user asks for: a docstring with a bare "%" (argparse formats help text
    with %) once made `igpt probe --help` a traceback."""
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: igpt {command}")
    if command == "probe":
        assert "15% masks" in out


def _with_required(cls: type, **given):
    """`cls` built from its defaults, each required field given a plain placeholder."""
    placeholders = {"run": "r", "out": "o", "dataset": "digits", "data": "d"}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            given.setdefault(f.name, placeholders[f.name])
    return cls(**given)


CHOICE_FIELDS = [
    (cls, f.name, f.metadata["choices"])
    for cls in dict.fromkeys(c for _, c, *_ in COMMANDS)
    for f in dataclasses.fields(cls)
    if "choices" in f.metadata
]
# values that are valid choices but need more than the defaults around them to build on this machine
UNBUILDABLE = {(TrainConfig, "device", "cuda"), (ProbeConfig, "device", "cuda")}


@pytest.mark.parametrize("cls,name,choices", CHOICE_FIELDS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_choice_is_refused_in_the_same_words_and_its_values_accepted(cls, name, choices):
    """Every config checks its `choice` fields through one helper, so a value outside them reads the same
    in every command, and every value it offers builds."""
    with pytest.raises(IgptError) as e:
        _with_required(cls, **{name: "nope"})
    assert str(e.value) == f"unknown {flag_name(name)} 'nope'; choose one of {', '.join(choices)}"
    for value in choices:
        if (cls, name, value) not in UNBUILDABLE:
            assert getattr(_with_required(cls, **{name: value}), name) in (value, "fp32", "bf16")
