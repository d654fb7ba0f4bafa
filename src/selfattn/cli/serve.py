"""`selfattn serve`: the OpenAI-compatible local server (selfattn.serve)."""

import socket
import sys
from pathlib import Path

from .common import CLIError, check_kv_dtype, load_model, open_model_file

DEFAULT_CTX = 4096  # positions per slot when the model's own context is longer


def cmd_serve(args):
    import uvicorn

    from ..cache import available_memory
    from ..plan import ModelShape
    from ..plan.predict import memory_guard
    from ..serve import Engine, make_app

    opened = open_model_file(args.model)
    path, reader, _ = opened
    shape = ModelShape.from_gguf(reader, path)
    ctx = args.ctx or min(shape.context, DEFAULT_CTX)
    check_kv_dtype(args.kv_dtype, shape.head_dim)
    available = available_memory()
    if available is not None:  # every slot's cache, and the kept prefixes as positions
        kept = args.prefix_cache_mib * 2**20 // max(shape.kv_bytes(1, args.kv_dtype), 1)
        memory_guard(shape, ctx * args.slots + kept, args.kv_dtype, available)
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without it a
    # response's body waited ~40 ms behind its headers (Nagle against the client's delayed ACK)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET,
                         socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(128)  # connections wait in the backlog from now on, until uvicorn takes them
    except OSError as e:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    model, tok, path, load_s = load_model(args.model, args.kv_dtype, opened)
    model_id = args.alias or Path(path).stem
    engine = Engine(model, tok, ctx, slots=args.slots, kv_dtype=args.kv_dtype,
                    prefix_cache_bytes=args.prefix_cache_mib << 20, queue_max=args.queue)
    app = make_app(engine, model_id, str(path))
    host, port = sock.getsockname()[:2]
    print(f"selfattn serve: {model_id} on http://{host}:{port}/v1 ({args.slots} slot"
          f"{'s' if args.slots > 1 else ''} of {ctx:,} positions, {args.kv_dtype} KV, "
          f"load {load_s:.2f} s)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    try:  # uvicorn stops on SIGINT / SIGTERM, answering what is in flight, then raises it again
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()
    print("selfattn serve: stopped", file=sys.stderr)
