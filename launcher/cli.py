"""`hydra_command`: the one front end of every ShardForge command (train, convert, generate,
preprocess, submit, ...), in place of a bare `@hydra.main`.

    @hydra_command("config")
    def main(cfg: DictConfig) -> None: ...

`main(argv=None)` (what `python -m launcher.<command>` and the `shardforge-<command>` console
scripts call) runs the command under Hydra as `hydra.main` would, and adds:

- `--help` / `-h`: the command's module docstring, its config groups with their options, and its
  keys with their defaults (`--hydra-help` is still Hydra's own);
- a bad command line is one stderr line `config error: <key>: <reason>` and exit status 2, found
  by composing the config before Hydra starts, so nothing is created: override syntax
  (`data.prefixes=[a`), a value of the wrong type (`optim.lr=3e-4x`, `data.prefixes=path` for a
  list), a key the schema does not have (`train.stepz=5`, also as Hydra's `+train.stepz=5`), a
  mandatory key left unset, a group option that does not exist (`model=nope`), and whatever the
  command's `preflight` rejects (launcher.train validates the whole config there);
- a ConfigError the command raises later prints the same one line and exits 2;
- where `model=` picks a conf/model option (train, submit, ...), a model yaml or a checkpoint
  anywhere works too (launcher/model_path.py).
"""
from __future__ import annotations

import functools
import re
import sys
import textwrap
from typing import Any, Callable

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, flag_override, open_dict, read_write

from launcher.config.validate import ConfigError, check_known_keys, unknown_key_reason
from launcher.model_path import resolve_model_argv
from launcher.package_data import CONF_DIR
from parallel.compat.deferred_compile import defer_megatron_compile

Task = Callable[[DictConfig], Any]
_TYPE_NAMES = {"Float": "a float", "Integer": "an int", "Boolean": "a boolean (true/false)", "String": "a string"}


def hydra_command(config_name: str, *, config_dir: str = "", argv: Callable[[list[str]], list[str]] | None = None,
                  preflight: Callable[[DictConfig], None] | None = None) -> Callable[[Task], Callable[..., None]]:
    """Wrap a Hydra task function as a command's `main(argv=None)`.

    config_name/config_dir: the primary config and its folder under conf/ ("" = conf/ itself).
    argv: rewrites the command line first (a command's own syntax, e.g. `convert import_hf ...`).
    preflight: checks the composed config before Hydra starts (raise ConfigError)."""
    directory = str(CONF_DIR / config_dir)
    model_group = (CONF_DIR / config_dir / "model").is_dir()  # commands whose `model=` picks conf/model/*

    def decorate(task: Task) -> Callable[..., None]:
        @functools.wraps(task)
        def run_task(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except ConfigError as err:
                _fail(err)

        hydra_main = hydra.main(config_path=directory, config_name=config_name, version_base=None)(run_task)

        def main(args: list[str] | None = None) -> None:
            defer_megatron_compile()  # before anything below imports megatron-core
            args = list(sys.argv[1:] if args is None else args)
            if argv is not None:
                args = argv(args)
            if model_group:  # `model=<yaml or checkpoint>`: an option of the group, on a search path
                try:
                    args = resolve_model_argv(args)
                except ConfigError as err:
                    _fail(err)
            parsed = get_args_parser().parse_args(args)
            name = parsed.config_name or config_name
            if parsed.help:
                print(help_text(sys.modules[task.__module__].__doc__ or "", directory, name, parsed.overrides))
                return
            # --cfg/--info/--shell-completion show a config as it is; -cp/-cd point Hydra elsewhere.
            shown = (parsed.cfg or parsed.info or parsed.shell_completion or parsed.hydra_help
                     or parsed.config_path or parsed.config_dir)
            if not (shown or parsed.multirun or parsed.experimental_rerun):
                _run_once(run_task, directory, name, parsed.overrides, preflight)
                return
            if not shown:
                try:
                    cfg = compose_checked(directory, name, parsed.overrides, multirun=parsed.multirun)
                    if preflight is not None:
                        preflight(cfg)
                except ConfigError as err:
                    _fail(err)
            sys.argv = [sys.argv[0], *args]
            hydra_main()

        main.hydra_command = True  # type: ignore[attr-defined]
        main.__doc__ = task.__doc__
        return main

    return decorate


def _fail(err: ConfigError) -> None:
    print(err, file=sys.stderr)
    sys.exit(2)


def _run_once(task: Task, config_dir: str, config_name: str, overrides: list[str],
              preflight: Callable[[DictConfig], None] | None) -> None:
    """A plain run, as hydra.main runs it (run dir, .hydra/, logging, HydraConfig, error report), on
    one composition that is checked first: hydra.main would compose the config twice more."""
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import (create_automatic_config_search_path,
                                       detect_calling_file_or_module_from_task_function, detect_task_name,
                                       run_and_report)
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode

    calling_file, calling_module = detect_calling_file_or_module_from_task_function(task)
    search_path = create_automatic_config_search_path(calling_file, calling_module, config_dir)
    app = run_and_report(lambda: Hydra.create_main_hydra2(task_name=detect_task_name(calling_file, calling_module),
                                                          config_search_path=search_path))
    try:
        try:
            parsed = [*(_parsed(o, False) for o in overrides), "hydra.mode=RUN"]
            try:
                cfg = app.compose_config(config_name, parsed, run_mode=RunMode.RUN, with_log_configuration=True,
                                         from_shell=False)
            except (ConfigCompositionException, MissingConfigException) as err:
                raise _composition_error(err) from None
            hydra_node = cfg._get_node("hydra")
            with read_write(cfg), open_dict(cfg):
                del cfg["hydra"]  # checked as the task will see it
            try:
                _check_composed(cfg)
                if preflight is not None:
                    preflight(cfg)
            finally:
                with read_write(cfg), open_dict(cfg), flag_override(cfg, "no_deepcopy_set_nodes", True):
                    cfg["hydra"] = hydra_node
        except ConfigError as err:
            _fail(err)
        callbacks = Callbacks(cfg)

        def run() -> None:
            callbacks.on_run_start(config=cfg, config_name=config_name)
            ret = run_job(hydra_context=HydraContext(config_loader=app.config_loader, callbacks=callbacks),
                          task_function=task, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None)
            callbacks.on_run_end(config=cfg, config_name=config_name, job_return=ret)
            _ = ret.return_value  # re-raises the task's exception

        run_and_report(run)
    finally:
        GlobalHydra.instance().clear()


def compose_checked(config_dir: str, config_name: str, overrides: list[str], *, multirun: bool = False) -> DictConfig:
    """The config Hydra will run, composed here first; every problem with the command line is a
    ConfigError naming the key. Under multirun, each swept key takes its first value."""
    overrides = [_parsed(o, multirun) for o in overrides]
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            cfg = compose(config_name, overrides=overrides)
    except (ConfigCompositionException, MissingConfigException) as err:
        raise _composition_error(err) from None
    _check_composed(cfg)
    return cfg


def _check_composed(cfg: DictConfig) -> None:
    check_known_keys(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(missing[0], "must be set (it has no default)")


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _parsed(override: str, multirun: bool) -> str:
    """`override` after a syntax check; a sweep (`a=1,2`) under multirun becomes its first point."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        [parsed] = OverridesParser.create().parse_overrides([override])
    except OverrideParseException as err:
        why = str(err).splitlines()[0]
        raise ConfigError(_key_of(override), f"cannot parse {override!r} ({why}; lists are written [a,b], "
                                             f"text with special characters in quotes)") from None
    if multirun and parsed.is_sweep_override():
        return f"{parsed.get_key_element()}={next(iter(parsed.sweep_string_iterator()))}"
    return override


def _composition_error(err: Exception) -> ConfigError:
    """Hydra's composition failure as (key, reason)."""
    text = str(err)
    cause = err.__cause__
    override = re.search(r"Error merging override (\S+)", text)
    key = getattr(cause, "full_key", None) or (_key_of(override.group(1)) if override else None)
    if isinstance(err, MissingConfigException):
        missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
        if missing:
            options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
            listed = f" (options: {', '.join(options)})" if options else ""
            return ConfigError(missing.group(1).replace("/", "."), f"no option {missing.group(2)!r}{listed}")
    if cause is None:
        named = re.search(r"'([\w.]+)'", text)
        return ConfigError(key or (named.group(1) if named else "overrides"), text.splitlines()[0])
    message = str(cause).split("\n    full_key:")[0].strip()
    owner = getattr(cause, "object_type", None)
    not_in = re.match(r"Key '([^']+)' not in '", message)
    if not_in and key:
        prefix = key[: -len(not_in.group(1))]
        return ConfigError(key, unknown_key_reason(prefix, not_in.group(1), owner))
    value = override.group(1).split("=", 1)[1] if override and "=" in override.group(1) else None
    convert = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", message, flags=re.S)
    if convert:
        return ConfigError(key, f"{convert.group(1)!r} is not {_TYPE_NAMES.get(convert.group(2), convert.group(2))}")
    if "is not a ListConfig, list or tuple" in message and value is not None:
        return ConfigError(key, f"expects a list: write {key}=[{value}] (several: [a,b])")
    return ConfigError(key or "overrides", message.splitlines()[0])


def help_text(doc: str, config_dir: str, config_name: str, overrides: list[str]) -> str:
    """The command's docstring, then its config groups and keys with their defaults."""
    width = 100
    lines = [textwrap.dedent(doc).strip(), ""]
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
            loader = GlobalHydra.instance().config_loader()
            order = list(cfg.keys())  # groups in the order of their sections
            choices = {g: c for g, c in sorted(cfg.hydra.runtime.choices.items(),
                                               key=lambda gc: order.index(gc[0]) if gc[0] in order else len(order))
                       if not g.startswith(("hydra/", "schema")) and "/" not in g}
            options = {g: loader.get_group_options(g) for g in choices}
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as err:
        lines.append(f"(the keys of this command line could not be shown: {str(err).splitlines()[0]})")
        return "\n".join(lines)
    if choices:
        lines.append("Config groups (group=option; the current choice first):")
        for group, choice in choices.items():
            rest = [o for o in options[group] if o != choice]
            lines.append(textwrap.fill(f"{group}={choice}" + (f"   also: {', '.join(rest)}" if rest else ""),
                                       width, initial_indent="  ", subsequent_indent="      "))
        lines.append("")
    lines.append("Keys and their defaults (override any with key=value; ??? = must be set):")
    body = OmegaConf.to_container(cfg, resolve=False)
    body.pop("hydra", None)
    for key, value in body.items():
        if isinstance(value, dict):
            items = " ".join(f"{k}={_flat(v)}" for k, v in value.items())
            lines.append(textwrap.fill(f"{key}: {items}", width, initial_indent="  ", subsequent_indent="      ",
                                       break_on_hyphens=False))
        else:
            lines.append(f"  {key}: {_flat(value)}")
    lines.append("")
    lines.append("Each key is described in launcher/config/schema.py (or the command's own config class) "
                 "and README.md.")
    return "\n".join(lines)


def _flat(value: Any) -> str:
    """A value as one override would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_flat(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_flat(v) for v in value) + "]"
    return str(value)

