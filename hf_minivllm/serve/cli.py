"""``hf-minivllm serve [MODEL]`` (also ``python -m hf_minivllm serve``): the OpenAI-compatible server on a model.

MODEL is a local folder of a transformers model; without one, the embedded SmolLM2-135M-Instruct is served, so the
command works on a fresh machine without network. Every ``Config`` field is an option of the same name in kebab
case (``--max-model-len``, ``--tensor-parallel-size``, ``--mixed-steps/--no-mixed-steps``), checked by ``Config``
itself before the model is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import types
import typing
from typing import TYPE_CHECKING, Any

from hf_minivllm.config import ATTENTION_BACKENDS, Config

if TYPE_CHECKING:
    from hf_minivllm.serve.protocol import SamplingDefaults

logger = logging.getLogger("hf_minivllm.serve")

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_SERVER_OPTIONS = {"model"}  # Config fields that are not engine options
_GIL_SWITCH_INTERVAL_S = 0.0005  # see serve(): the engine thread and the event loop hand the GIL over this often


def _option_type(field: dataclasses.Field) -> tuple[type, bool]:
    """The option's value type, and whether it is a boolean switch (``--x`` / ``--no-x``)."""
    hint = typing.get_type_hints(Config)[field.name]
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)] if isinstance(
        hint, types.UnionType) or typing.get_origin(hint) is typing.Union else [hint]
    kind = args[0]
    return kind, kind is bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-minivllm", description="hf-minivllm: fast generation for transformers "
                                                                     "models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the OpenAI-compatible server",
                                description="Serve a model over an OpenAI-compatible HTTP API.")
    serve.add_argument("model", nargs="?", default=None,
                       help="a local transformers model folder (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    serve.add_argument("--api-key", default=os.environ.get("HF_MINIVLLM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/ (default: $HF_MINIVLLM_API_KEY, else none)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the folder's name)")
    serve.add_argument("--dtype", default="auto", help="weights' dtype when loading a folder (default: auto)")
    serve.add_argument("--generation-config", default="auto", choices=["auto", "none"],
                       help="auto: a request's left-out temperature, top_p, top_k and min_p come from the model's "
                            "generation_config.json where it sets them; none: OpenAI's defaults (default: auto)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    engine = serve.add_argument_group("engine (the fields of hf_minivllm.Config)")
    defaults = Config()
    for field in dataclasses.fields(Config):
        if field.name in _SERVER_OPTIONS:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind, is_switch = _option_type(field)
        default = getattr(defaults, field.name)
        if is_switch:
            engine.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"(default: {default})")
        elif field.name == "attention_backend":
            engine.add_argument(flag, choices=ATTENTION_BACKENDS, default=default, help="(default: %(default)s)")
        else:
            engine.add_argument(flag, type=kind, default=default, help="(default: %(default)s)")
    return parser


def engine_config(args: argparse.Namespace) -> dict[str, Any]:
    """The Config fields given on the command line, validated by Config (ValueError names the option)."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(Config)
              if field.name not in _SERVER_OPTIONS}
    try:
        Config(**values)
    except ValueError as error:
        raise ValueError(re.sub(r"Config\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(error))) from None
    return values


def load_model(model: str | None, dtype: str) -> tuple[Any, Any, str]:
    """(HF model, tokenizer, default served name) of a folder, or of the embedded model."""
    from hf_minivllm.models.adapter import load_hf_model
    from hf_minivllm.models.loading import load_embedded_model, load_tokenizer

    if model is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        hf_model, tokenizer = load_embedded_model(device=device)
        return hf_model, tokenizer, EMBEDDED_MODEL_NAME
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model folder {model!r} does not exist (MODEL must be a local folder)")
    tokenizer = load_tokenizer(model)
    if tokenizer is None:
        raise FileNotFoundError(f"model folder {model!r} holds no tokenizer files: the server needs one for its text")
    return load_hf_model(model, dtype=dtype), tokenizer, os.path.basename(os.path.normpath(model))


def sampling_defaults(hf_model: Any, source: str) -> SamplingDefaults:
    """The defaults of a request's left-out sampling fields (``--generation-config``), logged when the model's own
    differ from OpenAI's; a repetition penalty the model asks for is named, since the engine has none."""
    from hf_minivllm.serve.protocol import SamplingDefaults  # the serve extra (pydantic)

    if source == "none":
        return SamplingDefaults()
    generation_config = getattr(hf_model, "generation_config", None)
    defaults = SamplingDefaults.from_generation_config(generation_config)
    if defaults.changed():
        logger.info("requests that leave them out get the model's generation_config.json sampling defaults: %s "
                    "(--generation-config none for OpenAI's)", defaults.changed())
    penalty = getattr(generation_config, "repetition_penalty", None)
    if penalty not in (None, 1.0):
        logger.warning("the model's generation_config.json asks for repetition_penalty=%s, which the engine does "
                       "not apply", penalty)
    return defaults


def _fail(message: str) -> int:
    """The command's error message on stderr (as argparse reports bad options) and its exit status."""
    sys.stderr.write(message + "\n")
    return 1


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    try:
        config = engine_config(args)
    except ValueError as error:
        parser.error(str(error))
    try:
        import uvicorn

        from hf_minivllm.serve.app import build_app
    except ImportError as error:
        return _fail(f"hf-minivllm serve needs the serve extra (pip install 'hf-minivllm[serve]'): {error}")
    from hf_minivllm.llm import LLM
    from hf_minivllm.serve.async_llm import AsyncLLM

    try:
        hf_model, tokenizer, default_name = load_model(args.model, args.dtype)
        defaults = sampling_defaults(hf_model, args.generation_config)
        engine = AsyncLLM(LLM(hf_model, tokenizer=tokenizer, **config))
    except Exception as error:  # noqa: BLE001 - any load failure ends the command with its reason
        return _fail(f"hf-minivllm serve: could not load model {args.model or EMBEDDED_MODEL_NAME!r}: {error}")
    # The engine steps on a thread of this process while the event loop serves HTTP: a thread that wants the GIL
    # waits up to the switch interval (5 ms by default) for the other to yield it, which would add whole decode
    # steps to every hand-over. 0.5 ms keeps both responsive. This process is the server's alone.
    sys.setswitchinterval(_GIL_SWITCH_INTERVAL_S)
    name = args.served_model_name or default_name
    logger.info("serving %s on http://%s:%d/v1", name, args.host, args.port)
    try:
        uvicorn.run(build_app(engine, name, args.api_key, defaults), host=args.host, port=args.port,
                    log_level=args.log_level)
    finally:
        engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve(args, parser)
    parser.error(f"unknown command {args.command!r}")
    return 2
