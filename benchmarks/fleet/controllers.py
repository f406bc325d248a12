"""Rate controllers the fleet experiments with, passed to the forwarders it builds.

Each is a ``ratelimit.Controller`` built by a factory under a name; the fleet
passes its controllers to the configuration's validation and to ``Forwarder``
(``controllers=``), and a forwarder picks one by ``evidently.rate_controller``
like a shipped one: nothing of the limiter is patched, and a production
configuration still accepts only the shipped controllers. A controller sees
what the limiter shows every controller: each success once slow start is over,
and one throttle per round trip (throttles of calls sent before the last
decrease never reach it). Why each was tried and what it measured:
docs/scaling.md.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Mapping

from forwarder.delivery import rate as ratelimit

# --cubic-* and --scaled-* default to forwarder/delivery/rate.py's constants.
CUBIC_DEFAULTS = {name: param.default for name, param in inspect.signature(ratelimit.Cubic).parameters.items()
                  if name in ("scale", "beta")}
SCALED_DEFAULTS = {name: param.default for name, param in inspect.signature(ratelimit.ScaledAimd).parameters.items()
                   if name in ("growth", "beta", "tau")}


class Aimd:
    """Additive increase (requests/s per second), multiplicative decrease: the baseline the others are compared to.

    Its increase is max_rate/100 per second, so it behaves well only with
    max_rate near the forwarder's share (docs/scaling.md).
    """

    def __init__(self, initial_rate: float, now: float, increase: float = 1.0, beta: float = 0.7) -> None:
        self._rate = initial_rate
        self._increase = increase
        self._beta = beta
        self._last = now

    def success(self, now: float) -> float:
        self._rate += self._increase * max(0.0, now - self._last)
        self._last = now
        return self._rate

    def throttle(self, rate: float, now: float) -> float:
        self._rate = rate * self._beta
        self._last = now
        return self._rate

    def resume(self, rate: float, now: float) -> None:
        self._rate, self._last = rate, now


class ExperimentalCubic(ratelimit.Cubic):
    """CUBIC with the knobs the experiments turn (at their defaults: the shipped CUBIC).

    Each knob makes a small forwarder probe more gently, the diagnosis being
    that at 1-2 calls/s CUBIC's K is about a second, so the rate moves by more
    than the forwarder's share between two of its own calls:

    * ``c``, ``beta``: CUBIC's constants (0.4 and 0.7 shipped);
    * ``ref_rate``: C shrinks in proportion to W_max below it;
    * ``target``: C shrinks by target / (throttled fraction of the answers this
      controller saw lately, an EWMA of ``weight`` per answer) when that is
      above target;
    * ``k_min``: K, the time back to the last throttled rate, is at least this;
    * ``k_calls``: K spans at least this many calls at W_max.
    """

    def __init__(self, initial_rate: float, now: float, c: float, beta: float, ref_rate: float = 0.0,
                 target: float = 0.0, weight: float = 0.05, k_min: float = 0.0, k_calls: float = 0.0) -> None:
        self._c, self._ref, self._target, self._weight, self._k_min = c, ref_rate, target, weight, k_min
        self._k_calls = k_calls
        self.throttled_fraction = 0.0
        super().__init__(initial_rate, now, scale=c, beta=beta)

    def _observe(self, throttled: bool) -> None:
        self.throttled_fraction += self._weight * (float(throttled) - self.throttled_fraction)

    def _zero_point(self) -> float:
        scale = self._c
        if self._ref:
            scale *= min(1.0, self._w_max / self._ref)
        if self._target and self.throttled_fraction > self._target:
            scale *= max(0.01, self._target / self.throttled_fraction)
        self._scale = scale
        return max(super()._zero_point(), self._k_min, self._k_calls / self._w_max)

    def success(self, now: float) -> float:
        self._observe(False)
        # The concave part reaches W_max at K whatever stretched K; with K from
        # C alone this is exactly the shipped curve. The convex part is unchanged.
        t = now - self._last_throttle
        if t < self._k:
            return self._w_max - (1 - self._beta) * self._w_max * ((self._k - t) / self._k) ** 3
        return self._scale * (t - self._k) ** 3 + self._w_max

    def throttle(self, rate: float, now: float) -> float:
        self._observe(True)
        return super().throttle(rate, now)


class Dctcp:
    """DCTCP's rule on throttles: rate *= 1 - alpha/2 once per round trip with throttles.

    ``alpha`` is an EWMA (``gain`` per ``interval`` seconds) of the fraction
    of the answers it saw that were throttles; the increase is ``growth`` x
    the rate at the last decrease, per second. The idea: the token bucket
    throttles calls at random, so every forwarder sees about the same
    fraction, and a cut in proportion to it would stay fair while cutting
    less than CUBIC's 30% (docs/scaling.md, "Experiments on the controller").
    """

    def __init__(self, initial_rate: float, now: float, interval: float = 1.0, gain: float = 1 / 16,
                 growth: float = 0.1) -> None:
        self._interval, self._gain, self._growth = interval, gain, growth
        self.alpha = 0.0
        self._rate = self._w_max = initial_rate
        self._answered = self._throttled = 0
        self._round_start = self._last = now

    def _observe(self, throttled: bool, now: float) -> None:
        self._answered += 1
        self._throttled += throttled
        if now - self._round_start >= self._interval:
            self.alpha += self._gain * (self._throttled / self._answered - self.alpha)
            self._answered = self._throttled = 0
            self._round_start = now

    def success(self, now: float) -> float:
        self._observe(False, now)
        self._rate += self._growth * self._w_max * max(0.0, now - self._last)
        self._last = now
        return self._rate

    def throttle(self, rate: float, now: float) -> float:
        self._observe(True, now)
        self._w_max = rate
        self._rate = rate * (1 - self.alpha / 2)
        self._last = now
        return self._rate

    def resume(self, rate: float, now: float) -> None:
        self._rate, self._last = rate, now


# What --controller may name: the shipped controllers, AIMD for comparison, DCTCP.
FLEET_CONTROLLERS: Mapping[str, ratelimit.ControllerFactory] = {
    **ratelimit.SHIPPED_CONTROLLERS,
    "aimd": lambda rate, max_rate, now: Aimd(rate, now, increase=max(1.0, max_rate / 100)),
    "dctcp": lambda rate, max_rate, now: Dctcp(rate, now),
}


def cubic_knobs(args: argparse.Namespace) -> dict[str, float]:
    """The ExperimentalCubic knobs of the command line that differ from the shipped CUBIC ({} if none)."""
    knobs = {"c": args.cubic_c, "beta": args.cubic_beta, "ref_rate": args.cubic_ref_rate,
             "target": args.cubic_target, "weight": args.cubic_weight, "k_min": args.cubic_k_min,
             "k_calls": args.cubic_k_calls}
    shipped = {"c": CUBIC_DEFAULTS["scale"], "beta": CUBIC_DEFAULTS["beta"], "ref_rate": 0.0, "target": 0.0,
               "k_min": 0.0, "k_calls": 0.0}
    return knobs if any(knobs[k] != v for k, v in shipped.items()) else {}


def scaled_knobs(args: argparse.Namespace) -> dict[str, float]:
    """The ScaledAimd constants of the command line when any differs from the shipped ones ({} if none)."""
    knobs = {"growth": args.scaled_growth, "beta": args.scaled_beta, "tau": args.scaled_tau}
    return knobs if knobs != SCALED_DEFAULTS else {}


def controller_for(controller: str, args: argparse.Namespace) -> tuple[str, ratelimit.ControllerFactory]:
    """The ``evidently.rate_controller`` name for ``--controller`` with this command line's knobs, and its factory.

    A shipped controller with knobs changed gets a name that spells them out,
    e.g. ``scaled[growth=0.1,beta=0.4,tau=20]``.
    """
    cubic, scaled = cubic_knobs(args), scaled_knobs(args)
    if controller == "cubic" and cubic:
        return _spelled("cubic", cubic), lambda rate, max_rate, now: ExperimentalCubic(rate, now, **cubic)
    if controller == "scaled" and scaled:
        return (_spelled("scaled", scaled),
                lambda rate, max_rate, now: ratelimit.ScaledAimd(rate, now, max_rate, **scaled))
    return controller, FLEET_CONTROLLERS[controller]


def _spelled(name: str, knobs: dict[str, float]) -> str:
    return f"{name}[{','.join(f'{k}={v:g}' for k, v in knobs.items())}]"


def experiment_label(args: argparse.Namespace) -> str:
    """The variants in use, for the report's first line ("" when none)."""
    parts = []
    if cubic_knobs(args):
        parts.append(_spelled("CUBIC", cubic_knobs(args)))
    if scaled_knobs(args):
        parts.append(_spelled("ScaledAimd", scaled_knobs(args)))
    return ", ".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The experiments' options (defaults are forwarder/delivery/rate.py's)."""
    x = parser.add_argument_group("controller experiments (--cubic-* apply to --controller cubic, "
                                  "--scaled-* to --controller scaled)")
    x.add_argument("--cubic-c", type=float, default=CUBIC_DEFAULTS["scale"], help="CUBIC's C, requests/s^3")
    x.add_argument("--cubic-beta", type=float, default=CUBIC_DEFAULTS["beta"], help="CUBIC's multiplicative decrease")
    x.add_argument("--cubic-ref-rate", type=float, default=0.0, help="scale C by W_max/REF below REF req/s (0: off)")
    x.add_argument("--cubic-k-min", type=float, default=0.0,
                   help="at least this many seconds back to the last throttled rate (0: off)")
    x.add_argument("--cubic-k-calls", type=float, default=0.0,
                   help="at least this many calls (at W_max) back to the last throttled rate (0: off)")
    x.add_argument("--cubic-target", type=float, default=0.0,
                   help="scale C by target/(throttled fraction seen) above target (0: off)")
    x.add_argument("--cubic-weight", type=float, default=0.05, help="EWMA weight per answer of that fraction")
    x.add_argument("--scaled-growth", type=float, default=SCALED_DEFAULTS["growth"],
                   help="ScaledAimd's increase per second, a fraction of its slow average rate")
    x.add_argument("--scaled-beta", type=float, default=SCALED_DEFAULTS["beta"],
                   help="ScaledAimd's cut on a throttle: the rate becomes rate x (1 - beta)")
    x.add_argument("--scaled-tau", type=float, default=SCALED_DEFAULTS["tau"],
                   help="seconds of ScaledAimd's slow average of its own rate")
