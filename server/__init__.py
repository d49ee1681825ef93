"""Sessions, transport, HTTP, rooms and the CLI; calls into engines/, never the reverse.
Wings: http/ (front doors), media/ (transport and compute stages), rooms/ (audiences, SFU),
enroll/ (the training queue), bench/ (`avatar bench live`); shared concerns at the top."""
