"""Command line: serve | check | record | validate. `main()` returns the exit code.

Exit codes of `check` and `record`: 0 all good; 1 usage, config or golden-file error (nothing was probed);
2 Triton unreachable or not live; 3 a check failed (for `record`: recording refused). `validate`: 0 or 1.
Every non-zero exit prints one human line per problem on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from probe import __version__
from probe.config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_UNREACHABLE = 2
EXIT_FAILED = 3


EXIT_CODES = """exit codes:
  0  every check passed (validate: config and golden files are valid)
  1  usage, config or golden-file error: nothing was probed
  2  Triton unreachable or not live
  3  at least one check failed"""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a bad flag; the contract says usage errors are 1 with one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="probe",
        description="Health probe sidecar for NVIDIA Triton Inference Server.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"probe {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", required=True, help="path to probe.yaml")

    def add(name: str, summary: str, description: str, codes: str = EXIT_CODES) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=description,
            epilog=codes,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    sp = add(
        "serve",
        "run the sidecar until SIGTERM/SIGINT",
        "Answer the kubelet's readiness and liveness probes (/ready, /live, /live/ping), per-check paths and "
        "/metrics on listen.host:listen.port, running every check at most once per probe.min_interval and in the "
        "background every probe.interval. From SIGTERM on, /ready fails (the pod drains) for probe.drain seconds.",
        "exit codes: 0 stopped by a signal; 1 usage or config error, or the port cannot be bound",
    )
    common(sp)
    sp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sp = add(
        "check",
        "run every check once and exit",
        "Run every check once against the live Triton (an exec probe, or CI after a rollout) and print one line "
        "per check: [+]name reason, or [-]name failed: reason.",
    )
    common(sp)
    sp.add_argument("--json", action="store_true", help="print application/health+json")
    sp.add_argument("--only", metavar="NAME", help="a canary name, or a check name like gpu or canary/x")
    sp = add(
        "record",
        "record golden files from the live server",
        "Run each canary --runs times and write its golden file (one record per environment fingerprint; an "
        "existing record for this environment is replaced only with --force). Exact-mode canaries whose outputs "
        "differ between runs are refused.",
        "exit codes: 0 recorded; 1 usage, config or golden-file error (nothing written); 2 Triton unreachable or "
        "not live; 3 recording refused",
    )
    common(sp)
    sp.add_argument("--only", metavar="NAME", help="record only this canary")
    sp.add_argument("--runs", type=int, default=3, help="inferences per canary (default 3)")
    sp.add_argument("--force", action="store_true", help="replace this environment's record / a stale golden")
    sp = add(
        "validate",
        "check config and golden files offline",
        "Check the config file and every canary's golden file without contacting Triton (for CI before a rollout).",
        "exit codes: 0 config and golden files are valid; 1 they are not (one line per problem)",
    )
    common(sp)
    sp.add_argument(
        "--config-only",
        action="store_true",
        help="check the config and the canaries' inputs, not the golden files (CI before anything is recorded)",
    )
    return p


def _err(message: str) -> None:
    print(f"probe: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UsageError as e:
        _err(f"usage error: {e} (see probe --help)")
        return EXIT_USAGE
    if args.command is None:
        _err("usage error: a command is required: serve, check, record or validate (see probe --help)")
        return EXIT_USAGE
    if args.command == "record" and args.runs < 1:
        _err(f"usage error: --runs must be at least 1, got {args.runs}")
        return EXIT_USAGE
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        _err(f"config error: {e}")
        return EXIT_USAGE
    if args.command != "serve":
        # One-shot commands report every problem in their own lines; a sampler's or client's log record would only
        # say the same thing again, unprefixed, through logging's last-resort handler.
        quiet = logging.getLogger("probe")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
    try:
        if args.command == "validate":
            return _validate(cfg, config_only=args.config_only)
        if args.command == "check":
            return asyncio.run(_check(cfg, only=args.only, as_json=args.json))
        if args.command == "record":
            return asyncio.run(_record(cfg, only=args.only, runs=args.runs, force=args.force))
        return _serve(cfg, args.log_level)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as e:  # a bug: still one line for the operator, the details for a bug report
        _err(f"internal error: {type(e).__name__}: {e} (please report this)")
        return EXIT_USAGE


# ---------------------------------------------------------------------------------------------- validate


def _golden_problems(cfg: Config, names: Sequence[str], *, golden: bool = True) -> list[str]:
    """One line per canary whose inputs cannot be built or (with `golden`) whose golden files cannot judge it."""
    from probe.answers import request_digest
    from probe.golden import GoldenError, check_golden_for, load_golden
    from probe.tensors import InputError, build_inputs, input_digest

    problems = []
    for c in cfg.canaries:
        if c.name not in names:
            continue
        try:
            if c.request is not None:
                digest = request_digest(c.request)
            else:
                digest = input_digest(c, build_inputs(c))
        except InputError as e:
            problems.append(f"canary {c.name}: {e}")
            continue
        if not golden:
            continue
        path = cfg.golden_path(c.name)
        try:
            check_golden_for(load_golden(path), c.name, digest, c.compare.mode, path, c.protocol)
        except GoldenError as e:
            problems.append(f"golden error: {e}")
    return problems


def _validate(cfg: Config, *, config_only: bool = False) -> int:
    problems = _golden_problems(cfg, [c.name for c in cfg.canaries], golden=not config_only)
    for p in problems:
        _err(p)
    if problems:
        return EXIT_USAGE
    n = len(cfg.canaries)
    what = "config valid (golden files not checked)" if config_only else "golden files valid"
    print(f"ok: {cfg.path}: {n} canar{'y' if n == 1 else 'ies'}, {what}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- check


def _select(cfg: Config, only: str | None, names: Sequence[str]) -> list[str] | None:
    """The check names `--only` selects, or None for all: a canary brings its model/, canary/ and latency/ checks;
    every selection includes `triton` except `gpu`, which reads the GPUs alone."""
    if only is None:
        return None
    canaries = [c.name for c in cfg.canaries]
    if only in canaries:
        return ["triton", f"model/{only}", f"canary/{only}", f"latency/{only}"]
    if only in names:
        return [only] if only == "gpu" else sorted({"triton", only})
    raise UsageError(f"--only {only}: no canary or check of that name (checks: {', '.join(names)})")


async def _triton_live(sidecar: Any) -> str | None:
    from probe.triton import TritonRequestError, TritonUnreachable

    try:
        if not await asyncio.wait_for(sidecar.client.live(), sidecar.cfg.probe.timeout):
            return f"Triton at {sidecar.client.url} is not live"
    except (TritonUnreachable, TritonRequestError) as e:
        return str(e)
    except TimeoutError:
        return f"Triton at {sidecar.client.url} did not answer within {sidecar.cfg.probe.timeout:g}s"
    return None


async def _check(cfg: Config, *, only: str | None, as_json: bool) -> int:
    from probe.server import check_json
    from probe.sidecar import build_sidecar
    from probe.verdict import readiness

    sidecar = build_sidecar(cfg, with_lifecycle_checks=False)
    try:
        selected = _select(cfg, only, sidecar.runner.names)
    except UsageError as e:
        _err(f"usage error: {e}")
        return EXIT_USAGE
    canaries = [c.name for c in cfg.canaries if selected is None or f"canary/{c.name}" in selected]
    problems = _golden_problems(cfg, canaries)
    if problems:
        for p in problems:
            _err(p)
        return EXIT_USAGE
    await sidecar.start(background=False)
    try:
        # Everything but a lone GPU check needs Triton: say so once, with exit 2, rather than as failed checks.
        if selected != ["gpu"]:
            down = await _triton_live(sidecar)
            if down is not None:
                _err(f"triton unreachable: {down}")
                return EXIT_UNREACHABLE
        await sidecar.wait_first_gpu_sample(min(2.0, cfg.gpu.stale_limit))
        if sidecar.saturation is not None:  # no queue watcher here: the reading a missed canary is compared with
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.probe.timeout):
                    await sidecar.saturation.baseline()
        for c in cfg.canaries:  # who this node is, ready for a mismatch's reason (the run itself never waits on it)
            if selected is None or f"canary/{c.name}" in selected:
                await sidecar.environment.warm(c.model, c.version)
        run = await sidecar.runner.run_once(names=selected)
    finally:
        await sidecar.stop()
    verdict = readiness(run.results)
    if as_json:
        body = {
            "status": "pass" if verdict.ok else "fail",
            "checks": {n: [check_json(r)] for n, r in verdict.checks.items()},
        }
        print(json.dumps(body, indent=2))
    else:
        for n, r in verdict.checks.items():
            print(f"[+]{n} {r.reason}" if r.ok else f"[-]{n} failed: {r.reason}")
    if not verdict.ok:
        _err(f"check failed: {', '.join(verdict.failing())}")
        return EXIT_FAILED
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- record


async def _record(cfg: Config, *, only: str | None, runs: int, force: bool) -> int:
    from probe.golden import GoldenError
    from probe.record import RecordRefused, record_canary
    from probe.sidecar import build_sidecar
    from probe.tensors import InputError
    from probe.triton import TritonRequestError, TritonUnreachable

    canaries = list(cfg.canaries)
    if only is not None:
        canaries = [c for c in canaries if c.name == only]
        if not canaries:
            names = ", ".join(c.name for c in cfg.canaries) or "none configured"
            _err(f"usage error: --only {only}: no canary of that name (canaries: {names})")
            return EXIT_USAGE
    if not canaries:
        _err("usage error: the config has no canaries to record")
        return EXIT_USAGE
    sidecar = build_sidecar(cfg, with_lifecycle_checks=False)
    await sidecar.client.open()
    code = EXIT_OK
    try:
        down = await _triton_live(sidecar)
        if down is not None:
            _err(f"triton unreachable: {down}")
            return EXIT_UNREACHABLE
        for c in canaries:
            path = cfg.golden_path(c.name)
            try:
                done = await record_canary(cfg, c, sidecar.client, sidecar.environment, runs=runs, force=force)
                print(f"[+]{c.name} {done.summary}")
            except RecordRefused as e:
                _err(f"recording refused: {e}")
                code = max(code, EXIT_FAILED)
            except GoldenError as e:
                _err(f"golden error: {e}")
                return EXIT_USAGE
            except InputError as e:
                _err(f"config error: canary {c.name}: {e}")
                return EXIT_USAGE
            except OSError as e:
                # The write is atomic: whatever was there before is still there, byte for byte.
                before = "the previous golden file is unchanged" if path.exists() else "no golden file was written"
                _err(f"cannot write golden file for canary {c.name}: {e}; {before}")
                return EXIT_USAGE
            except TritonUnreachable as e:
                _err(f"triton unreachable: {e}")
                return EXIT_UNREACHABLE
            except TritonRequestError as e:
                _err(f"recording refused: canary {c.name}: {e}")
                code = max(code, EXIT_FAILED)
            except TimeoutError:
                _err(f"recording refused: canary {c.name} did not answer within a recording run's limit")
                code = max(code, EXIT_FAILED)
    finally:
        await sidecar.client.close()
    return code


# ---------------------------------------------------------------------------------------------- serve


def _serve(cfg: Config, log_level: str) -> int:
    from probe.logs import setup_logging

    logger = setup_logging(log_level)
    try:
        return asyncio.run(_serve_async(cfg, logger))
    except OSError as e:
        _err(f"cannot listen on {cfg.listen.host}:{cfg.listen.port}: {e}")
        return EXIT_USAGE


async def _serve_async(cfg: Config, logger: logging.Logger) -> int:
    from probe.logs import log
    from probe.server import quiet_accept_errors, serve
    from probe.sidecar import build_sidecar

    sidecar = build_sidecar(cfg, logger=logger)
    quiet_accept_errors(logger, asyncio.get_running_loop())
    await sidecar.start()
    try:
        serving = await serve(
            sidecar.health,
            cfg.listen.host,
            cfg.listen.port,
            metrics=sidecar.metrics.expose,
            reasons=cfg.listen.reasons,
            logger=logger,
        )
    except BaseException:
        await sidecar.stop()
        raise
    # Everything built so far (modules, config, clients) lives until exit: move it out of the collector's
    # generations, so the periodic full collections a long-running sidecar does stay short.
    gc.collect()
    gc.freeze()
    log(
        logger,
        logging.INFO,
        "probe serving",
        version=__version__,
        listen=f"{cfg.listen.host}:{cfg.listen.port}",
        triton=cfg.triton.url,
        canaries=[c.name for c in cfg.canaries],
        gpu_source=cfg.gpu.source,
        timeout=cfg.probe.timeout,
        min_interval=cfg.probe.min_interval,
        interval=cfg.probe.interval,
        liveness_after=cfg.liveness.after,
        checks=sidecar.runner.names,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if sidecar.lifecycle.shutting_down:
            log(logger, logging.WARNING, "second signal: exiting now", signal=sig.name)
            stop.set()
            return
        sidecar.lifecycle.begin_shutdown(sig.name)
        sidecar.metrics.ready.set(0)
        log(
            logger,
            logging.INFO,
            "shutdown: /ready fails from now on; draining",
            signal=sig.name,
            drain=cfg.probe.drain,
        )
        loop.call_later(cfg.probe.drain, stop.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
    finally:
        await serving.close()
        await sidecar.stop()
        log(logger, logging.INFO, "probe stopped")
    return EXIT_OK
