"""A local Evidently PutProjectEvents server with injectable faults.

moto and LocalStack do not implement Evidently, so tests, benchmarks and users'
integration tests run against this. It follows botocore's Evidently model and
answers as the service does (rest-json, ``x-amzn-ErrorType``,
``x-amzn-RequestId``), so a real botocore client raises the right exceptions,
and it records what it accepted for inspection over ``/_emulator/*``.

One module per job: ``faults`` (what can be injected, the account quota, the
faults in force), ``decisions`` (what to answer to one request, pure),
``put_events`` (the operation: decisions and faults applied, events counted and
recorded), ``records`` (accepted events and counters), ``server`` (the aiohttp
wiring), ``cli`` (``forwarder emulator``). Only the commands that use it (``forwarder emulator``, ``forwarder
dev``), the tests and the benchmarks import this package; ``forwarder run``
never does (tests/emulator/test_emulator.py checks its import graph).
"""
