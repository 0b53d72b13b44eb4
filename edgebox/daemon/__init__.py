"""``edgebox serve``: the box's daemon, driven over MQTT 5 by an operator or a fleet controller.

Modules (one owner each):

- ``config``      the daemon's settings: TOML file, flags, secrets from the environment
- ``schemas``     topics and every command/reply payload on the wire (pydantic)
- ``transport``   the MQTT 5 connection: persistent session, Last Will, QoS 1, backoff, acks
- ``commands``    a command's bytes -> a validated command or a 4xx (pure; fuzzed)
- ``lanes``       control and work lanes, bounded, filled from paho's network thread
- ``journal``     the commands in progress, in the state directory (poison-message protection)
- ``handlers``    commands -> engine: the control lane, the work lane, replies and acks
- ``engine_host`` the loaded model and its warm engine (load, unload, hot standby)
- ``power``       the chips' firmware tree and the budget governor on the loaded model
- ``telemetry``   power/temperature/frequency readings and the ``PowerControl`` protocol
- ``notify``      sd_notify over ``NOTIFY_SOCKET`` (READY, WATCHDOG, STOPPING, RELOADING)
- ``service``     the main loop: load, connect, READY=1, watchdog, SIGHUP reload, SIGTERM drain
- ``client``      the operator side: ``edgebox client generate|status|budget|devices|...``
"""
