"""Browser enrollment's back room: the persistent queue (one training at a time, resumed after
a restart, audited) and its worker processes (probe, training). The HTTP side is
server/http/enroll.py. May import engines/, server.audit and server.config."""
