"""Fleet simulation: M forwarders that do not know each other share one account quota.

    .venv/bin/python -m benchmarks.fleet [--forwarders 4 16 64] [--quota 100] [--duration 80]
                                         [--controller scaled cubic aimd dctcp] [--quick] [--json OUT] [--trace OUT]

M ``forwarder.app.Forwarder`` instances run in this process on one event loop,
each with its own buffer, batcher, sender, limiter, aiobotocore client, metrics
registry and access key (``fwd-<i>``); the emulator runs in its own process
(``forwarder emulator --no-record --quota Q``, started by the shared harness)
so that it does not take the forwarders' CPU, and attributes every request to a
forwarder by its access key. A feeder appends pre-encoded events straight into
each buffer at a rate above the forwarder's fair share, so the quota, not the
offered load, is the bottleneck.

The quota follows a schedule: Q until half the run, Q/2 for a quarter, Q again.
Per run the report gives, from the emulator's counters:

* goodput: accepted events/s over the steady window [warm-up, D/2) divided by Q*50;
* throttled: throttled requests / requests over that window;
* jain: Jain's index of the per-forwarder accepted events over that window;
* down/up: re-convergence after the quota halves / doubles back (``reconvergence``);
  rate_down/rate_up: the same without its throttling condition (the rate alone);
* cpu: this process's CPU (the forwarders) and the emulator's, in cores, over the run.

``--trace`` writes every forwarder's counters and limiter rate every 0.2 s.

Modules: ``analysis`` (the figures, pure), ``controllers`` (AIMD and experimental rate
controllers, passed to each ``Forwarder`` and chosen by
``evidently.rate_controller``: nothing of the limiter is patched),
``runner`` (one run, the command line), ``report`` (table and trace). Why this
shape, the figures and the experiments: docs/scaling.md.
"""
