"""Serve a trained model over HTTP: the OpenAI chat-completions API and a chat page.

  bin/serve --checkpoint runs/default                 http://127.0.0.1:8000/ (the page), /v1/chat/completions
  bin/serve --checkpoint runs/default --port 0        any free port (the line "listening on ..." names it)
  JAXSFT_API_KEY=... bin/serve --checkpoint runs/default --host 0.0.0.0
                                                      reachable from other machines, with a key

API keys (--api-key, --api-key-file: one per line, or $JAXSFT_API_KEY): /v1/* and /metrics
then need `Authorization: Bearer <key>` (the openai client's api_key); /health and the page
stay open (the page asks for the key). Without a key the server answers only requests made
to a local name (localhost, 127.0.0.1, [::1]), so that no web page can reach it through DNS
rebinding; --host 0.0.0.0 without a key is refused unless --allow-host names the names
clients will use (--allow-host '*': any, i.e. anyone who can reach the port uses the model).

/health answers 503 while the model loads and compiles, then 200; /metrics is Prometheus's
text format. One log line per request on stderr (request id, status, tokens, milliseconds).
SIGTERM (or Ctrl-C) stops taking requests, lets the answers in flight finish (for at most
--grace seconds, then cancels them) and exits 0 (130 after Ctrl-C). An engine that fails for
good (jaxsft/serve/worker.py: every request in flight gets an error, /health 503) makes it
exit 1, for a supervisor to restart it.
"""
import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys

from ..config import UserError
from . import main_guard


def _log_to_stderr() -> logging.Logger:
    """The server's logger, with its own handler: a library may have configured the root logger."""
    log = logging.getLogger("jaxsft.serve")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


def api_keys(given: list, path, env) -> list:
    """The keys of --api-key, --api-key-file and $JAXSFT_API_KEY together."""
    keys = [k.strip() for k in given]
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read the API key file: {getattr(e, 'strerror', None) or e}")
        keys += [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]
        if not any(x.strip() and not x.lstrip().startswith("#") for x in lines):
            raise UserError(f"{path}: holds no API key (one per line)")
    if env is not None and env.strip():
        keys.append(env.strip())
    for k in keys:
        if not k or any(c.isspace() for c in k):
            raise UserError(f"an API key may not be empty or hold spaces (from {path or '--api-key'})")
    return keys


def is_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@main_guard
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/default", help="run directory (default runs/default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--slots", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond it, 503 with Retry-After (default 64)")
    p.add_argument("--system", help="default system prompt (default: the one the run was trained with)")
    p.add_argument("--name", help="model name in /v1/models and responses (default: the run directory's name)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds a stop waits for answers in flight before cancelling them (default 10)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="a key clients must send (repeatable; visible in ps: prefer --api-key-file or "
                        "$JAXSFT_API_KEY)")
    p.add_argument("--api-key-file", help="a file of keys, one per line (# comments and blank lines ignored)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="without a key: a Host name clients may use besides the local ones (repeatable; "
                        "'*': any)")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections at most; beyond them, 503 (default 512)")
    p.add_argument("--keep-alive", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default 5)")
    args = p.parse_args()
    if args.slots <= 0 or args.queue < 0 or args.max_body <= 0 or not 0 <= args.port < 65536:
        raise UserError("--slots and --max-body must be positive, --queue >= 0, --port in 0..65535")
    if args.max_connections <= 0 or args.keep_alive <= 0:
        raise UserError("--max-connections and --keep-alive must be positive")
    keys = api_keys(args.api_key, args.api_key_file, os.environ.get("JAXSFT_API_KEY"))
    if not keys and not args.allow_host and not is_local(args.host):
        raise UserError(f"--host {args.host} without an API key would serve the model to anyone who can reach "
                        f"the port: give a key (--api-key-file, $JAXSFT_API_KEY), or --allow-host NAME for the "
                        f"names clients will use ('*': any)")
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        raise UserError(f"{args.checkpoint} is not a run directory (no config.json); train one with bin/train")

    log = _log_to_stderr()
    import uvicorn

    from ..serve.app import create_app
    from ..serve.serving import Model

    def load():
        from ..decode import Generator
        from ..engine import Engine
        gen = Generator.from_run(args.checkpoint, args.system)
        engine = Engine(gen.params, gen.cfg, gen.tok.stop_ids, args.slots, gen.tok.pad_id)
        name = args.name or os.path.basename(os.path.normpath(os.path.abspath(args.checkpoint)))
        return Model(engine, gen.tok, gen.system_prompt, name)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    port = sock.getsockname()[1]
    failed = []

    def fatal():
        failed.append(1)
        server.should_exit = True

    app = create_app(load, max_waiting=args.queue, max_body=args.max_body, on_fatal=fatal, api_keys=keys,
                     allow_hosts=args.allow_host, freeze_gc=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=args.grace, lifespan="on",
                                           limit_concurrency=args.max_connections,
                                           timeout_keep_alive=args.keep_alive,
                                           h11_max_incomplete_event_size=64 * 1024))  # request line + headers
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    log.info("listening on http://%s:%d (loading %s)", host, port, args.checkpoint)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it to the handler that was there
    # before: a no-op, so a requested stop exits 0 (Ctrl-C still exits 130, as every command does)
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    if failed:
        sys.exit(1)
