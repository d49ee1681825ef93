"""`avatar bench live`: glass-to-glass and per-stage latency of a running avatar server.

Headless aiortc clients stream a clip at its camera rate; every avatar frame that comes
back is matched to the camera frame it shows (the server keeps input timestamps on its
output and reports them over the stats channel). Glass-to-glass here is client send
(frame handed to the encoder) -> client receive (frame decoded): encode, network,
server queue + compute, encode, decode.

    client.py   the headless client (also the tests'): session, camera track, frame matching
    runner.py   the server (local child or --url), driving frames, sessions, the measuring loop
    stats.py    per-session results, summaries, drift, B/A ratios
    report.py   the table, report.json, report.html and its plots
    command.py  the command's flags and `run`
"""
