"""`specdec serve`: load the model once, then answer OpenAI-style HTTP requests until interrupted."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from specdec.cliargs import add_model_arguments, non_negative_int, port_number, positive_int
from specdec.errors import InputError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {text})")
    return value


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of megabytes, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or a positive number of megabytes (got {text})")
    return value


def register(subparsers) -> None:
    from specdec.drafters import methods

    p = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, streaming)"
    )
    add_model_arguments(p)
    p.add_argument(
        "--method",
        default=None,
        help=f"default method, one of: {', '.join(methods())} (default: auto, which picks among them every step)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help='comma-separated methods to load; a request picks one with "specdec_method" (default: --method)',
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument(
        "--port", type=port_number, default=8000, help="0-65535; 0 = any free port (printed at start)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("SPECDEC_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $SPECDEC_API_KEY, else no key)",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients see (default: from --model)"
    )
    p.add_argument(
        "--max-prompt-tokens", type=positive_int, default=None, help="longest prompt (default: model context)"
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=1024,
        help="largest max_tokens a request may ask for; also chat's default (default: 1024)",
    )
    p.add_argument(
        "--max-body-bytes", type=positive_int, default=1 << 20, help="request body limit (default: 1 MiB)"
    )
    p.add_argument(
        "--max-queued",
        type=non_negative_int,
        default=64,
        help="requests that may wait behind the running ones; more get 503 (default: 64)",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=8,
        help="generations that advance together: each step scores all of a method's live generations in one "
        "forward where it can (the native runtime; others step one by one); "
        "1 = one at a time (default: 8)",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=_megabytes,
        default=512.0,
        metavar="MB",
        help="keep requests' committed prefixes (keys and values, in blocks of 16 tokens) across requests, "
        "least recently used dropped first beyond this budget: a prompt that starts as an earlier one did is "
        "prefilled only past it (native runtime; 0 = off; default: 512)",
    )
    p.add_argument(
        "--timeout-request-start",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="close a connection whose request headers are not complete this long after their first byte "
        "(or after connecting) (default: 10)",
    )
    p.add_argument(
        "--timeout-request-complete",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="close a connection whose request body is not complete this long after its headers (default: 60)",
    )
    p.add_argument(
        "--timeout-keep-alive",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="close a connection that sends nothing for this long after a response (default: 5)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    from specdec.dllm.cli import add_policy_arguments

    add_policy_arguments(p)
    p.set_defaults(func=cmd_serve)


def resolve_methods(method: str | None, methods_csv: str | None, draft: str | None) -> list[str]:
    """Loaded methods, the default first."""
    from specdec.api import default_method

    listed = [m.strip() for m in (methods_csv or "").split(",") if m.strip()]
    default = method or (listed[0] if listed else default_method(draft is not None))
    return list(dict.fromkeys([default, *listed]))


def load_decoders(
    model: str,
    draft: str | None,
    methods: list[str],
    dtype: str,
    runtime: str = "auto",
    quantize: str | None = None,
) -> dict:
    """One SpecDecoder per method, all over one loaded target (and one draft model, if any method needs it)."""
    from specdec.api import SpecDecoder
    from specdec.drafters import REGISTRY
    from specdec.drafters import methods as known
    from specdec.models.loading import draft_roles, load_models, require_draft

    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise InputError(f"unknown method {unknown[0]!r} (choose from {', '.join(known())})")
    wants_model, wants_head = draft_roles(methods)
    loaded = load_models(model, draft, wants_model, dtype, draft_is_head=wants_head, quantize=quantize)
    require_draft(methods, loaded.draft)
    head = {"head": loaded.head} if loaded.head else {}
    return {
        m: SpecDecoder(
            loaded.target,
            loaded.tokenizer,
            m,
            loaded.draft,
            runtime,
            **(head if REGISTRY[m].uses_head else {}),
        )
        for m in methods
    }


def _diffusion_decoders(args: argparse.Namespace) -> dict | None:
    """{policy: DllmDecoder} for a block-diffusion model (or a --policy); None for an autoregressive one."""
    from specdec.dllm.cli import engine_options, policy_options, wants_dllm

    if not wants_dllm(args.model, args.policy):
        given = sorted(policy_options(args))
        if given:
            raise InputError(
                f"--{given[0].replace('_', '-')} is a diffusion-LM policy setting (use it with --policy)"
            )
        return None
    if args.method is not None or args.methods is not None or args.draft is not None or args.quantize:
        raise InputError(
            "--method, --methods, --draft and --quantize are for autoregressive models; a diffusion LM serves "
            "--policy"
        )
    from specdec.dllm.api import DEFAULT_POLICY, DllmDecoder

    policy = args.policy or DEFAULT_POLICY
    decoder = DllmDecoder.from_pretrained(
        args.model, policy=policy, dtype=args.dtype, **engine_options(args), **policy_options(args)
    )
    return {policy: decoder}


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, not yet listening: `serve` binds before loading the models, so that a
    wrong host or a taken port costs nothing, while a client connecting during the load is refused rather
    than left waiting (as `socket.create_server` sets it up, less its listen)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def listen(host: str, port: int) -> socket.socket:
    sock = bind(host, port)
    sock.listen()
    return sock


def check_arguments(args: argparse.Namespace) -> None:
    """What `serve` checks before loading anything (argparse checked the numbers): the server extra, the
    API key, the method names."""
    try:
        import uvicorn  # noqa: F401

        from specdec.server.app import check_api_key
    except ModuleNotFoundError as e:
        raise InputError(
            f"specdec serve needs the server extra ({e.name} is not installed): pip install 'specdec[server]'"
        ) from None
    check_api_key(args.api_key)
    if args.method is not None or args.methods is not None:
        from specdec.drafters import REGISTRY, methods

        unknown = [m for m in resolve_methods(args.method, args.methods, args.draft) if m not in REGISTRY]
        if unknown:
            raise InputError(f"unknown method {unknown[0]!r} (choose from {', '.join(methods())})")


def build_server(args: argparse.Namespace, engine_thread: bool = True):
    """The uvicorn server for parsed `serve` arguments (models loaded, not yet listening); `engine_thread`
    as in `create_app`."""
    check_arguments(args)  # before the models load: a mistake here should cost nothing
    import uvicorn

    from specdec.server.app import Limits, create_app

    decoders = _diffusion_decoders(args)
    if decoders is None:
        methods = resolve_methods(args.method, args.methods, args.draft)
        decoders = load_decoders(args.model, args.draft, methods, args.dtype, args.runtime, args.quantize)
    else:  # a request's "specdec_method" names the policy; the one loaded
        methods = list(decoders)
    from specdec.models.loading import freeze_heap

    freeze_heap()
    name = args.served_model_name or (args.model if args.model == "default" else Path(args.model).name)
    limits = Limits(
        args.max_prompt_tokens, args.max_tokens, args.max_body_bytes, args.max_queued, args.max_batch
    )
    app = create_app(
        decoders,
        model_name=name,
        default_method=methods[0],
        api_key=args.api_key,
        limits=limits,
        engine_thread=engine_thread,
        prefix_cache_mb=args.prefix_cache_mb,
    )
    config = uvicorn_config(
        app,
        log_level=args.log_level,
        request_start=args.timeout_request_start,
        request_complete=args.timeout_request_complete,
        keep_alive=args.timeout_keep_alive,
    )
    return uvicorn.Server(config)


def uvicorn_config(
    app, *, log_level: str = "info", request_start: float, request_complete: float, keep_alive: float
):
    """uvicorn settings for serving `app`: deadlines on receiving requests (see server/protocol.py)."""
    import uvicorn

    from specdec.server.protocol import deadline_protocol

    return uvicorn.Config(
        app,
        http=deadline_protocol(request_start, request_complete),
        ws="none",  # no WebSocket routes; an upgraded connection would also escape the deadlines
        timeout_keep_alive=keep_alive,  # type: ignore[arg-type]  # annotated int; any seconds work
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    # the engine loop runs here, on the thread that loaded the models, and HTTP on another (EngineWorker.run
    # says why); uvicorn off the main thread installs no signal handlers, so Ctrl-C reaches this thread
    check_arguments(args)
    sock = bind(args.host, args.port)  # before the models load, too
    try:
        server = build_server(args, engine_thread=False)
    except BaseException:
        sock.close()
        raise
    sock.listen()
    host, port = sock.getsockname()[:2]
    state = server.config.app.state
    where = f"[{host}]" if ":" in host else host
    print(
        f"specdec: serving model {state.model_name!r} (methods: {', '.join(state.methods)}; default "
        f"{state.default_method}) at http://{where}:{port}/v1",
        file=sys.stderr,
        flush=True,
    )
    if args.host not in LOOPBACK and not args.api_key:
        print(
            f"specdec: warning: listening on {args.host} without --api-key: anyone who can reach it may use it",
            file=sys.stderr,
            flush=True,
        )
    worker = server.config.app.state.worker

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:  # stopped or failed: the engine loop ends with it
            worker.shutdown()

    signals = []

    def stop(signum, frame) -> None:
        """Ctrl-C or SIGTERM: stop serving (in-flight generations are cancelled); a second one: at once."""
        signals.append(signum)
        if len(signals) > 1:
            raise KeyboardInterrupt
        server.should_exit = True
        worker.shutdown()

    # set even where SIGINT was inherited ignored (a background job), as uvicorn does on the main thread
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    http = threading.Thread(target=serve_http, name="specdec-http", daemon=True)
    http.start()
    try:
        worker.run()  # returns when the server shuts down (its lifespan or a signal stops the worker)
    finally:
        server.should_exit = True
        worker.shutdown()
        http.join(timeout=30)
    return 0
