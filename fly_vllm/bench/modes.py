"""The modes of a benchmark run: each a name and the speculative config its
engine gets (None: the target alone), from the command line's --modes and
--points, every config checked before any engine starts."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_WINDOWS = (3, 4, 5, 6, 7, 8)


@dataclass
class Mode:
    name: str
    spec: dict | None
    threshold: float | None = None
    window: int | None = None
    sweep: bool = False


def _drafter(args, drafter: str | None = None) -> dict:
    drafter = drafter or args.drafter
    if drafter == "ngram":
        return {"prompt_lookup_min": args.ngram_min, "prompt_lookup_max": args.ngram_max}
    return {"model": drafter}


def build_modes(args) -> list[Mode]:
    """The modes to run, each config checked before any engine starts."""
    from fly_vllm.config import FlyConfigError, parse_fly_config

    modes = _modes(args)
    for m in modes:
        if m.spec is not None and m.spec.get("method") == "fly":
            try:
                parse_fly_config(m.spec)
            except FlyConfigError as e:
                raise SystemExit(f"mode {m.name!r}: {e}") from None
    return modes


def _modes(args) -> list[Mode]:
    k = args.k
    if args.window is None:
        args.window = min(6, k - 1)

    def fly(thr, w, drafter=None, **extra):
        return {"method": "fly", **_drafter(args, drafter), "num_speculative_tokens": k,
                "fly": {"entropy_threshold": thr, "window": w, **extra}}

    names = [m.strip() for m in args.modes.split(",") if m.strip()]
    modes: list[Mode] = []
    for n in names:
        if n == "nospec":
            modes.append(Mode("no-spec", None))
        elif n == "strict":
            modes.append(Mode("strict", fly(args.threshold, args.window, strict=True)))
        elif n == "vllm-spec":
            # vLLM's own speculative decoding, same drafter and K, no plugin
            # rule: the reference strict's cost is measured against.
            drafter = _drafter(args)
            method = {"method": "ngram"} if args.drafter == "ngram" else {}
            modes.append(Mode("vllm-spec", {**method, **drafter,
                                            "num_speculative_tokens": k}))
        elif n == "fly":
            modes.append(Mode("fly", fly(args.threshold, args.window), args.threshold,
                              args.window))
        elif n in GUARD_MODES:
            # FLy with one quality guard on (fly-digits: no loose accept where
            # a digit differs; fly-eos: none of EOS, stop tokens or strings).
            modes.append(Mode(n, fly(args.threshold, args.window, **{GUARD_MODES[n]: True}),
                              args.threshold, args.window))
        elif n in ("strict-ngram", "fly-ngram"):
            # n-gram drafting beside a draft model, on the same prompts.
            strict = n == "strict-ngram"
            modes.append(Mode(n, fly(args.threshold, args.window, "ngram",
                                     **({"strict": True} if strict else {})),
                              None if strict else args.threshold,
                              None if strict else args.window))
        elif n in ("fsd", "fsd-fallback"):
            # FSD (rule fsd, Jensen-Shannon) at each --fsd-threshold, with the
            # authors' resample variant or the fallback to the native test.
            variant = "fallback" if n == "fsd-fallback" else "resample"
            for t in args.fsd_threshold:
                modes.append(Mode(f"{n} js={t:g}", {
                    "method": "fly", **_drafter(args, None), "num_speculative_tokens": k,
                    "fly": {"rule": "fsd", "fsd_divergence": "js", "fsd_threshold": t,
                            "fsd_variant": variant}}))
        elif n == "fly-multilevel":
            # FLy with the multi-level (n-gram accelerated) draft model.
            modes.append(Mode(n, fly(args.threshold, args.window, multilevel=True),
                              args.threshold, args.window))
        elif n == "fly-flex":
            # FLy with flex decoding (confidence truncation, batch schedule;
            # --flex adds settings such as {"flex_max_batch": 4}).
            modes.append(Mode(n, fly(args.threshold, args.window, flex=True, **args.flex),
                              args.threshold, args.window))
        elif n == "points":
            # Named settings from --points, each at its own K.
            if not args.points:
                raise SystemExit("mode 'points' needs --points FILE")
            names = [pt["name"] for pt in args.points]
            dup = sorted({x for x in names if names.count(x) > 1})
            if dup:
                raise SystemExit(f"--points: {', '.join(dup)} named in more than one file")
            for pt in args.points:
                kk = pt.get("K", k)
                modes.append(Mode(pt["name"], {
                    "method": "fly", **_drafter(args, pt.get("drafter")),
                    "num_speculative_tokens": kk, "fly": dict(pt.get("fly", {}))}))
        elif n == "sweep":
            points = [(t, args.window) for t in args.sweep_threshold] + [
                (args.threshold, w) for w in args.sweep_window]
            for t, w in dict.fromkeys(points):
                if (t, w) == (args.threshold, args.window) or w >= k:
                    continue
                modes.append(Mode(f"fly t={t:g} w={w}", fly(t, w), t, w, sweep=True))
        else:
            raise SystemExit(f"unknown mode {n!r}: use nospec, vllm-spec, strict, fly, fly-digits, "
                             "fly-eos, fsd, fsd-fallback, fly-multilevel, fly-flex, "
                             "strict-ngram, fly-ngram, points, sweep")
    return modes


GUARD_MODES = {"fly-digits": "guard_digits", "fly-eos": "guard_eos_stop"}


def run_key(mode: Mode, temp: float, common: dict) -> str:
    blob = json.dumps({"spec": mode.spec, "t": temp, **common}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_points(text: str) -> list[dict]:
    """--points: a JSON list of {"name", "K", "fly"} (a file path or inline)."""
    raw = text if text.lstrip().startswith("[") else Path(text).read_text()
    try:
        points = json.loads(raw)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--points is not valid JSON: {e}") from None
    names = [p.get("name") if isinstance(p, dict) else None for p in points]
    if not isinstance(points, list) or not all(isinstance(n, str) and n for n in names):
        raise argparse.ArgumentTypeError(
            '--points must be a JSON list of objects, each with a "name"')
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError("--points: names must be unique")
    return points
