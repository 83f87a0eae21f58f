"""W6, online serving (DESIGN.md section 3): W1's requests streamed through our OpenAI-compatible server with
Poisson arrivals at several rates, beside `transformers serve` (continuous batching) on the same model, prompts and
arrival times in the same run; then the stall test, short streams while an 8,000-token prompt arrives every few
seconds, against our server with mixed steps on and off (and the peer with --hf-stall).

Both servers load one folder (w6_model.py): W1's random Qwen3-0.6B in bf16 and a tokenizer under which the text
"t5 t17 t9" is ids [5, 17, 9], so the chat endpoint receives W1's exact prompts in both. Requests are W1's first
--num-requests (seed 0: prompt and output lengths, temperature 0.6, eos ignored); each rate's arrival times come
from one seeded generator, the same for both servers. Each phase's prompts start with a token of their own (id
10001 + phase; W1's ids stop at 10000), so no phase finds its prompts cached by an earlier one.

The client is --clients processes, each streaming its share of the arrivals on its own event loop: one Python
process parsing every server-sent event of a fast server would measure itself. Per request it records the send
time, the arrival and token count (the chunk's words) of every content chunk, and the end. A phase stops sending
after --send-seconds and cuts what still runs --drain-seconds after that, counting the tokens that arrived.
Per phase: output tokens/s over the phase, TTFT and inter-token latency (a chunk's gap split over its tokens)
p50/p99, end-to-end latency, requests done, failed and cut, how far the clients fell behind the arrival schedule
and the busiest client's CPU share (near 1: the client, not the server, set the pace). A rate is sustained when
every request it sent was done before the cut; a server's finite rates above one it did not sustain are skipped
(it would not sustain them either), the saturated phase (inf) is always run. The whole run ends by
--budget-seconds: a phase that would not fit is shortened or skipped and says so; results are written after every
phase, with the acceptance figures (TTFT p99 ratio at the peer's highest sustained rate, saturated throughput
ratio, stall ITL p99 over median). The stall test also reports, per long prompt, the longest gap in any short
stream while that prompt waited for its first token: the stall itself, which the ITL p99 cannot show when long
prompts delay well under 1% of the short streams' tokens.

The peer is `transformers serve` with continuous batching, CUDA graphs and async batching (the setting of W1's HF
peer in bench_gpu.py; serve has no flag for async batching, so it is started through a launcher that makes it the
default of serve's ContinuousBatchingConfig). serve answers 422 to any field outside OpenAI's, `ignore_eos`
included, so its requests carry eos id -1 in serve's `generation_config` field instead; its continuous batching
takes the sampling settings of the first request for all (every request here, warm-up included, has the same). It
reports usage in its last chunk without being asked and does not take `stream_options`, which it is not sent. It
captures CUDA graphs on first use (bench_gpu's peer pre-captures them), so the warm-up gives it a burst of
requests first.

On the GPU machine (about 8 minutes), from the repository root, with .whl carried (the servers' packages missing
there: fastapi, starlette, uvicorn, pydantic, pydantic-core, annotated-types, typing-inspection, opentelemetry-api,
openai, httpx2, httpcore2, truststore, jiter, sniffio):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    source benchmarks/device_env.sh && python3 benchmarks/serving.py --out $OUT/w6.json --log-dir $OUT
Phases are selectable (--servers, --rates, --no-stall, --stall-only, --hf-stall) to split the run into two commands.
A CPU check: --model-size tiny --num-requests 8 --rates 2,inf --max-output-len 16 --stall-long-len 512
--stall-short-rate 2 --stall-short-output 16 --stall-seconds 10.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

# Client processes import this module: what only the parent needs (torch, through workloads) is imported there.

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPERATURE = 0.6
PHASE_MARK = 10001  # phase i's prompts start with id 10001 + i
STOP_RESERVE_S = 25.0  # kept back from every phase for stopping its server
Job = tuple[float, bytes, str]  # (offset from the phase's start, JSON request body, kind)


@dataclass
class Stream:
    """One streamed request as a client saw it (perf_counter seconds, the same clock in every process)."""

    kind: str
    scheduled: float
    sent: float = 0.0
    first: float | None = None
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in the chunk)
    end: float | None = None  # None: cut at the phase's end, or failed
    usage_tokens: int | None = None
    error: str | None = None

    @property
    def tokens(self) -> int:
        """Tokens generated: the server's count when it sent one, else the words that arrived."""
        return self.usage_tokens if self.usage_tokens is not None else sum(n for _, n in self.chunks)


async def stream(session: aiohttp.ClientSession, url: str, body: bytes, record: Stream) -> None:
    """POST one streamed chat completion and record what arrives when; a cancel (the phase's cut) leaves ``end``
    unset."""
    import aiohttp  # the client's only (the summary's figures() must import without it)

    record.sent = time.perf_counter()
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                return
            async for line in response.content:
                arrived = time.perf_counter()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = str(event["error"])[:300]
                    return
                if event.get("usage"):
                    record.usage_tokens = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        record.first = record.first or arrived
                        record.chunks.append((arrived, len(text.split())))
        record.end = time.perf_counter()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
        record.error = f"{type(error).__name__}: {error}"[:300]


async def send_and_stream(url: str, jobs: list[Job], start: float, send_s: float,
                          cut_s: float) -> tuple[list[Stream], float]:
    """Send each job at ``start`` + its offset while offsets stay within ``send_s``; cut what still runs at
    ``start + cut_s``. Returns the records and when the last request ended (or the cut)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        records, tasks = [], []
        for offset, body, kind in jobs:
            if offset > send_s:
                break
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            record = Stream(kind=kind, scheduled=start + offset)
            records.append(record)
            tasks.append(asyncio.create_task(stream(session, url, body, record)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, start + cut_s - time.perf_counter()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return records, time.perf_counter()


def client_shard(url: str, jobs: list[Job], start: float, send_s: float,
                 cut_s: float) -> tuple[list[Stream], float, float]:
    """A client process's share of a phase, on its own event loop: records, end time, CPU seconds it used."""
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    cpu = time.process_time()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        records, end = runner.run(send_and_stream(url, jobs, start, send_s, cut_s))
    return records, end, time.process_time() - cpu


def run_phase(pool, url: str, schedule: list[Job], send_s: float, cut_s: float,
              clients: int) -> tuple[list[Stream], float, float]:
    """The schedule dealt round-robin over the client processes, which start together a second from now.
    Returns the records, the phase's seconds and the busiest client's CPU share."""
    start = time.perf_counter() + 1.0
    shards = pool.starmap(client_shard, [(url, schedule[i::clients], start, send_s, cut_s) for i in range(clients)])
    records = sorted((r for shard, _, _ in shards for r in shard), key=lambda r: r.scheduled)
    seconds = max(end for _, end, _ in shards) - start
    return records, seconds, max(cpu for _, _, cpu in shards) / max(seconds, 1e-9)


class Server:
    """A server process on a free local port with its output in a log file: started, polled until healthy, asked
    to stop (SIGTERM to its process group), killed if it has not stopped 20 s later."""

    def __init__(self, name: str, argv: list[str], log_dir: str, model: str, extra_body: dict):
        self.name, self.model, self.extra_body = name, model, extra_body
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.log_path = os.path.join(log_dir, f"server_{name}.log")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=os.path.dirname(HERE), start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
        deadline = time.perf_counter() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}: {self.log_tail()}")
            try:
                with opener.open(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.name} not healthy after {timeout:.0f} s: {self.log_tail()}")
            time.sleep(1.0)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()
        self._signal(signal.SIGKILL)  # whatever the server started and left behind in its group

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def log_tail(self, chars: int = 1500) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def job(self, offset: float, ids: list[int], max_tokens: int, kind: str) -> Job:
        from w6_model import prompt_text

        body = {"model": self.model, "messages": [{"role": "user", "content": prompt_text(ids)}],
                "max_tokens": max_tokens, "temperature": TEMPERATURE, "stream": True, **self.extra_body}
        return offset, json.dumps(body).encode(), kind


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours_server(args: argparse.Namespace, mixed_steps: bool, stall_server: bool = False) -> Server:
    """Our server; a ``stall_server`` (its own start, only with --stall-ours-args) adds those options."""
    argv = [sys.executable, "-m", "hf_minivllm", "serve", args.model_dir, "--host", "127.0.0.1", "--port", "{port}",
            "--served-model-name", "w6", "--max-model-len", str(args.max_model_len), "--log-level", "warning"]
    argv += [] if mixed_steps else ["--no-mixed-steps"]
    argv += shlex.split(args.ours_args) + (shlex.split(args.stall_ours_args) if stall_server else [])
    name = ("ours" if mixed_steps else "ours_no_mixed") + ("_stall" if stall_server else "")
    return Server(name, argv, args.log_dir, "w6", {"ignore_eos": True, "stream_options": {"include_usage": True}})


def hf_server(args: argparse.Namespace) -> Server:
    """`transformers serve FOLDER` pinned to the folder; with --hf-async-batching through a launcher that makes
    async batching the default of the ContinuousBatchingConfig serve builds (it builds one when given any --cb-*
    flag, as --cb-use-cuda-graph here)."""
    serve = ["serve", args.model_dir, "--continuous-batching", "--host", "127.0.0.1", "--port", "{port}",
             "--device", args.hf_device, "--dtype", "auto", "--log-level", "info"]
    serve += ["--cb-use-cuda-graph"] if args.hf_cuda_graph else []
    serve += ["--attn-implementation", args.hf_attn_implementation] if args.hf_attn_implementation else []
    launcher = "import functools, sys, transformers\n"
    if args.hf_async_batching:
        launcher += ("transformers.ContinuousBatchingConfig = functools.partial("
                     "transformers.ContinuousBatchingConfig, use_async_batching=True)\n")
    launcher += "from transformers.cli.transformers import app\napp(args=sys.argv[1:])\n"
    generation_config = {"do_sample": True, "temperature": TEMPERATURE, "top_k": None, "top_p": None,
                         "eos_token_id": -1, "pad_token_id": 151643}
    return Server("hf", [sys.executable, "-c", launcher, *serve, *shlex.split(args.hf_args)], args.log_dir,
                  args.model_dir, {"generation_config": json.dumps(generation_config)})


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` (0..100); None for no values."""
    if not values:
        return None
    values = sorted(values)
    position = (len(values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def inter_token_ms(records: list[Stream]) -> list[float]:
    """Per generated token after the first chunk: the gap before its chunk, split evenly over the chunk's tokens."""
    gaps = []
    for r in records:
        for (before, _), (at, n) in zip(r.chunks, r.chunks[1:]):
            gaps += [(at - before) * 1e3 / max(n, 1)] * max(n, 1)
    return gaps


def long_prompt_stalls_ms(records: list[Stream]) -> list[float]:
    """Per long prompt that got its first token: the longest gap between two chunks of a short stream that overlaps
    the prompt's wait for it (from its send to its first token), i.e. what running streams waited while it was
    prefilled. A long prompt every few seconds delays well under 1% of the short streams' tokens, so the ITL p99
    cannot show this; its maximum and this figure do."""
    gaps = [(a, b) for r in records if r.kind == "short" for (a, _), (b, _) in zip(r.chunks, r.chunks[1:])]
    stalls = []
    for long in (r for r in records if r.kind == "long" and r.first is not None):
        overlapping = [b - a for a, b in gaps if a < long.first and b > long.sent]
        if overlapping:
            stalls.append(max(overlapping) * 1e3)
    return stalls


def summarize(records: list[Stream], seconds: float, client_cpu: float) -> dict:
    done = [r for r in records if r.end is not None and r.error is None]
    failed = [r for r in records if r.error is not None]
    ttft = [(r.first - r.sent) * 1e3 for r in records if r.first is not None]
    itl = inter_token_ms(records)
    e2e = [r.end - r.sent for r in done]
    tokens = sum(r.tokens for r in records)
    return {
        "sent": len(records), "done": len(done), "failed": len(failed), "cut": len(records) - len(done) - len(failed),
        "sustained": bool(records) and len(done) == len(records), "seconds": seconds, "output_tokens": tokens,
        "output_tok_s": tokens / seconds if seconds > 0 else None,
        "requests_per_s": len(done) / seconds if seconds > 0 else None,
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "without_first_token": len(records) - len(ttft),
        "itl_ms_p50": percentile(itl, 50), "itl_ms_p90": percentile(itl, 90), "itl_ms_p99": percentile(itl, 99),
        "itl_ms_max": max(itl, default=None),
        "e2e_s_p50": percentile(e2e, 50), "e2e_s_p99": percentile(e2e, 99),
        "max_send_lag_ms": max(((r.sent - r.scheduled) * 1e3 for r in records), default=None),
        "client_cpu_busiest": client_cpu,
        "errors": sorted({r.error for r in failed})[:3],
    }


def poisson_offsets(rate: float, count: int, seed: int) -> list[float]:
    """Arrival offsets of a Poisson process of ``rate`` requests/s (all at 0 for an infinite rate), drawn from a
    generator seeded by the seed and the rate alone, so every server gets the same schedule."""
    if math.isinf(rate):
        return [0.0] * count
    rng, offsets, now = random.Random(f"{seed}:{rate}"), [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate)
        offsets.append(now)
    return offsets


def random_ids(rng: random.Random, length: int) -> list[int]:
    return [rng.randint(0, 10000) for _ in range(length)]


def stall_schedule(server: Server, args: argparse.Namespace, seconds: float, salt: str) -> list[Job]:
    """Short prompts at a steady rate and a long prompt every --stall-long-every seconds (the first half an interval
    in), all different, so no prefix cache shortens any."""
    rng = random.Random(f"{args.seed}:{salt}")
    shorts = [server.job(k / args.stall_short_rate, random_ids(rng, args.stall_short_len), args.stall_short_output,
                         "short") for k in range(int(seconds * args.stall_short_rate))]
    longs = [server.job((j + 0.5) * args.stall_long_every, random_ids(rng, args.stall_long_len),
                        args.stall_long_output, "long") for j in range(int(seconds / args.stall_long_every))]
    return sorted(shorts + longs, key=lambda job: job[0])


class Budget:
    """The run's deadline, less what stopping a server takes."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter() - STOP_RESERVE_S


def warm_up(pool, server: Server, args: argparse.Namespace, stall: bool, budget: Budget) -> None:
    """W1-sized prompts at once, and before a stall test two intervals of its schedule: first-use costs (graph
    captures, kernel specialisations, the peer's batching set-up) land here rather than in the first phase."""
    rng = random.Random(f"{args.seed}:warm-up")
    burst = [server.job(0.0, random_ids(rng, rng.randint(100, 1024)), 32, "warm-up")
             for _ in range(args.warmup_requests)]
    rehearsal = stall_schedule(server, args, 2 * args.stall_long_every, "stall warm-up")
    schedules = [burst, rehearsal] if stall else [burst]
    for schedule in schedules:
        records, _, _ = run_phase(pool, server.url + "/v1/chat/completions", schedule, math.inf,
                                  max(1.0, min(args.start_timeout, budget.left())), args.clients)
        failures = [r.error or "cut at the run budget" for r in records if r.end is None or r.error]
        if failures:
            raise RuntimeError(f"warm-up failed: {failures[0]}; {server.log_tail()}")


def bench_server(pool, server: Server, args: argparse.Namespace, w1_jobs: list[tuple[list[int], int]],
                 rates: list[float], stall: bool, budget: Budget, row: dict, save) -> None:
    """Start ``server``, warm it up, run the rate phases and the stall test into ``row``, and stop it."""
    url = server.url + "/v1/chat/completions"
    row.update(argv=server.argv, log=server.log_path)
    started = time.perf_counter()
    server.start()
    try:
        server.wait_ready(min(args.start_timeout, budget.left()))
        row["startup_s"] = time.perf_counter() - started
        warm_up(pool, server, args, stall, budget)
        row["warmup_s"] = time.perf_counter() - started - row["startup_s"]
        save()
        unsustained = None
        for index, rate in enumerate(rates):
            key = str(rate)
            if budget.left() < args.min_phase_seconds:
                row.setdefault("rates", {})[key] = {"skipped": "run budget spent"}
                continue
            if unsustained is not None and not math.isinf(rate) and args.skip_above_unsustained:
                row.setdefault("rates", {})[key] = {"skipped": f"rate {unsustained} was not sustained"}
                continue
            schedule = [server.job(offset, [PHASE_MARK + index, *ids[1:]], max_tokens, "w1")
                        for offset, (ids, max_tokens) in zip(poisson_offsets(rate, len(w1_jobs), args.seed), w1_jobs)]
            send_s = min(args.send_seconds, budget.left())
            cut_s = min(args.send_seconds + args.drain_seconds, budget.left())
            row.setdefault("rates", {})[key] = summarize(*run_phase(pool, url, schedule, send_s, cut_s, args.clients))
            print(f"{server.name} rate {key}: {table_cells(row['rates'][key])}", flush=True)
            if not row["rates"][key]["sustained"] and unsustained is None:
                unsustained = rate
            save()
        if stall and budget.left() < args.min_phase_seconds:
            row["stall"] = {"skipped": "run budget spent"}
        elif stall:
            send_s = min(args.stall_seconds, budget.left())
            cut_s = min(args.stall_seconds + args.drain_seconds, budget.left())
            schedule = stall_schedule(server, args, args.stall_seconds, "stall")
            records, seconds, cpu = run_phase(pool, url, schedule, send_s, cut_s, args.clients)
            row["stall"] = {kind: summarize([r for r in records if r.kind == kind], seconds, cpu)
                            for kind in ("short", "long")}
            short, stalls = row["stall"]["short"], long_prompt_stalls_ms(records)
            short.update(itl_p99_over_p50=short["itl_ms_p99"] / short["itl_ms_p50"] if short["itl_ms_p50"] else None,
                         long_prompt_stall_ms_p50=percentile(stalls, 50),
                         long_prompt_stall_ms_max=max(stalls, default=None))
            print(f"{server.name} stall, short streams: {table_cells(short)}; while a long prompt waits for its first "
                  f"token, longest gap p50 {fmt(short['long_prompt_stall_ms_p50'])} ms, max "
                  f"{fmt(short['long_prompt_stall_ms_max'])} ms", flush=True)
    except Exception as error:  # one server's failure must not lose the other's results
        row["error"] = f"{type(error).__name__}: {error}"
        print(f"{server.name}: {row['error']}", flush=True)
    finally:
        server.stop()
        save()


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_cells(r: dict) -> str:
    if "skipped" in r:
        return r["skipped"]
    return (f"{r['done']}/{r['sent']} done ({r['cut']} cut, {r['failed']} failed), {fmt(r['output_tok_s'], 0)} tok/s, "
            f"TTFT p50/p99 {fmt(r['ttft_ms_p50'], 0)}/{fmt(r['ttft_ms_p99'], 0)} ms, "
            f"ITL p50/p99 {fmt(r['itl_ms_p50'])}/{fmt(r['itl_ms_p99'])} ms, e2e p50 {fmt(r['e2e_s_p50'])} s, "
            f"send lag {fmt(r['max_send_lag_ms'], 0)} ms, client CPU {fmt(r['client_cpu_busiest'], 2)}")


def acceptance(servers: dict) -> dict:
    """DESIGN.md's W6 figures: our TTFT p99 over the peer's at the highest rate the peer sustains (every request
    done within the phase; the lowest rate run when it sustains none, marked so), saturated throughput ratio, and
    each stall test's ITL p99 over its median."""
    ours, hf = servers.get("ours", {}).get("rates", {}), servers.get("hf", {}).get("rates", {})
    out: dict = {}
    finite = [float(k) for k, r in hf.items() if "sent" in r and not math.isinf(float(k))]
    sustained = [rate for rate in finite if hf[str(rate)]["sustained"]]
    if finite:
        key = str(max(sustained) if sustained else min(finite))
        out.update(ttft_compared_at_rate=float(key), hf_sustains_that_rate=bool(sustained))
        if ours.get(key, {}).get("ttft_ms_p99") and hf[key].get("ttft_ms_p99"):
            out["ttft_p99_ours_over_hf"] = ours[key]["ttft_ms_p99"] / hf[key]["ttft_ms_p99"]
    if ours.get("inf", {}).get("output_tok_s") and hf.get("inf", {}).get("output_tok_s"):
        out["saturated_tok_s_ours_over_hf"] = ours["inf"]["output_tok_s"] / hf["inf"]["output_tok_s"]
    for name, row in servers.items():
        if "short" in row.get("stall", {}):
            short = row["stall"]["short"]
            out[f"stall_itl_p99_over_p50_{name}"] = short["itl_p99_over_p50"]
            out[f"stall_long_prompt_gap_p50_over_itl_p50_{name}"] = (
                short["long_prompt_stall_ms_p50"] / short["itl_ms_p50"]
                if short["long_prompt_stall_ms_p50"] and short["itl_ms_p50"] else None)
    return out


def figures(results: dict) -> list:
    """W6's figures for benchmarks/results: per rate both servers ran, our throughput and TTFT p99 beside HF's; the
    stall test's ITL p99 over its median, mixed steps beside separate steps."""
    from results import Figure

    servers, out = results.get("servers", {}), []
    ours, hf = servers.get("ours", {}).get("rates", {}), servers.get("hf", {}).get("rates", {})
    peer = "transformers serve, continuous batching"
    for key, row in ours.items():
        if "output_tok_s" not in row:
            continue
        peer_row = hf.get(key, {}) if "output_tok_s" in hf.get(key, {}) else {}
        rate = "all at once" if math.isinf(float(key)) else f"{float(key):g} req/s"
        ours_name = "hf-minivllm serve" + ("" if row.get("sustained", True) else " (not sustained)")
        peer_name = (peer + ("" if peer_row.get("sustained", True) else " (not sustained)")) if peer_row else None
        out.append(Figure(f"W6 (0.6b, Poisson, {rate})", "output throughput", "tok/s", row["output_tok_s"], ours_name,
                          peer=peer_name, peer_value=peer_row.get("output_tok_s")))
        if row.get("ttft_ms_p99"):
            out.append(Figure(f"W6 (0.6b, Poisson, {rate})", "TTFT p99", "ms", row["ttft_ms_p99"], ours_name,
                              higher_is_better=False, peer=peer_name, peer_value=peer_row.get("ttft_ms_p99")))
    mixed = servers.get("ours", {}).get("stall", {}).get("short", {}) or servers.get("ours_stall", {}).get(
        "stall", {}).get("short", {})
    separate = next((row["stall"]["short"] for name, row in servers.items()
                     if name.startswith("ours_no_mixed") and "short" in row.get("stall", {})), {})
    if mixed.get("itl_p99_over_p50"):
        out.append(Figure("W6 stall test (short streams beside 8,000-token prompts)", "ITL p99 / ITL p50", "ratio",
                          mixed["itl_p99_over_p50"], "hf-minivllm serve, mixed steps", higher_is_better=False,
                          peer="hf-minivllm serve, separate prefill and decode steps",
                          peer_value=separate.get("itl_p99_over_p50")))
    return out


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def run(args: argparse.Namespace) -> dict:
    from workloads import w1_requests, write_results

    budget = Budget(args.budget_seconds)
    started = time.perf_counter()
    # Built in a child process: a CUDA context here would hold GPU memory that the servers size themselves to.
    subprocess.run([sys.executable, "-c", "import sys; from w6_model import build_model_folder; "
                    "build_model_folder(sys.argv[1], sys.argv[2], int(sys.argv[3]))",
                    args.model_dir, args.model_size, str(args.seed)], check=True, cwd=HERE)
    settings = {**vars(args), "rates": [str(rate) for rate in args.rates]}  # JSON has no infinity
    results = {"device": device_name(), "settings": settings, "model_build_s": time.perf_counter() - started,
               "servers": {}}

    def save() -> None:
        results["acceptance"] = acceptance(results["servers"])
        write_results(args.out, **results)

    prompts, params = w1_requests(args.num_requests)
    w1_jobs = [(ids, min(p.max_tokens, args.max_output_len or p.max_tokens)) for ids, p in zip(prompts, params)]
    rates = [] if args.stall_only else args.rates
    plan: list[tuple[Server, list[float], bool]] = []
    for name in args.servers:
        if name == "ours":
            separate = bool(args.stall_ours_args)
            plan.append((ours_server(args, mixed_steps=True), rates, args.stall and not separate))
            if args.stall:
                plan += [(ours_server(args, mixed_steps=True, stall_server=True), [], True)] if separate else []
                plan += [(ours_server(args, mixed_steps=False, stall_server=separate), [], True)]
        else:
            plan.append((hf_server(args), rates, args.hf_stall))
    with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
        for server, server_rates, stall in plan:
            if not server_rates and not stall:
                continue
            row = results["servers"].setdefault(server.name, {})
            if budget.left() < args.min_phase_seconds:
                row["skipped"] = "run budget spent"
                continue
            bench_server(pool, server, args, w1_jobs, server_rates, stall, budget, row, save)
    results["total_s"] = time.perf_counter() - started
    save()
    return results


def print_table(results: dict) -> None:
    from workloads import commit

    print(f"\nW6 on {results['device']}, commit {commit()}, model {results['settings']['model_size']}, "
          f"{results['total_s']:.0f} s")
    for name, row in results["servers"].items():
        if "error" in row or "skipped" in row:
            print(f"{name}: {row.get('error') or row.get('skipped')}")
        for key, r in row.get("rates", {}).items():
            print(f"{name:>13} rate {key:>5}: {table_cells(r)}")
        for kind, r in row.get("stall", {}).items():
            print(f"{name:>13} stall {kind}: {table_cells(r) if isinstance(r, dict) else r}")
    print("acceptance:", json.dumps(results["acceptance"]))


def parse_args() -> argparse.Namespace:
    cuda = device_name() != "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results JSON (written after every phase)")
    p.add_argument("--log-dir", help="servers' logs (default: the --out folder, else /tmp/w6_logs)")
    p.add_argument("--model-size", choices=("0.6b", "tiny"), default="0.6b")
    p.add_argument("--model-dir", help="model folder (default /tmp/w6_model_SIZE; reused when already built)")
    p.add_argument("--servers", default="ours,hf", help="comma-separated: ours, hf (run in this order)")
    p.add_argument("--rates", default="1,2,4,8,16,inf", help="requests/s, ascending; inf sends all at once")
    p.add_argument("--skip-above-unsustained", action=argparse.BooleanOptionalAction, default=True,
                   help="after a finite rate a server does not sustain, skip its higher finite rates")
    p.add_argument("--num-requests", type=int, default=256, help="W1's first N requests")
    p.add_argument("--max-output-len", type=int, default=0, help="cap on W1's max_tokens (0: none)")
    p.add_argument("--send-seconds", type=float, default=20.0, help="a rate phase sends for at most this long")
    p.add_argument("--drain-seconds", type=float, default=40.0, help="and cuts what still runs this much later")
    p.add_argument("--budget-seconds", type=float, default=540.0, help="the whole run's wall-clock limit")
    p.add_argument("--start-timeout", type=float, default=240.0, help="seconds a server may take to be healthy")
    p.add_argument("--min-phase-seconds", type=float, default=15.0, help="skip a phase with less time left")
    p.add_argument("--warmup-requests", type=int, default=16)
    p.add_argument("--clients", type=int, default=4, help="client processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stall", action=argparse.BooleanOptionalAction, default=True,
                   help="stall test on our server, mixed steps on and off")
    p.add_argument("--stall-only", action="store_true", help="no rate phases")
    p.add_argument("--hf-stall", action="store_true", help="the stall test on the peer too")
    p.add_argument("--stall-seconds", type=float, default=30.0)
    p.add_argument("--stall-short-rate", type=float, default=8.0, help="short requests/s, evenly spaced")
    p.add_argument("--stall-short-len", type=int, default=64)
    p.add_argument("--stall-short-output", type=int, default=128)
    p.add_argument("--stall-long-len", type=int, default=8000)
    p.add_argument("--stall-long-every", type=float, default=3.0, help="seconds between long prompts")
    p.add_argument("--stall-long-output", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=10240, help="our server's (the stall test's long prompts)")
    p.add_argument("--ours-args", default="", help="extra options for our server")
    p.add_argument("--stall-ours-args", default="",
                   help="extra options for our server in the stall test only (then started on its own)")
    p.add_argument("--hf-args", default="", help="extra options for transformers serve")
    p.add_argument("--hf-device", default="cuda" if cuda else "cpu")
    p.add_argument("--hf-cuda-graph", action=argparse.BooleanOptionalAction, default=cuda)
    p.add_argument("--hf-async-batching", action=argparse.BooleanOptionalAction, default=cuda)
    p.add_argument("--hf-attn-implementation", default=None, help="default: serve's own choice")
    args = p.parse_args()
    args.servers = [s for s in args.servers.split(",") if s]
    if set(args.servers) - {"ours", "hf"}:
        p.error("--servers takes ours and/or hf")
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.model_dir = os.path.abspath(args.model_dir or f"/tmp/w6_model_{args.model_size}")
    args.log_dir = args.log_dir or (os.path.dirname(os.path.abspath(args.out)) if args.out else "/tmp/w6_logs")
    os.makedirs(args.log_dir, exist_ok=True)
    return args


if __name__ == "__main__":
    arguments = parse_args()
    outcome = run(arguments)
    print_table(outcome)
    if outcome["device"] != "cpu":
        from results import record
        from workloads import commit

        record(outcome["device"], figures(outcome), "serving", commit())
