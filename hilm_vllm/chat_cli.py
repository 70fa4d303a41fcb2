"""`hilm chat`: talk to a running router, the answer streaming in as the policy produces it.

    hilm chat --url http://127.0.0.1:8000 [--policy hilm] [--temperature 1] [--max-tokens 128]

Each turn goes to the router's /v1/chat/completions (streaming, with usage) carrying the whole
conversation so far; after the answer a one-line footer shows the router's usage.hilm counters:
tokens and speed, skips, ILM / LLM verify messages and their acceptance, LLM forwards per
token, uplink bytes, simulated network time, and whatever the router reports as degraded.

In the prompt: /reset forgets the conversation, /quit (or Ctrl-D) leaves. Ctrl-C while an answer
streams stops that answer (it is not kept in the history); Ctrl-C at the prompt leaves.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from urllib.parse import urlsplit

POLICIES = ("llm-only", "hlm", "spec", "uhlm", "hilm", "cascade", "rand")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="interactive chat with a running router (streaming, usage footer)",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the router's HTTP address (default: %(default)s)")
    p.add_argument("--policy", default="hilm", choices=POLICIES, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="per answer (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k (default: 0)")
    p.add_argument("--seed", type=int, help="sampling seed of every answer (default: none)")
    p.add_argument("--system", help="a system message to start the conversation with")
    p.set_defaults(func=run)


def base_url(url: str) -> str:
    """'H:P', 'http://H:P', 'http://H:P/' or 'http://H:P/v1' -> 'http://H:P/v1'."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


def reachable(url: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the router opens, else why not."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return str(e)


def _num(value, fmt: str = "d") -> str:
    return "-" if value is None else format(value, fmt)


def footer(usage: dict | None, elapsed_s: float, ttft_s: float | None) -> str:
    """One line of stats from the final chunk's usage (OpenAI fields + usage.hilm)."""
    usage = usage or {}
    tokens = usage.get("completion_tokens")
    parts = [f"{_num(tokens)} tokens in {elapsed_s:.2f} s"]
    if tokens and elapsed_s > 0:
        parts[0] += f" ({tokens / elapsed_s:.1f} tok/s)"
    if ttft_s is not None:
        parts.append(f"TTFT {ttft_s * 1e3:.0f} ms")
    h = usage.get("hilm")
    if not h:
        return "[" + " | ".join(parts + ["no usage.hilm from the router"]) + "]"
    parts.append(f"policy {h.get('policy', '?')}")
    parts.append(f"skips {_num(h.get('skips'))}")
    for tier in ("ilm", "llm"):
        drafted, accepted = h.get(f"{tier}_drafted"), h.get(f"{tier}_accepted")
        acc = f", acc {accepted / drafted:.2f}" if drafted and accepted is not None else ""
        parts.append(f"{tier.upper()} {_num(h.get(f'{tier}_messages'))} msgs{acc}")
    if tokens and h.get("llm_forwards") is not None:
        parts.append(f"LLM fwd/tok {h['llm_forwards'] / tokens:.2f}")
    uplink = sum((h.get("uplink_bytes") or {}).values())
    parts.append(f"uplink {uplink:,} B")
    if h.get("network_ms") is not None:
        parts.append(f"net {h['network_ms']:.0f} ms")
    if h.get("degraded"):
        parts.append("DEGRADED: " + ", ".join(map(str, h["degraded"])))
    return "[" + " | ".join(parts) + "]"


def stream_answer(client, messages: list[dict], args, out=sys.stdout) -> tuple[str, dict | None,
                                                                             float | None]:
    """Send the conversation, print the answer as it streams; (answer, usage, ttft_s)."""
    extra = {"policy": args.policy}
    if args.top_k > 0:
        extra["top_k"] = args.top_k
    start, ttft, parts, usage = time.perf_counter(), None, [], None
    stream = client.chat.completions.create(
        model=args.policy, messages=messages, max_tokens=args.max_tokens,
        temperature=args.temperature, seed=args.seed, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)
    try:
        for chunk in stream:
            if chunk.choices and (text := chunk.choices[0].delta.content):
                ttft = ttft if ttft is not None else time.perf_counter() - start
                parts.append(text)
                out.write(text)
                out.flush()
            if chunk.usage is not None:
                usage = chunk.usage.model_dump()
    finally:
        stream.close()  # on Ctrl-C too: the router sees the disconnect and stops the request
    return "".join(parts), usage, ttft


def run(args: argparse.Namespace) -> int:
    url = base_url(args.url)
    if why := reachable(url):
        print(f"error: cannot reach the router at {url} ({why}); start one with "
              f"`hilm-serve --tier router ...` or pass its address with --url", file=sys.stderr)
        return 1
    import openai

    client = openai.OpenAI(base_url=url, api_key="hilm", max_retries=0)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print(f"hilm chat: {url}, policy {args.policy}, T={args.temperature:g}, "
          f"max {args.max_tokens} tokens. /reset, /quit or Ctrl-D.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history = list(system)
            print("(conversation cleared)")
            continue
        if not line:
            continue
        code = chat_turn(client, history, line, args)
        if code is not None:
            return code


def chat_turn(client, history: list[dict], line: str, args) -> int | None:
    """One question and its streamed answer; an exit code when the session must end."""
    import openai

    messages = history + [{"role": "user", "content": line}]
    print("hilm> ", end="", flush=True)
    start = time.perf_counter()
    try:
        answer, usage, ttft = stream_answer(client, messages, args)
    except KeyboardInterrupt:
        print("\n(answer interrupted; not kept)")
        return None
    except openai.APIConnectionError as e:
        print(f"\nerror: lost the router at {client.base_url}: {e}", file=sys.stderr)
        return 1
    except openai.APIStatusError as e:
        print(f"\nerror: the router answered {e.status_code}: {e.message}", file=sys.stderr)
        return None
    history[:] = messages + [{"role": "assistant", "content": answer}]
    print("\n" + footer(usage, time.perf_counter() - start, ttft))
    return None
